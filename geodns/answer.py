"""The answer path: query bytes + client address + view -> reply bytes. No I/O.

`Responder.answer(data, client, tcp=...)` is the one choke point (as in dnspython's test name
server): a message that cannot be answered is dropped (`NotAQuery`), a malformed one gets
FORMERR, an unknown opcode NOTIMP, EDNS version > 0 BADVERS, and any exception in the stages
after parsing SERVFAIL -- nothing escapes. The stages, in order:

1. parse (`geodns.wire`: a direct decoder for the common shape, dnslib for the rest);
2. reply cache (`answer_cache.ReplyCache`, exact reply bytes): replies to UDP queries whose
   answer depends on the query bytes alone (no client address involved) are kept by the bytes
   after the ID in `exact`; the UDP pipeline (`geodns.pipeline`) looks in its current generation
   first and only patches the ID (`answer` looks in both).
   Only queries of at most `EXACT_QUERY_MAX` octets whose EDNS options are Client Subnet,
   cookie or padding are kept, so a key holds nothing but what decides the answer and the few
   octets a resolver repeats; any other query is answered through the answer cache. A reply is
   kept on the second sight of its query bytes (the hashes of the last `SEEN_MAX` distinct
   queries are remembered), so resolver traffic that never repeats does not churn it;
3. template cache (`answer_cache.TemplateCache`, packed answer templates, with the region order
   memo `RegionOrders` beside it): keyed by what they depend on -- lowercased name, type, class,
   RD/CD, the size limit, the EDNS shape (DO, ECS family and source prefix) and, for app
   names only, the GeoIP network of the ECS subnet or of the client. A hit copies the
   question from the query (so the name keeps its case) and appends the cached sections and a
   fresh OPT (ECS echoed with the cached scope);
4. lookup (`geodns.zone`, `geodns.nearest`) and packing with dnslib, truncation to the UDP
   limit (TC set, answer sections dropped).

Both caches are byte-bounded (`geodns.cache.BoundedCache`): they share `cache_bytes` (half
each) and hold at most `cache_size` entries each; full, they evict a generation of entries,
never everything. Both are emptied whenever the view changes (`set_view`), i.e. when the routing table's revision
moves. A query over `wire.MAX_QUERY_OCTETS` is refused with FORMERR before it is decoded.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from dnslib import RR, DNSBuffer, DNSLabel

from geodns import zone as zonemod
from geodns.answer_cache import GeoMarker, Question, RegionOrders, ReplyCache, Template, TemplateCache
from geodns.nearest import Locator, Place, choose
from geodns.region_map import RegionMap
from geodns.stats import Stats
from geodns.view import View
from geodns.wire import (
    AA,
    CD,
    CLASS_ANY,
    CLASS_IN,
    DO_BIT,
    HEADER_LEN,
    MAX_QUERY_OCTETS,
    OPCODE_MASK,
    OPCODE_QUERY,
    QR,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NAMES,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    RD,
    TC,
    TYPE_A,
    TYPE_AAAA,
    TYPE_AXFR,
    TYPE_IXFR,
    TYPE_OPT,
    FormError,
    NotAQuery,
    Query,
    QueryTooLarge,
    header_of,
    name_labels,
    opt_record,
    pack_header,
    parse_query,
)
from geomesh.logs import event

log = logging.getLogger("geodns.answer")

DEFAULT_UDP_PAYLOAD = 1232  # DNS Flag Day 2020
DEFAULT_CACHE_SIZE = 200_000  # entries per cache
DEFAULT_CACHE_BYTES = 32 << 20  # both caches together
EXACT_QUERY_MAX = 512  # longer queries are answered but not kept in the exact cache
TCP_LIMIT = 65535
# templates checked one by one on a view change (on the serving thread, about 1 us each: 10 ms
# at most); a cache holding more starts empty instead, as on a change of the regions
RETAIN_MAX = 10_000
_ECHO = RD | CD
_ONE_Q_ONE_AR = b"\0\1\0\0\0\0\0\1"  # QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 1


class Answer(NamedTuple):
    wire: bytes | None  # None: send nothing
    index: int  # Stats index of (rcode, region); -1 when dropped


DROPPED = Answer(None, -1)
# the fast path's own bindings: Answer's NamedTuple __new__ and wire.pack_header each cost one more
# Python call per query, ~5% of a cold query's CPU in the server
_new_answer = tuple.__new__
_pack_header = struct.Struct("!6H").pack  # wire.pack_header
_unpack_id_flags = struct.Struct("!HH").unpack_from  # wire.header_of
_pack_head = struct.Struct("!5H").pack  # the header after the ID
_pack_opt = struct.Struct("!BHHBBHH").pack  # the OPT record up to its options
_OCTET = [bytes((i,)) for i in range(256)]
MAX_ROTATIONS_KEPT = 16  # answers with more A/AAAA records than this are rotated per query


class Responder:
    """Answers queries from one `View` at a time. One per process; not thread-safe."""

    def __init__(self, view: View, locator: Locator, stats: Stats | None = None, *,
                 udp_payload: int = DEFAULT_UDP_PAYLOAD, cache_size: int = DEFAULT_CACHE_SIZE,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, log_queries: bool = False,
                 reply_cache: bool = True, region_map: RegionMap | None = None) -> None:
        if not 512 <= udp_payload <= 65535:
            raise ValueError(f"udp_payload {udp_payload} is outside 512-65535")
        self.locator = locator
        self.stats = stats if stats is not None else Stats()
        self.udp_payload = udp_payload
        self.cache_size = max(0, cache_size)
        self.cache_bytes = max(0, cache_bytes)
        self.log_queries = log_queries
        self.reply_cache = reply_cache
        self.exact = ReplyCache(self.cache_bytes // 2 if reply_cache else 0, self.cache_size if reply_cache else 0)
        self.templates = TemplateCache(self.cache_bytes - self.cache_bytes // 2, self.cache_size)
        self.orders = RegionOrders(view)
        self._turn = 0  # round-robin position of rotated answers
        self._last_error_log = 0.0
        self.region_map = region_map
        self.view = view
        self._zone_len = len(view.zone.name.split("."))

    # -- state ---------------------------------------------------------------------------------

    def set_view(self, view: View) -> None:
        """Answer from `view` from now on. The reply cache starts empty. When `view` changes
        what every answer shares (the zone, the regions and their gateways, readiness), so do
        the templates and the region orders; otherwise -- an update of apps, instances or TXT
        records, the common one -- the templates that `view` would build alike stay
        (`same_answer`), so the names it leaves as they were keep their fast answers (unless
        the cache holds over `RETAIN_MAX` templates: checking them would pause the answers)."""
        old = self.view
        self.view = view
        self._zone_len = len(view.zone.name.split("."))
        self.exact.reset()
        if (old.zone == view.zone and old.ready == view.ready and old.regions == view.regions
                and len(self.templates) <= RETAIN_MAX):
            self.orders.rebind(view)
            self.templates.retain(same_answer(old, view), has_records)
        else:
            self.templates.reset()
            self.orders.reset(view)

    def set_map(self, region_map: RegionMap | None) -> None:
        """Place clients with `region_map` from now on (None: per-query GeoIP look-ups); the
        caches start empty. The map is swapped whole: no answer comes from a half-built one."""
        self.region_map = region_map
        self.exact.reset()
        self.templates.reset()
        self.orders.reset(self.view)

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Size and evictions of both caches, for the metrics."""
        return {name: {"bytes": c.bytes, "entries": len(c), "evictions": c.evictions}
                for name, c in (("exact", self.exact), ("answer", self.templates))}

    # -- the choke point -----------------------------------------------------------------------

    def answer(self, data: bytes, client: bytes, *, tcp: bool = False) -> Answer:
        """The reply to `data` from `client` (packed 4- or 16-octet address)."""
        if type(data) is not bytes:
            data = bytes(data)
        # wire.header_of inlined (one Python call less per query)
        if len(data) < HEADER_LEN:
            self.stats.dropped += 1
            return DROPPED
        ident, flags = _unpack_id_flags(data)
        if flags & QR:
            self.stats.dropped += 1
            return DROPPED
        exact = self.exact
        if not tcp and len(data) <= EXACT_QUERY_MAX and not self.log_queries:
            key = data[2:]  # one slice: its hash is computed once, for the look-up and the doorkeeper
            if self.reply_cache:
                # the UDP pipeline looked in the current generation already; `get` (which promotes
                # from the previous one) is called only when a generation holds the key
                if key in exact.previous or key in exact.current:
                    cached = exact.get(key)
                    if cached is not None:
                        self.stats.cache_hits += 1
                        return Answer(data[:2] + cached[0], cached[1])
            if self.region_map is not None:
                fast = self._fast(data, ident, flags, key)
                if fast is not None:
                    return fast
        if (flags & OPCODE_MASK) >> 11 != OPCODE_QUERY:
            return self._error(data, ident, flags, RCODE_NOTIMP, client, tcp)
        try:
            query = parse_query(data)
        except FormError as exc:
            if isinstance(exc, QueryTooLarge):
                self.stats.oversize += 1
            return self._error(data, ident, flags, RCODE_FORMERR, client, tcp, str(exc))
        except NotAQuery:
            self.stats.dropped += 1
            return DROPPED
        except Exception as exc:  # a parser bug must not escape: the message was not understood
            self._log_failure("parsing failed; replying FORMERR")
            return self._error(data, ident, flags, RCODE_FORMERR, client, tcp, f"{type(exc).__name__}: {exc}")
        try:
            entry, hit, scope = self._entry(query, client, tcp)
            wire = self._assemble(query, entry, scope)
        except Exception:
            self._log_failure("answering failed; replying SERVFAIL")
            return self._error(data, ident, flags, RCODE_SERVFAIL, client, tcp, query=query)
        if hit:
            self.stats.cache_hits += 1
        else:
            self.stats.cache_misses += 1
        if (entry.reusable and not tcp and len(data) <= EXACT_QUERY_MAX
                and (query.edns is None or not query.edns.other_options)):
            self.exact.keep(data, wire, entry.index)
        if self.log_queries:
            self._log(query, client, tcp, entry.rcode, entry.region, hit)
        return Answer(wire, entry.index)

    def _fast(self, data: bytes, ident: int, flags: int, key: bytes) -> Answer | None:
        """The common resolver query -- one uncompressed question, an OPT (version 0) holding
        one valid Client Subnet option with a source prefix above 0 -- answered from a template
        already built, straight from the bytes (no `Query` decoded). None for anything else, or
        when no template is ready: the full path answers it (and refuses what is malformed).
        `key` is data[2:], the reply cache's key."""
        end = len(data)
        if flags & OPCODE_MASK or data[4:12] != _ONE_Q_ONE_AR:
            return None
        # the name ends at its first zero octet -- unless a label holds one, or the name is not
        # well formed at all; then the name found here is no key of the template cache (every key
        # is a well-formed name, its length octets <= 63 unchanged by lower()), and the full path
        # answers
        i = data.find(0, HEADER_LEN) + 1
        if not i:
            return None
        qend = i + 4
        o = qend + 11  # the OPT's options
        if o + 9 > end or data[qend:qend + 3] != b"\0\0\x29" or data[o:o + 2] != b"\0\x08" or data[qend + 6]:
            return None  # not an OPT, another option first, or EDNS version > 0
        rdlen = data[o - 2] << 8 | data[o - 1]
        olen = data[o + 2] << 8 | data[o + 3]
        if o + rdlen != end or olen + 4 != rdlen:
            return None  # options other than one Client Subnet
        family, source = data[o + 5], data[o + 6]
        if data[o + 4] or data[o + 7] or source == 0:  # family > 255, a scope, or the source address
            return None
        nbytes = (source + 7) >> 3
        if family == 1:
            if source > 32:
                return None
            width = 4
        elif family == 2:
            if source > 128:
                return None
            width = 16
        else:
            return None
        if olen != 4 + nbytes or (source & 7 and data[end - 1] & (0xFF >> (source & 7))):
            return None
        payload = data[qend + 3] << 8 | data[qend + 4]
        limit = max(512, min(payload, self.udp_payload))
        do = bool(data[qend + 7] & 0x80)
        qtype = data[i] << 8 | data[i + 1]
        qclass = data[i + 2] << 8 | data[i + 3]
        base = (data[HEADER_LEN:i].lower(), qtype, qclass, flags & _ECHO, limit, (do, family, source))
        current = self.templates.store.current  # the current generation: no promotion on this path
        entry = current.get(base)
        if isinstance(entry, GeoMarker):
            rmap = self.region_map
            assert rmap is not None
            if width == 4:  # the address straight from the bytes (its missing octets are zero)
                rank, scope = rmap.locate_v4(int.from_bytes(data[o + 8:end], "big") << ((4 - nbytes) << 3), source)
            else:
                rank, scope = rmap.locate(data[o + 8:end].ljust(16, b"\0"), source)
            entry = entry.by_rank[rank]
            if entry is None:
                return None
        elif entry is None:
            return None
        else:
            scope = entry.scope
        if entry.ext_rcode:
            return None
        bodies = entry.bodies
        if bodies:
            body = bodies[self._turn % len(bodies)]
            self._turn += 1
        elif entry.rotate:
            rot = entry.rotate
            k = self._turn % len(rot)
            self._turn += 1
            body = b"".join(rot[k:]) + b"".join(rot[:k]) + entry.body
        else:
            body = entry.body
        head, opt = entry.fast_head, entry.fast_opt
        if not head or not opt:  # built for a question of another shape (not reached through the keys)
            return None
        wire = b"".join((data[:2], head, data[HEADER_LEN:qend], body, opt, data[o:o + 7], _OCTET[scope],
                         data[o + 8:end]))
        self.stats.cache_hits += 1
        if entry.reusable and self.reply_cache:
            self.exact.keep_key(key, wire, entry.index)
        return _new_answer(Answer, (wire, entry.index))

    def oversize(self, data: bytes, client: bytes) -> Answer:
        """FORMERR (header only) for a datagram the transport cut at `MAX_QUERY_OCTETS`: what
        `answer` gives any query over that size, without looking past the header."""
        try:
            ident, flags = header_of(data)
        except NotAQuery:
            self.stats.dropped += 1
            return DROPPED
        self.stats.oversize += 1
        return self._error(data, ident, flags, RCODE_FORMERR, client, False,
                           f"over {MAX_QUERY_OCTETS} octets, a query is at most {MAX_QUERY_OCTETS}")

    def _log_failure(self, msg: str) -> None:
        """Log the exception being handled, at most once a second."""
        now = time.monotonic()
        if now - self._last_error_log > 1.0:
            self._last_error_log = now
            log.exception(msg)

    def truncated(self, data: bytes) -> bytes | None:
        """A TC reply carrying only the question (and OPT): what RRL's slip sends so that a
        real client retries over TCP."""
        try:
            q = parse_query(bytes(data))
        except Exception:
            return None
        flags = QR | TC | (q.flags & _ECHO)
        if q.edns is None:
            return pack_header(q.id, flags, 1, 0, 0, 0) + q.question
        return pack_header(q.id, flags, 1, 0, 0, 1) + q.question + opt_record(self.udp_payload, 0, q.edns.do)

    # -- stages ----------------------------------------------------------------------------------

    def _entry(self, q: Query, client: bytes, tcp: bool) -> tuple[Template, bool, int]:
        """The answer's template, whether it came from the cache, and the ECS scope to report."""
        edns = q.edns
        if edns is not None and edns.version > 0:
            return self._build(q, zonemod.Lookup(RCODE_BADVERS), 0, True), False, 0
        if tcp:
            limit = TCP_LIMIT
        elif edns is not None:
            limit = max(512, min(edns.payload, self.udp_payload))
        else:
            limit = 512
        ecs = edns.ecs if edns is not None else None
        shape = None if edns is None else (edns.do, ecs.family if ecs else 0, ecs.source if ecs else -1)
        base: Question = (q.qname_lower, q.qtype, q.qclass, q.flags & _ECHO, limit, shape)
        templates = self.templates
        found = templates.for_question(base)
        if found is None:
            target = self._target(q)
            if not isinstance(target, zonemod.AppName) or not self.view.ready:
                built = self._build(q, self._lookup(q, target), 0, True, limit)
                templates.put_question(base, built)
                return built, False, 0
            geo = GeoMarker(target, [None] * len(self.region_map.rankings) if self.region_map is not None else [])
            templates.put_question(base, geo)
        elif isinstance(found, Template):
            return found, True, found.scope
        else:
            geo = found
        # the answer depends on where the client is
        if ecs is not None and ecs.source > 0:
            packed, prefix, reusable = ecs.padded(), ecs.source, True
        else:
            packed, prefix, reusable = client, None, False
        rmap = self.region_map
        if rmap is not None:
            rank, scope = rmap.locate(packed, prefix)
            if not reusable:
                scope = 0
            where: tuple[object, object] = (rank, reusable)
            entry = geo.by_rank[rank] if reusable else templates.for_place(base, *where)
            if entry is not None:
                return entry, True, scope
            order = self.orders.for_rank(rank, rmap.rankings[rank])
        else:
            place = self.locator.locate(packed, prefix)
            scope = place.prefix if reusable else 0
            where = (place.network, place.prefix)
            entry = templates.for_place(base, *where)
            if entry is not None:
                return entry, True, scope
            order = self.orders.for_place(place)
        region = choose(geo.target.app, order)
        # clients that end up in the same region share one packed answer (only the scope differs)
        name = region.name if region is not None else ""
        entry = templates.for_region(base, name, reusable)
        hit = entry is not None
        if entry is None:
            lookup = zonemod.records(self.view, geo.target, q.qtype, region)
            entry = self._build(q, lookup, 0, reusable, limit)
            templates.put_region(base, name, reusable, entry)
        if rmap is not None and reusable:
            geo.by_rank[where[0]] = entry  # type: ignore[index]
            if not has_records(entry):
                geo.negative.add(where[0])  # type: ignore[arg-type]
        else:
            templates.put_place(base, *where, entry)
        return entry, hit, scope

    def _target(self, q: Query) -> zonemod.Target | None:
        """What the question asks for; None when it is not ours to answer (REFUSED)."""
        if q.qclass not in (CLASS_IN, CLASS_ANY) or q.qtype in (TYPE_AXFR, TYPE_IXFR):
            return None
        rel = zonemod.split(self.view, tuple(label.lower() for label in q.labels()))
        if rel is None:
            return None
        return zonemod.classify(self.view, rel)

    def _lookup(self, q: Query, target: zonemod.Target | None) -> zonemod.Lookup:
        if q.qtype == TYPE_OPT:
            return zonemod.Lookup(RCODE_FORMERR)  # OPT is not a type one may ask for
        if target is None:
            return zonemod.Lookup(RCODE_REFUSED)
        return zonemod.records(self.view, target, q.qtype)

    def _build(self, q: Query, lookup: zonemod.Lookup, scope: int, reusable: bool,
               limit: int = TCP_LIMIT) -> Template:
        rcode = lookup.rcode
        authoritative = rcode not in (RCODE_REFUSED, RCODE_FORMERR, RCODE_BADVERS)
        flags = QR | (AA if authoritative else 0) | (rcode & 0xF)
        labels = q.labels()
        qlabel = DNSLabel(labels)
        apex = DNSLabel(labels[len(labels) - self._zone_len:]) if len(labels) >= self._zone_len else None
        buf = DNSBuffer()
        buf.append(b"\0" * HEADER_LEN)
        buf.encode_name(qlabel)
        buf.pack("!HH", q.qtype, q.qclass)
        start = buf.offset
        # A/AAAA answers owned by the question name carry no name but a pointer to the question:
        # they can be sent in any order (rotated per answer)
        rotatable = len(lookup.answer) > 1 and all(
            rec.owner == zonemod.OWNER_QNAME and rec.rtype in (TYPE_A, TYPE_AAAA) for rec in lookup.answer)
        cuts = [start]
        for section in (lookup.answer, lookup.authority, lookup.additional):
            for rec in section:
                if rec.owner == zonemod.OWNER_QNAME:
                    owner = qlabel
                elif rec.owner == zonemod.OWNER_APEX:
                    owner = apex if apex is not None else DNSLabel(self.view.zone.name)
                else:
                    owner = DNSLabel(rec.owner)
                RR(owner, rec.rtype, CLASS_IN, rec.ttl, rec.rdata).pack(buf)
                if rotatable and len(cuts) <= len(lookup.answer):
                    cuts.append(buf.offset)
        data = bytes(buf.data)
        body = data[start:]
        an, ns, ar = len(lookup.answer), len(lookup.authority), len(lookup.additional)
        opt_len = 0
        if q.edns is not None:
            ecs = q.edns.ecs
            opt_len = 11 + (8 + len(ecs.address) if ecs is not None and rcode != RCODE_BADVERS else 0)
        rotate: tuple[bytes, ...] = ()
        bodies: tuple[bytes, ...] = ()
        if HEADER_LEN + len(q.question) + len(body) + opt_len > limit:
            flags |= TC
            an = ns = ar = 0
            body = b""
        elif rotatable:
            rotate = tuple(data[a:b] for a, b in zip(cuts, cuts[1:], strict=False))
            body = data[cuts[-1]:]
            if len(rotate) <= MAX_ROTATIONS_KEPT:
                bodies = tuple(b"".join(rotate[k:] + rotate[:k]) + body for k in range(len(rotate)))
        fast_head = fast_opt = b""
        if q.edns is not None:
            fast_head = _pack_head(flags | (q.flags & _ECHO), 1, an, ns, ar + 1)
            ecs = q.edns.ecs
            if ecs is not None and rcode != RCODE_BADVERS:
                fast_opt = _pack_opt(0, TYPE_OPT, self.udp_payload, rcode >> 4, 0, DO_BIT if q.edns.do else 0,
                                     8 + len(ecs.address))
        index = self.stats.index(RCODE_NAMES.get(rcode, str(rcode)), lookup.region, lookup.fail_open)
        return Template(flags, an, ns, ar, body, rcode >> 4, scope, index, reusable, rcode, lookup.region, rotate,
                        fast_head, fast_opt, bodies)

    def _assemble(self, q: Query, e: Template, scope: int) -> bytes:
        """The template `e` with the query's ID, RD/CD and question (case kept) spliced in, the
        answer records rotated one step further than last time, and the OPT with the ECS echo."""
        body = e.body
        rot = e.rotate
        if rot:
            k = self._turn % len(rot)
            self._turn += 1
            body = b"".join(rot[k:]) + b"".join(rot[:k]) + body
        edns = q.edns
        if edns is None:
            return pack_header(q.id, e.flags | (q.flags & _ECHO), 1, e.an, e.ns, e.ar) + q.question + body
        ecs = edns.ecs
        options = ecs.option(scope) if ecs is not None and e.ext_rcode == 0 else b""
        opt = opt_record(self.udp_payload, e.ext_rcode, edns.do, options)
        return (pack_header(q.id, e.flags | (q.flags & _ECHO), 1, e.an, e.ns, e.ar + 1)
                + q.question + body + opt)

    def _error(self, data: bytes, ident: int, flags: int, rcode: int, client: bytes, tcp: bool,
               detail: str = "", query: Query | None = None) -> Answer:
        """FORMERR, NOTIMP or SERVFAIL: header, the question when it could be read, and an OPT
        when the query had a valid one."""
        if query is None and rcode != RCODE_FORMERR:
            try:
                query = parse_query(data)
            except Exception:
                query = None
        out_flags = QR | (flags & (OPCODE_MASK | RD | CD)) | rcode
        if query is None:
            wire = pack_header(ident, out_flags, 0, 0, 0, 0)
        elif query.edns is None:
            wire = pack_header(ident, out_flags, 1, 0, 0, 0) + query.question
        else:
            wire = (pack_header(ident, out_flags, 1, 0, 0, 1) + query.question
                    + opt_record(self.udp_payload, 0, query.edns.do))
        index = self.stats.index(RCODE_NAMES[rcode], "")
        self.stats.cache_misses += 1
        if self.log_queries:
            event(log, "query", client=_text(client), transport="tcp" if tcp else "udp",
                  rcode=RCODE_NAMES[rcode], error=detail or None)
        return Answer(wire, index)

    def _log(self, q: Query, client: bytes, tcp: bool, rcode: int, region: str, hit: bool) -> None:
        ecs = q.edns.ecs if q.edns is not None else None
        event(log, "query", client=_text(client), transport="tcp" if tcp else "udp",
              qname=_name_text(q.qname), qtype=q.qtype,
              ecs=f"{_text(ecs.padded())}/{ecs.source}" if ecs is not None else None,
              rcode=RCODE_NAMES.get(rcode, str(rcode)), region=region or None, cached=hit)


# names whose answer is made of their own records only (no SOA, whose serial is the view's
# revision): a template for one of them stays right while the name is classified alike
_OWN_RECORDS = (zonemod.AppName, zonemod.InstanceName, zonemod.RegionGateways, zonemod.NameServerHost,
                zonemod.TxtName)


def same_answer(old: View, new: View) -> Callable[[bytes], bool]:
    """For two views with the same zone, regions and readiness: whether the answers with records
    that `old` gives a name (lowercased wire form) are those `new` gives. True when both views
    classify the name alike and its answer is made of its own records (the same app with the
    same hosting and pinning, the same instance regions, the same TXT values, ...): `zone.records`
    reads nothing else for those. Memoised per name."""
    memo: dict[bytes, bool] = {}

    def keeps(name: bytes) -> bool:
        same = memo.get(name)
        if same is None:
            rel = zonemod.split(new, name_labels(name))
            target = zonemod.classify(new, rel) if rel is not None else None
            same = memo[name] = isinstance(target, _OWN_RECORDS) and target == zonemod.classify(old, rel)  # type: ignore[arg-type]
        return same
    return keeps


def has_records(t: Template) -> bool:
    """A template that answers with records (NOERROR, answers present): no SOA in it. Negative
    answers carry the SOA, whose serial is the view's revision: they never outlive their view."""
    return t.rcode == RCODE_NOERROR and t.an > 0


def _text(packed: bytes) -> str:
    try:
        return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
    except (ValueError, OSError):
        return packed.hex()


def _name_text(wire: bytes) -> str:
    out = []
    i = 0
    while i < len(wire) and wire[i]:
        n = wire[i]
        out.append(wire[i + 1:i + 1 + n].decode("ascii", "backslashreplace"))
        i += 1 + n
    return ".".join(out) + "."


def client_of(address: str) -> bytes:
    """The packed form of a textual client address (as asyncio hands them over)."""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    return socket.inet_pton(socket.AF_INET, address)


__all__ = ["Answer", "DROPPED", "Responder", "client_of", "Place"]
