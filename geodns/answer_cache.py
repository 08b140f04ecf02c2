"""The answer path's cache tiers, one class each, named for what they hold. No I/O.

A query meets them in this order (`geodns.answer.Responder` drives them; `geodns.pipeline` asks
the first one before `Responder.answer` runs):

1. `ReplyCache` -- *exact reply bytes*: the whole reply minus its ID, keyed by the query's bytes
   after the ID. Only replies that depend on those bytes alone (no client address involved) are
   kept, on the second sight of the query (a doorkeeper of `SEEN_MAX` hashes). A hit only
   patches the ID.
2. `TemplateCache` -- *packed answer templates* (`Template`): a reply minus what each query
   brings (ID, RD/CD, the question with its case, the OPT), keyed by what the answer depends on.
   Three key spaces share its byte bound:
   - `for_question`: by the parsed question (lowercased name, type, class, RD/CD, size limit,
     EDNS shape). Holds the template itself when the answer is the same for every client, or a
     `GeoMarker` when it depends on where the client is;
   - `for_place`: by question and client place (the region map's ranking, or the GeoIP network);
     answers to clients placed by their Client Subnet through the region map are kept in the
     `GeoMarker`'s slot for their ranking instead (`GeoMarker.by_rank`);
   - `for_region`: by question and chosen region: places that end up in the same region share
     one packed answer (only the ECS scope differs).
3. `RegionOrders` -- a memo, not bytes: the view's regions nearest first, per client location
   (GeoIP look-up) or per region-map ranking.

The two byte-holding tiers are `geodns.cache.BoundedCache`s (the byte and entry bounds live
there). All three start empty when the region map changes, and when a new view changes what
every answer shares (the zone, the regions and their gateways, readiness); a view that changes
only apps, instances or TXT records keeps the templates of the names whose answers it leaves as
they were (`Responder.set_view`), and the reply cache starts empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from geodns import zone as zonemod
from geodns.cache import BoundedCache
from geodns.nearest import Place, region_order
from geodns.view import RegionView, View

SEEN_MAX = 65536  # query hashes the reply cache's doorkeeper remembers (emptied when full)
# accounted per entry on top of the octets it holds: object headers, the tuple, the dict slot
EXACT_OVERHEAD = 176
ANSWER_OVERHEAD = 560
RANK_SLOT = 8  # a GeoMarker's slot per ranking of the region map
ORDERS_MAX = 65536  # region orders memoised per location before the memo starts over

Question = tuple  # (name lowercased, qtype, qclass, RD|CD, size limit, EDNS shape)


@dataclass(frozen=True, slots=True)
class Template:
    """A packed answer minus what each query brings (ID, RD/CD, question, OPT)."""

    flags: int
    an: int
    ns: int
    ar: int  # without the OPT
    body: bytes
    ext_rcode: int
    scope: int  # ECS scope prefix to report
    index: int
    reusable: bool  # the answer depends on the query bytes only
    rcode: int
    region: str
    rotate: tuple[bytes, ...] = ()  # the answer's A/AAAA records, rotated per answer (body holds the rest)
    # for the fast path (`Responder._fast`), packed once: the header after the ID for the RD/CD
    # bits of the question it was built for (they are part of every key that finds it), ARCOUNT
    # counting the OPT; the OPT up to its options, for a reply echoing a Client Subnet option of
    # that question's shape (also part of the key); and the answer section in each rotation
    # followed by `body` (empty when there is one order or too many to keep)
    fast_head: bytes = b""
    fast_opt: bytes = b""
    bodies: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class GeoMarker:
    """`for_question` marker: this name's answer depends on where the client is.

    `by_rank` holds, per ranking of the region map (its index), the template of the answers to
    clients placed by their Client Subnet (reusable answers), filled as they are built: one list
    index instead of a key tuple and a second dict look-up per query, and nothing to turn the
    cache's generations over (the number of rankings times the number of names may be far more
    entries than a generation holds). Empty without a region map; the list is accounted whole."""

    target: zonemod.AppName
    by_rank: list[Template | None]
    # the ranks whose slot holds an answer without records (NODATA: it carries the view's SOA),
    # noted when the slot is filled, so that a view change drops them without a pass over every slot
    negative: set[int] = field(default_factory=set)


def _reply_size(key: bytes, value: tuple[bytes, int]) -> int:
    return len(key) + len(value[0]) + EXACT_OVERHEAD


def _template_size(key: object, value: object) -> int:
    """Every key starts with the question tuple, whose first item is the name."""
    base = key[0] if isinstance(key, tuple) and isinstance(key[0], tuple) else key
    name = base[0] if isinstance(base, tuple) else b""
    if isinstance(value, GeoMarker):
        return len(name) + RANK_SLOT * len(value.by_rank) + ANSWER_OVERHEAD
    if isinstance(value, Template):
        return len(name) + len(value.body) + sum(map(len, value.bodies)) + ANSWER_OVERHEAD
    return len(name) + ANSWER_OVERHEAD


class ReplyCache(BoundedCache[bytes, tuple[bytes, int]]):
    """Tier 1, exact reply bytes: query bytes after the ID -> (reply bytes after the ID, stats
    index). `current.get(key)` is the cheapest look-up (the UDP pipeline's first stage); `get`
    also finds and promotes the previous generation. `keep` stores on the second sight."""

    __slots__ = ("_seen",)

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        super().__init__(max_bytes, max_entries, _reply_size)
        self._seen: set[int] = set()

    def keep(self, data: bytes, wire: bytes, index: int) -> None:
        """Keep the reply `wire` to the query `data` on the second sight of the query bytes (a
        doorkeeper: traffic that never repeats costs a hash and a set entry, not a cache entry,
        and does not turn the generations over)."""
        self.keep_key(data[2:], wire, index)

    def keep_key(self, key: bytes, wire: bytes, index: int) -> None:
        """`keep` with the query's bytes after the ID already cut (`key`, whose hash the look-up
        before it has computed and the bytes object keeps)."""
        seen = self._seen
        h = hash(key)
        if h in seen:
            self.put(key, (wire[2:], index))
        else:
            if len(seen) >= SEEN_MAX:
                seen.clear()
            seen.add(h)

    def reset(self) -> None:
        super().reset()
        self._seen = set()


class TemplateCache:
    """Tier 2, packed answer templates, in three key spaces under one byte bound (see the
    module's docstring). `store.current` is read directly by the template fast path."""

    __slots__ = ("store",)

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.store: BoundedCache[object, object] = BoundedCache(max_bytes, max_entries, _template_size)

    def for_question(self, q: Question) -> Template | GeoMarker | None:
        return self.store.get(q)  # type: ignore[return-value]

    def put_question(self, q: Question, value: Template | GeoMarker) -> None:
        self.store.put(q, value)

    def for_place(self, q: Question, where: object, detail: object) -> Template | None:
        """`where, detail`: (map ranking, reusable) or (GeoIP network, its prefix)."""
        entry = self.store.get((q, where, detail))
        return entry if isinstance(entry, Template) else None

    def put_place(self, q: Question, where: object, detail: object, entry: Template) -> None:
        self.store.put((q, where, detail), entry)

    def for_region(self, q: Question, region: str, reusable: bool) -> Template | None:
        entry = self.store.get((q, region, reusable))
        return entry if isinstance(entry, Template) else None

    def put_region(self, q: Question, region: str, reusable: bool, entry: Template) -> None:
        self.store.put((q, region, reusable), entry)

    def reset(self) -> None:
        self.store.reset()

    def retain(self, keep_name: Callable[[bytes], bool], keep_template: Callable[[Template], bool]) -> int:
        """Keep the entries of the names for which `keep_name(name)` is true (`name`: the
        question's lowercased wire name), and of those only the templates for which
        `keep_template` is true. A `GeoMarker` stays (its target is the name's) without its
        `negative` slots: the caller notes there the slots whose template `keep_template`
        refuses. Returns the number of entries dropped."""
        def entry(key: object, value: object) -> object | None:
            base = key[0] if isinstance(key[0], tuple) else key  # type: ignore[index]
            if not keep_name(base[0]):  # type: ignore[index]
                return None
            if isinstance(value, GeoMarker):
                for rank in value.negative:
                    value.by_rank[rank] = None
                value.negative.clear()
                return value
            return value if keep_template(value) else None  # type: ignore[arg-type]
        return self.store.retain(entry)

    @property
    def bytes(self) -> int:
        return self.store.bytes

    @property
    def evictions(self) -> int:
        return self.store.evictions

    def __len__(self) -> int:
        return len(self.store)


class RegionOrders:
    """Tier 3, a memo: the view's regions nearest first, per GeoIP location (`for_place`) or per
    region-map ranking (`for_rank`). Bound to one view; `reset(view)` starts over."""

    __slots__ = ("view", "_by_place", "_by_rank")

    def __init__(self, view: View) -> None:
        self.reset(view)

    def rebind(self, view: View) -> None:
        """Answer for `view`, whose regions equal those of the current view: the memo stays."""
        self.view = view

    def reset(self, view: View) -> None:
        self.view = view
        self._by_place: dict[tuple[float, float] | None, list[RegionView]] = {}
        self._by_rank: dict[int, list[RegionView]] = {}

    def for_place(self, place: Place) -> list[RegionView]:
        where = (place.latitude, place.longitude) if place.known else None
        order = self._by_place.get(where)  # type: ignore[arg-type]
        if order is None:
            if len(self._by_place) >= ORDERS_MAX:
                self._by_place.clear()
            view = self.view
            order = self._by_place[where] = region_order(view.regions, place, view.zone.default_region)  # type: ignore[index]
        return order

    def for_rank(self, rank: int, ranking: tuple[str, ...]) -> list[RegionView]:
        """A map ranking as this view's regions: regions the view no longer has are skipped,
        regions the map does not know yet (it is being rebuilt) come last, by name."""
        order = self._by_rank.get(rank)
        if order is None:
            regions = self.view.regions
            order = [regions[name] for name in ranking if name in regions]
            if len(order) < len(regions):
                known = set(ranking)
                order += sorted((r for r in regions.values() if r.name not in known), key=lambda r: r.name)
            self._by_rank[rank] = order
        return order
