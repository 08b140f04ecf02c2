// geomesh status page: renders the state document pushed by /events (Server-Sent Events).
// No external assets; works offline. Every render bumps document.body.dataset.renders.
"use strict";

const MAX_DRILL = 40;   // gateways per side shown when drilling into a region pair
let state = null;
let drill = null;       // [regionA, regionB] or null
let world = null;

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function ratioClass(up, total) {
  if (total === 0) return "none";
  if (up === total) return "ok";
  return up === 0 ? "bad" : "warn";
}

// the same rules as status_page/view.py (pair_age, age_class): fresh within 135 s, stale to 180 s
const HANDSHAKE_FRESH = 135, HANDSHAKE_STALE = 180;
function pairAge(g, h) {  // worse of what each end reported; Infinity: never; null: not reported
  const ages = [g.handshakes[h.name], h.handshakes[g.name]].filter((x) => x !== undefined)
    .map((x) => (x === null ? Infinity : x));
  return ages.length ? Math.max(...ages) : null;
}
function ageClass(age) {
  if (age === null) return "none";
  if (age <= HANDSHAKE_FRESH) return "ok";
  return age <= HANDSHAKE_STALE ? "warn" : "bad";
}
function ageText(age) {
  if (age === null || age === undefined) return "no handshake reported";
  return age === Infinity || age === "never" ? "never a handshake" : `worst handshake ${Math.round(age)} s ago`;
}

function gatewayOk(g) { return (g.session === "open" || g.session === "timed_out") && g.reachable; }

function when(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "-";
}

function renderHeader(doc) {
  const conn = document.getElementById("conn");
  conn.textContent = doc.connected ? "live" : (doc.error ? "coordinator unreachable" : "connecting…");
  conn.className = "conn " + (doc.connected ? "up" : "down");
  conn.title = doc.error || doc.source || "";
  const v = doc.view;
  const alive = v.gateways.filter((g) => g.session !== "closed").length;
  const reach = v.gateways.filter((g) => g.reachable).length;
  document.getElementById("summary").textContent =
    `revision ${v.revision} · ${v.regions.length} regions · ${v.gateways.length} gateways (${alive} alive, ` +
    `${reach} reachable) · ${v.apps} apps · links up ${v.links_up}/${v.links_total} · updated ${when(doc.updated_at)}`;
}

function renderMap(v) {
  const byRegion = {};
  for (const g of v.gateways) {
    const r = byRegion[g.region] || (byRegion[g.region] = {total: 0, ok: 0});
    r.total += 1; r.ok += gatewayOk(g) ? 1 : 0;
  }
  let svg = "";
  for (const r of v.regions) {
    const x = r.longitude + 180, y = 90 - r.latitude;
    const c = byRegion[r.name] || {total: 0, ok: 0};
    const cls = ratioClass(c.ok, c.total);
    svg += `<g class="region" data-region="${esc(r.name)}"><circle class="marker fill-${cls}" cx="${x.toFixed(1)}" ` +
      `cy="${y.toFixed(1)}" r="${(2.2 + Math.min(4, Math.sqrt(c.total))).toFixed(1)}"><title>${esc(r.name)}: ` +
      `${c.ok}/${c.total} gateways alive and reachable</title></circle><text class="marker-label" ` +
      `x="${(x + 4).toFixed(1)}" y="${(y + 1.5).toFixed(1)}">${esc(r.name)}</text></g>`;
  }
  document.getElementById("markers").innerHTML = svg;
  let rows = "";
  for (const r of v.regions) {
    const c = byRegion[r.name] || {total: 0, ok: 0};
    rows += `<tr data-region="${esc(r.name)}"><td>${esc(r.name)}</td><td>${esc(r.display_name)}</td>` +
      `<td class="${ratioClass(c.ok, c.total)}">${c.ok}/${c.total}</td><td>${r.gateways_draining}</td>` +
      `<td>${r.instances_healthy}/${r.instances}</td></tr>`;
  }
  document.getElementById("regions").innerHTML = v.regions.length
    ? `<table><thead><tr><th>region</th><th>name</th><th>gateways ok</th><th>draining</th>` +
      `<th>instances healthy</th></tr></thead><tbody>${rows}</tbody></table>`
    : `<p class="empty">no regions yet</p>`;
}

function renderMatrix(v) {
  const m = v.matrix;
  if (!m.regions.length) {
    document.getElementById("matrix").innerHTML = `<p class="empty">no mesh yet</p>`;
    document.getElementById("drill").innerHTML = "";
    return;
  }
  const cell = {};
  for (const c of m.cells) { cell[c.a + "\u0000" + c.b] = c; cell[c.b + "\u0000" + c.a] = c; }
  let html = `<table><thead><tr><th></th>${m.regions.map((r) => `<th>${esc(r)}</th>`).join("")}</tr></thead><tbody>`;
  for (const a of m.regions) {
    html += `<tr><th>${esc(a)}</th>`;
    for (const b of m.regions) {
      const c = cell[a + "\u0000" + b];
      html += `<td class="cell bg-${c.class}" data-a="${esc(a)}" data-b="${esc(b)}" data-age="${esc(c.worst_age)}" ` +
        `title="${c.up}/${c.pairs} links up, ${ageText(c.worst_age)}">` +
        `${c.pairs ? Math.round(100 * c.up / c.pairs) + "%" : "-"}</td>`;
    }
    html += "</tr>";
  }
  document.getElementById("matrix").innerHTML = html + "</tbody></table>";
  renderDrill(v);
}

function renderDrill(v) {
  const out = document.getElementById("drill");
  if (!drill) { out.innerHTML = ""; return; }
  const [a, b] = drill;
  const side = (r) => v.gateways.filter((g) => g.region === r);
  const A = side(a), B = side(b);
  const rows = A.slice(0, MAX_DRILL), cols = B.slice(0, MAX_DRILL);
  let html = `<h3>${esc(a)} × ${esc(b)}: ${A.length} × ${B.length} gateways` +
    (A.length > MAX_DRILL || B.length > MAX_DRILL ? ` (first ${MAX_DRILL} of each shown)` : "") + `</h3>`;
  html += `<table class="drill-grid"><tbody>`;
  for (const g of rows) {
    html += `<tr><th>${esc(g.name)}</th>`;
    for (const h of cols) {
      const age = g.name === h.name ? null : pairAge(g, h);
      const cls = g.name === h.name ? "none"
        : (!(gatewayOk(g) && gatewayOk(h)) ? "bad" : (age === null ? "ok" : ageClass(age)));
      html += `<td class="bg-${cls}" title="${esc(g.name)} – ${esc(h.name)}: ${ageText(age)}"></td>`;
    }
    html += "</tr>";
  }
  out.innerHTML = html + "</tbody></table>";
}

function renderApps(v) {
  const apps = Object.entries(v.app_regions);
  document.getElementById("apps").innerHTML = apps.length
    ? `<table><tbody>${apps.map(([app, regions]) => `<tr data-app="${esc(app)}"><td>${esc(app)}</td><td>` +
        regions.map((r) => `<span class="pill">${esc(r)}</span>`).join("") + `</td></tr>`).join("")}</tbody></table>`
    : `<p class="empty">no app instances yet</p>`;
}

function renderGateways(v) {
  const q = document.getElementById("filter").value.trim().toLowerCase();
  const shown = q ? v.gateways.filter((g) => g.name.includes(q) || g.region.includes(q)) : v.gateways;
  if (!v.gateways.length) {
    document.getElementById("gateways").innerHTML = `<p class="empty">no gateways yet</p>`;
    return;
  }
  let rows = "";
  for (const g of shown) {
    const sess = g.session === "open" ? "ok" : (g.session === "timed_out" ? "warn" : "bad");
    rows += `<tr data-gateway="${esc(g.name)}" data-session="${esc(g.session)}" data-reachable="${g.reachable}">` +
      `<td>${esc(g.name)}</td><td>${esc(g.region)}</td><td class="${sess}">${esc(g.session)}</td>` +
      `<td class="${g.reachable ? "ok" : "bad"}">${g.reachable ? "reachable" : "unreachable"}</td>` +
      `<td>${g.seen_by.map(esc).join(", ")}</td><td class="bad">${g.down_by.map(esc).join(", ")}</td>` +
      `<td>${g.probe_rtt_ms ? g.probe_rtt_ms + " ms" : "-"}</td><td>${g.in_dns ? "yes" : "no"}</td>` +
      `<td>${g.draining ? "draining" : "active"}</td><td>${g.session === "open" ? Math.round(100 * g.load) + "%" : "-"}</td>` +
      `<td>${g.session === "open" ? g.active_connections : "-"}</td><td>${esc(g.version || "-")}</td></tr>`;
  }
  document.getElementById("gateways").innerHTML = `<div class="scroll"><table><thead><tr><th>gateway</th>` +
    `<th>region</th><th>session</th><th>verdict</th><th>seen by</th><th>down by</th><th>probe RTT</th>` +
    `<th>in DNS</th><th>state</th><th>load</th><th>connections</th><th>version</th></tr></thead><tbody>${rows}</tbody></table></div>`;
}

function renderCertificates(v) {
  const certs = v.certificates || [];
  const day = (t) => (t ? new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC" : "-");
  document.getElementById("certificates").innerHTML = certs.length
    ? `<table><thead><tr><th>name</th><th>serial</th><th>expires</th><th>next attempt</th><th>state</th></tr></thead><tbody>` +
      certs.map((c) => `<tr data-certificate="${esc(c.name)}" data-failures="${c.failures}"><td>${esc(c.name)}</td>` +
        `<td>${esc(c.serial || "-")}</td><td>${day(c.not_after)}</td><td>${day(c.renew_at)}</td>` +
        `<td class="${c.failures ? "bad" : "ok"}">${c.failures ? esc(`failing (${c.failures}): ${c.last_error}`) : "ok"}</td></tr>`)
        .join("") + `</tbody></table>`
    : `<p class="empty">no certificates obtained by the coordinators</p>`;
}

function renderEvents(doc) {
  const items = doc.events.slice().reverse();
  document.getElementById("events").innerHTML = items.length
    ? items.map((e) => `<li data-kind="${esc(e.kind)}"><time>${when(e.at)}</time>${esc(e.text)}</li>`).join("")
    : `<li class="empty">nothing happened yet</li>`;
}

function render(doc) {
  state = doc;
  const v = doc.view;
  renderHeader(doc);
  renderMap(v);
  renderMatrix(v);
  renderApps(v);
  renderGateways(v);
  renderCertificates(v);
  renderEvents(doc);
  document.body.dataset.revision = String(v.revision);
  document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
}

function loadWorld() {
  fetch("/static/world.json").then((r) => r.json()).then((w) => {
    world = w;
    document.getElementById("land").setAttribute("d", w.path);
  }).catch((err) => console.warn("world outline not loaded", err));
}

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("state", (ev) => render(JSON.parse(ev.data)));
  source.onerror = () => {
    const conn = document.getElementById("conn");
    conn.textContent = "page server unreachable, retrying";
    conn.className = "conn down";
  };
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("matrix").addEventListener("click", (ev) => {
    const td = ev.target.closest("td.cell");
    if (!td) return;
    drill = [td.dataset.a, td.dataset.b];
    if (state) renderDrill(state.view);
  });
  document.getElementById("filter").addEventListener("input", () => { if (state) renderGateways(state.view); });
  loadWorld();
  connect();
});
