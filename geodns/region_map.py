"""The compiled region map: every IPv4 and IPv6 network of a GeoIP City database mapped to a
region ranking, looked up by binary search over compact arrays.

Built in two stages, both pure (no sockets, no event loop; they run off the data path):

1. `read_networks(path)` walks the database's raw search tree (the MaxMind DB format: a binary
   trie of `node_count` nodes, `record_size` bits per child pointer) in address order, one leaf
   per database network, and keeps one entry per run of adjacent networks that share a
   location: the run's first address and an index into a table of (latitude, longitude) places
   (`UNPLACED` for networks without coordinates, and for the special-purpose blocks that
   `geodns.nearest` never places). The database's aliases of the IPv4 tree inside IPv6 (`::/96`,
   `::ffff:0:0/96`, `2002::/16` ...) are kept as alias blocks that a lookup follows into the
   IPv4 map, as the database itself does. A record's place is decoded once per distinct record,
   through the C reader when it is installed. This is the slow stage (seconds); it runs at
   start and when the database file changes.
2. `compile_map(networks, regions, default_region)` ranks every distinct place against the
   current regions (nearest first by great-circle distance, ties by name, as
   `geodns.nearest.region_order`; unplaced networks stand at the default region, or get the
   order by name without one), then merges adjacent runs with the same ranking. The result, a
   `RegionMap`, holds sorted block starts (`array('I')` for IPv4, two `array('Q')` halves for
   IPv6) and a ranking index per block. This stage runs when regions or their coordinates change.

`RegionMap.lookup(packed, prefix)` returns the ranking (a tuple of region names, nearest first)
and the ECS scope: the length of the largest prefix around the address that lies inside its
block, i.e. every address in the scope gets the same ranking (never narrower than the database
network that placed the address, since that network lies inside its block; it may be longer
than the query's source prefix when the source network spans blocks, RFC 7871 section 7.2.1).
A map is immutable once built: the server swaps the whole object, so a lookup never sees a
half-built map.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import ne
from pathlib import Path

import maxminddb

from geomesh.geo import great_circle_km

UNPLACED = 0  # place index of networks without coordinates
_MASK64 = (1 << 64) - 1
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_DOT_TIE = 1e-9
CHUNK = 1 << 15  # runs per C-level step of a build: the GIL can change hands between steps  # dot products closer than this are ranked with the haversine itself

# special-purpose blocks no GeoIP database places (as geodns.nearest)
SPECIAL_V4 = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
              "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")
V4_INDEX_SHIFT = 16  # RegionMap.v4_index: one slot per /16
V4_INDEX_SLOTS = 1 << (32 - V4_INDEX_SHIFT)
SPECIAL_V6 = ("::/127", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7",
              "fe80::/10", "ff00::/8")


@dataclass(frozen=True, slots=True)
class Networks:
    """Stage 1: the database as runs of adjacent networks with one place each."""

    latitudes: array  # 'd', place index -> latitude; index 0 (UNPLACED) holds NaN
    longitudes: array  # 'd'
    v4_starts: array  # 'I', sorted, first entry 0
    v4_places: array  # 'I', place index per run
    v6_hi: array  # 'Q', upper halves of the run starts (sorted, first entry 0)
    v6_lo: array  # 'Q', lower halves
    v6_places: array  # 'I', place index per run, or alias_base + i: follows into IPv4 (v6_aliases[i])
    v6_aliases: tuple[int, ...]  # index -> prefix length where the IPv4 address starts
    build_epoch: int
    database_type: str
    path: str
    leaves: int  # database networks walked

    @property
    def alias_base(self) -> int:
        return len(self.latitudes)

    @property
    def places(self) -> list[tuple[float, float] | None]:
        """index -> (latitude, longitude), None for UNPLACED."""
        return [None] + list(zip(self.latitudes[1:], self.longitudes[1:], strict=True))

    @property
    def v6_starts(self) -> list[int]:
        return [hi << 64 | lo for hi, lo in zip(self.v6_hi, self.v6_lo, strict=True)]

    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.latitudes, self.longitudes, self.v4_starts, self.v4_places,
                                                  self.v6_hi, self.v6_lo, self.v6_places))


@dataclass(frozen=True, slots=True)
class RegionSite:
    name: str
    latitude: float
    longitude: float


# -- stage 1: the database ----------------------------------------------------------------------


def _node_arrays(tree: bytes, record_size: int, node_count: int) -> tuple[array, array]:
    """Left and right child records of every node, decoded with C-speed byte shuffles."""
    left, right = array("I"), array("I")
    if record_size == 24:
        width = 6
        cols = [tree[i::width] for i in range(width)]
        zero = bytes(node_count)
        lparts = (zero, cols[0], cols[1], cols[2])
        rparts = (zero, cols[3], cols[4], cols[5])
    elif record_size == 28:
        width = 7
        cols = [tree[i::width] for i in range(width)]
        hi = bytes.maketrans(bytes(range(256)), bytes(b >> 4 for b in range(256)))
        lo = bytes.maketrans(bytes(range(256)), bytes(b & 0x0F for b in range(256)))
        lparts = (cols[3].translate(hi), cols[0], cols[1], cols[2])
        rparts = (cols[3].translate(lo), cols[4], cols[5], cols[6])
    elif record_size == 32:
        width = 8
        cols = [tree[i::width] for i in range(width)]
        lparts = (cols[0], cols[1], cols[2], cols[3])
        rparts = (cols[4], cols[5], cols[6], cols[7])
    else:
        raise ValueError(f"record size {record_size} is not 24, 28 or 32 bits")
    for out, parts in ((left, lparts), (right, rparts)):
        big = bytearray(4 * node_count)
        for k, part in enumerate(parts):
            big[k::4] = part
        out.frombytes(bytes(big))
        if array("I", [1]).tobytes()[0] == 1:  # little-endian host: the bytes above are big-endian
            out.byteswap()
    return left, right


def _walk(left: array, right: array, node_count: int, root: int, bits: int, stop: int,
          emit_start: list[int] | array, emit_rec: list[int] | array) -> int:
    """Leaves under `root` (a `bits`-bit space) in address order; a record equal to `stop` (the
    IPv4 tree, seen from IPv6) is an alias leaf, emitted as minus its depth. Adjacent leaves with
    the same record are emitted once. Returns the number of leaves."""
    stack = [(root, 0, 0)]
    pop, push = stack.pop, stack.append
    add_start, add_rec = emit_start.append, emit_rec.append
    last = None
    leaves = 0
    while stack:
        rec, depth, start = pop()
        if rec < node_count and rec != stop:
            depth += 1
            push((right[rec], depth, start | (1 << (bits - depth))))
            push((left[rec], depth, start))
            continue
        leaves += 1
        value = rec if rec != stop else -depth
        if value != last:
            add_start(start)
            add_rec(value)
            last = value
    return leaves


def read_networks(path: str | Path) -> Networks:
    """Walk the City database at `path` (stage 1)."""
    path = str(path)
    try:
        reader = maxminddb.open_database(path)
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ValueError(f"cannot open GeoIP database {path}: {exc}") from None
    try:
        meta = reader.metadata()
        if "City" not in meta.database_type:
            raise ValueError(f"{path} is a {meta.database_type} database, a City database is needed")
        node_count, record_size = meta.node_count, meta.record_size
        tree_size = node_count * record_size // 4
        with open(path, "rb") as f:
            tree = f.read(tree_size)
        if len(tree) != tree_size:
            raise ValueError(f"{path} is shorter than its search tree")
        left, right = _node_arrays(tree, record_size, node_count)
        del tree
        v6 = meta.ip_version == 6
        ipv4_root = 0
        if v6:
            for _ in range(96):
                if ipv4_root >= node_count:
                    break
                ipv4_root = left[ipv4_root]
        starts4: array | list[int] = array("I")
        recs4: array | list[int] = array("I")
        leaves = 0
        if ipv4_root < node_count:
            leaves += _walk(left, right, node_count, ipv4_root, 32, -1, starts4, recs4)
        else:  # the whole IPv4 space is one record
            starts4, recs4 = array("I", [0]), array("I", [ipv4_root])
        starts6: list[int] = []
        recs6: list[int] = []
        if v6:
            leaves += _walk(left, right, node_count, 0, 128, ipv4_root, starts6, recs6)
        del left, right
        # one address of each distinct record, to read its place through the reader
        first: dict[int, bytes] = {}
        for start, rec in zip(starts4, recs4, strict=True):
            if rec > node_count and rec not in first:
                first[rec] = start.to_bytes(4, "big")
        for start, rec in zip(starts6, recs6, strict=True):
            if rec > node_count and rec not in first:
                first[rec] = start.to_bytes(16, "big")
        places: list[tuple[float, float] | None] = [None]
        place_of_coords: dict[tuple[float, float], int] = {}
        place_of_rec: dict[int, int] = {node_count: UNPLACED}
        get = reader.get
        for rec, packed in first.items():
            where = _location(get(socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6,
                                                   packed)))
            if where is None:
                idx = UNPLACED
            else:
                idx = place_of_coords.get(where)
                if idx is None:
                    idx = place_of_coords[where] = len(places)
                    places.append(where)
            place_of_rec[rec] = idx
        del first
        place = place_of_rec.__getitem__
        p4 = array("I", map(place, recs4))
        del recs4
        starts4, p4 = _overlay(starts4, p4, _ranges(SPECIAL_V4), UNPLACED, 1 << 32)
        starts4, p4 = merge_runs(starts4, p4)
        alias_of: dict[int, int] = {}
        p6: list[int] = []
        for r in recs6:
            if r < 0:  # alias of the IPv4 tree at depth -r
                p6.append(-1 - alias_of.setdefault(-r, len(alias_of)))
            else:
                p6.append(place(r))
        base = len(places)
        p6 = [v if v >= 0 else base + (-1 - v) for v in p6]
        starts6, p6 = _overlay(starts6 or [0], array("I", p6 or [UNPLACED]), _ranges(SPECIAL_V6), UNPLACED, 1 << 128)
        starts6, p6 = merge_runs(starts6, p6)
        aliases = [0] * len(alias_of)
        for depth, i in alias_of.items():
            aliases[i] = depth
        lats = array("d", [math.nan] + [w[0] for w in places[1:]])  # type: ignore[index]
        lons = array("d", [math.nan] + [w[1] for w in places[1:]])  # type: ignore[index]
        return Networks(lats, lons, starts4, p4, array("Q", (x >> 64 for x in starts6)),
                        array("Q", (x & _MASK64 for x in starts6)), p6,
                        tuple(aliases), meta.build_epoch, meta.database_type, path, leaves)
    finally:
        reader.close()


def _location(record: object) -> tuple[float, float] | None:
    """(latitude, longitude) of a City record, as `geodns.nearest` reads it."""
    loc = record.get("location") if isinstance(record, dict) else None
    if not isinstance(loc, dict):
        return None
    lat, lon = loc.get("latitude"), loc.get("longitude")
    if not isinstance(lat, (int, float)) or not isinstance(lon, (int, float)):
        return None
    return (lat, lon)


def _ranges(cidrs: Iterable[str]) -> list[tuple[int, int]]:
    out = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        out.append((int(net.network_address), int(net.broadcast_address) + 1))
    return sorted(out)


def _overlay(starts: Sequence[int], values: array, ranges: list[tuple[int, int]], value: int, end: int
             ) -> tuple[Sequence[int], array]:
    """Runs (starts, values) over [0, end) with each [lo, hi) range of `ranges` set to `value`
    (arrays stay arrays, lists stay lists)."""
    for lo, hi in ranges:
        i = bisect_right(starts, lo) - 1  # the run holding lo
        j = bisect_right(starts, hi - 1) - 1  # the run holding hi - 1
        head = i + 1 if starts[i] < lo else i
        tail_s: list[int] = []
        tail_v: list[int] = []
        if hi < end and (j + 1 >= len(starts) or starts[j + 1] != hi):
            tail_s, tail_v = [hi], [values[j]]
        mid = starts[:0]
        mid.extend([lo] + tail_s)  # type: ignore[attr-defined]
        starts = starts[:head] + mid + starts[j + 1:]  # type: ignore[operator]
        values = values[:head] + array(values.typecode, [value] + tail_v) + values[j + 1:]
    return starts, values


def merge_runs(starts: Sequence[int], values: array) -> tuple[Sequence[int], array]:
    """Adjacent runs with the same value merged (C-speed iteration, no per-run list); the same
    `values` merge any other column of the runs alike (IPv6 starts' two halves). Worked in
    chunks of `CHUNK` runs, so that a build in a thread lets the event loop run in between."""
    n = len(values)
    if n < 2:
        return starts, values
    changed = bytearray(b"\1")  # one octet per run: starts a new block
    for i in range(1, n, CHUNK):
        j = min(n, i + CHUNK)
        changed += bytes(map(ne, values[i:j], values[i - 1:j - 1]))
    kept_starts: Sequence[int] = array(starts.typecode) if isinstance(starts, array) else []
    kept_values = array(values.typecode)
    for i in range(0, n, CHUNK):
        kept_starts.extend(compress(starts[i:i + CHUNK], changed[i:i + CHUNK]))  # type: ignore[attr-defined]
        kept_values.extend(compress(values[i:i + CHUNK], changed[i:i + CHUNK]))
    return kept_starts, kept_values


def mapped(table: Sequence[int], keys: array) -> array:
    """array('I') of table[k] for each k of `keys`, in chunks (see `merge_runs`)."""
    out = array("I")
    get = table.__getitem__
    for i in range(0, len(keys), CHUNK):
        out.extend(map(get, keys[i:i + CHUNK]))
    return out


# -- stage 2: the regions ---------------------------------------------------------------------

ALIAS = 1 << 31  # a block value with this bit set follows into the IPv4 map (alias index below)


def rank_places(places: Sequence[tuple[float, float] | None], sites: Sequence[RegionSite],
                default_region: str = "") -> tuple[list[tuple[str, ...]], array]:
    """The distinct rankings (region names nearest first) and the ranking index of each place.

    Distances are compared as dot products of unit vectors (the haversine is monotone in
    them); where two regions are within `_DOT_TIE` of each other the place is ranked with
    `great_circle_km` and names, exactly as `geodns.nearest.region_order`."""
    sites = sorted(sites, key=lambda s: s.name)
    names = tuple(s.name for s in sites)
    units = [_unit(s.latitude, s.longitude) for s in sites]
    indices = range(len(sites))
    rankings: list[tuple[str, ...]] = []
    index_of: dict[tuple[str, ...], int] = {}
    home = next((s for s in sites if s.name == default_region), None)

    def exact(lat: float, lon: float) -> tuple[str, ...]:
        return tuple(s.name for s in sorted(sites, key=lambda s: (
            great_circle_km(lat, lon, s.latitude, s.longitude), s.name)))

    out = array("I")
    for where in places:
        if where is None:
            ranking = exact(home.latitude, home.longitude) if home is not None else names
        else:
            x, y, z = _unit(*where)
            dots = [x * ux + y * uy + z * uz for ux, uy, uz in units]
            order = sorted(indices, key=lambda k: (-dots[k], k))
            near_tie = any(dots[order[k]] - dots[order[k + 1]] < _DOT_TIE for k in range(len(order) - 1))
            ranking = exact(*where) if near_tie else tuple(names[k] for k in order)
        idx = index_of.get(ranking)
        if idx is None:
            idx = index_of[ranking] = len(rankings)
            rankings.append(ranking)
        out.append(idx)
    return rankings, out


def _unit(lat: float, lon: float) -> tuple[float, float, float]:
    p, lam = math.radians(lat), math.radians(lon)
    return (math.cos(p) * math.cos(lam), math.cos(p) * math.sin(lam), math.sin(p))


@dataclass(frozen=True, slots=True)
class RegionMap:
    """Stage 2: blocks of addresses with one ranking each. Immutable; look up with `lookup`."""

    rankings: tuple[tuple[str, ...], ...]
    v4_starts: array  # 'I'
    v4_ranks: array  # 'I'
    v6_hi: array  # 'Q', upper halves of the block starts
    v6_lo: array  # 'Q', lower halves
    v6_ranks: array  # 'I'; ALIAS | i: the IPv4 address starts at bit v6_aliases[i]
    v6_aliases: tuple[int, ...]
    sites: tuple[RegionSite, ...]
    default_region: str
    build_epoch: int
    database_type: str
    # /16 -> index of the first IPv4 block starting at or after it (V4_INDEX_SLOTS + 1 entries): a
    # look-up bisects only the blocks of its /16 (a handful) instead of all million of them
    v4_index: array = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "v4_index", v4_index(self.v4_starts))

    @property
    def blocks(self) -> int:
        return len(self.v4_starts) + len(self.v6_hi)

    def nbytes(self) -> int:
        """Bytes held by the arrays (the rankings table is small beside them)."""
        return sum(a.itemsize * len(a) for a in (self.v4_starts, self.v4_ranks, self.v6_hi, self.v6_lo,
                                                  self.v6_ranks, self.v4_index))

    def lookup(self, packed: bytes, prefix: int | None = None) -> tuple[tuple[str, ...], int]:
        """(ranking, scope) of `packed` (4 or 16 octets) taken as a /`prefix` network."""
        rank, scope = self.locate(packed, prefix)
        return self.rankings[rank], scope

    def locate(self, packed: bytes, prefix: int | None = None) -> tuple[int, int]:
        """(ranking index, scope) of `packed` taken as a /`prefix` network (default: the whole
        address)."""
        a = int.from_bytes(packed, "big")
        if len(packed) == 4:
            return self.locate_v4(a, 32 if prefix is None else prefix)
        if prefix is not None and prefix < 128:
            a = a >> (128 - prefix) << (128 - prefix)
        return self._v6(a)

    def locate_v4(self, a: int, prefix: int) -> tuple[int, int]:
        """(ranking index, scope) of the IPv4 address `a` (an int) taken as a /`prefix` network:
        the answer path's hot spot (`Responder._fast` calls it straight from the query's bytes),
        `_scope` inlined."""
        if prefix < 32:
            a = a >> (32 - prefix) << (32 - prefix)
        starts, index = self.v4_starts, self.v4_index
        top = a >> V4_INDEX_SHIFT
        i = bisect_right(starts, a, index[top], index[top + 1]) - 1
        lo = starts[i]
        k = (a ^ (lo - 1)).bit_length() - 1 if lo else 32
        if i + 1 < len(starts):
            hi = (a ^ starts[i + 1]).bit_length() - 1
            if hi < k:
                k = hi
        return self.v4_ranks[i], 32 - k

    def _v6(self, a: int) -> tuple[int, int]:
        his, los = self.v6_hi, self.v6_lo
        qhi, qlo = a >> 64, a & _MASK64
        j = bisect_right(his, qhi)
        i = bisect_left(his, qhi, 0, j)
        if i < j:  # blocks start inside this /64: place by the lower half among them
            k = bisect_right(los, qlo, i, j)
            idx = k - 1 if k > i else i - 1
        else:
            idx = j - 1
        start = his[idx] << 64 | los[idx]
        end = (his[idx + 1] << 64 | los[idx + 1]) if idx + 1 < len(his) else 1 << 128
        scope = _scope(a, start, end, 128)
        rank = self.v6_ranks[idx]
        if rank & ALIAS:
            depth = self.v6_aliases[rank & ~ALIAS]
            v4 = (a >> (96 - depth)) & 0xFFFFFFFF
            rank, scope4 = self.locate_v4(v4, 32)
            scope = max(scope, min(128, depth + scope4))
        return rank, scope


def v4_index(starts: Sequence[int]) -> array:
    """For each /16 p (and one past the last), the index of the first of the sorted `starts` at or
    after p's first address: every block holding an address of p is among starts[index[p] - 1 :
    index[p + 1]], so `bisect_right(starts, a, index[p], index[p + 1]) - 1` equals
    `bisect_right(starts, a) - 1` for any `a` in p."""
    return array("I", (bisect_left(starts, p << V4_INDEX_SHIFT) for p in range(V4_INDEX_SLOTS + 1)))


def _scope(a: int, lo: int, hi: int, bits: int) -> int:
    """The shortest prefix length p such that the /p network holding `a` lies in [lo, hi)."""
    k_lo = (a ^ (lo - 1)).bit_length() - 1 if lo else bits
    k_hi = (a ^ hi).bit_length() - 1
    return bits - min(k_lo, k_hi, bits)


def compile_map(networks: Networks, sites: Iterable[RegionSite], default_region: str = "") -> RegionMap:
    """Stage 2: rank every place against `sites`, merge adjacent blocks with the same ranking."""
    sites = tuple(sorted(sites, key=lambda s: s.name))
    rankings, rank_of_place = rank_places(networks.places, sites, default_region)
    base = networks.alias_base
    rank_of_place.extend(ALIAS | i for i in range(len(networks.v6_aliases)))
    v4_starts, v4_ranks = merge_runs(networks.v4_starts, mapped(rank_of_place, networks.v4_places))
    assert len(rank_of_place) == base + len(networks.v6_aliases)
    v6_values = mapped(rank_of_place, networks.v6_places)
    v6_hi, v6_ranks = merge_runs(networks.v6_hi, v6_values)
    v6_lo, _ = merge_runs(networks.v6_lo, v6_values)
    return RegionMap(tuple(rankings), v4_starts, v4_ranks, v6_hi, v6_lo, v6_ranks, networks.v6_aliases, sites,
                     default_region, networks.build_epoch, networks.database_type)


def sites_of(regions: Iterable[object]) -> tuple[RegionSite, ...]:
    """The (name, latitude, longitude) of regions (anything with those attributes), by name."""
    return tuple(sorted((RegionSite(r.name, r.latitude, r.longitude) for r in regions),  # type: ignore[attr-defined]
                        key=lambda s: s.name))
