#!/usr/bin/env bash
# Installs everything geomesh's lab, tests and benchmarks need, idempotently:
# Debian packages (etcd, wireguard-go, dig/kdig, dnsperf, wrk, h2load, gdnsd, haproxy, chromium and
# chromium-driver for the status page's browser tests, prometheus for promtool, pebble (an ACME
# test CA) and unbound (a recursive resolver for the custom-domain tests), ...)
# and a virtualenv in .venv with geomesh (editable) and its Python dependencies.
# Re-running is cheap: each step is skipped when its stamp matches the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(etcd-server etcd-client wireguard-go iproute2 iputils-ping dnsutils knot-dnsutils
              dnsperf wrk gdnsd haproxy curl procps nginx-light nghttp2-client
              chromium chromium-driver prometheus pebble unbound)

say() { printf '[install] %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
  else
    SUDO=
  fi
  say "apt: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # the Debian packages start system services we do not want running
  for svc in etcd gdnsd haproxy nginx prometheus unbound; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.geomesh-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "pip: installing geomesh[test] (editable)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
