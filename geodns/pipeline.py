"""The per-datagram UDP policy: one ordered list of stages that both UDP transports run.

`STAGES` is the order, as CoreDNS's `plugin.cfg` is: a datagram's bytes go in, the reply bytes
(or None: send nothing) come out, and nothing else decides what a UDP client gets. The stages:

1. `reply_cache`: the reply cache's current generation (`answer_cache.ReplyCache`, exact reply
   bytes); a hit only patches the ID and skips `answer`. Off with `--no-reply-cache` and with
   the query log (every query then goes through `answer`, which logs it);
2. `answer`: `Responder.answer`, the choke point (parse, template cache, lookup, packing,
   truncation to the client's UDP limit); for a datagram the kernel cut at
   `wire.MAX_QUERY_OCTETS` (or one over it), `Responder.oversize`: FORMERR from its header;
3. `stats`: the answer counted by its (rcode, region) index, in `fast` (reply-cache hits) or
   `slow` -- before rate limiting, so a limited answer is still a query answered;
4. `rrl`: response rate limiting per client network (`geodns.rrl`, on with `--rrl-rate`): a
   dropped reply is counted in `rrl{action="drop"}` and nothing is sent;
5. `truncate`: RRL's slip -- the reply is replaced by a TC reply carrying only the question, so
   a real client retries over TCP (counted in `rrl{action="slip"}`);
6. `fit`: a reply longer than the transport can send (its send slot) is dropped and counted in
   `dropped`.

The client's address is decoded only by the stages that need it (`answer` and `rrl`): a
transport passes an opaque `src` (the batch's slot number, or asyncio's address tuple) and a
`client_of(src)` that packs it. RRL reads `clock` (time.monotonic unless a test fixes it).

The hot path keeps its cost by inlining the list at build time: `UdpPipeline` joins the source
of the stages that are on (`Stage.code`) into one function, compiled once per transport, so a
reply-cache hit costs one call and no per-stage dispatch. `UdpPipeline.source` shows what runs.
A new stage (say DNS cookies) is one entry in `STAGES`, and it applies to both transports.
"""

from __future__ import annotations

import linecache
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from geodns.answer import Responder
from geodns.rrl import Action, RateLimiter
from geodns.stats import Stats

MAX_UDP_REPLY = 65507  # the most a UDP datagram over IPv4 carries

Handler = Callable[[bytes, Any], "bytes | None"]


@dataclass(frozen=True, slots=True)
class Settings:
    """What decides which stages are on; the environment their code runs in is built from it."""

    responder: Responder
    stats: Stats
    rrl: RateLimiter | None
    client_of: Callable[[Any], bytes]
    max_reply: int
    clock: Callable[[], float]

    @property
    def reply_cache(self) -> bool:
        r = self.responder
        return r.exact.enabled and not r.log_queries


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of the policy. `code` runs with the locals `data` (the datagram, or the header of
    a cut one), `src`, `reply` (None until a stage has one), `index` and `counter`; it may
    `return None` to send nothing. `cut` replaces `code` for a cut datagram ("" skips it)."""

    name: str
    code: str
    on: Callable[[Settings], bool]
    cut: str | None = None


def _always(_: Settings) -> bool:
    return True


STAGES: tuple[Stage, ...] = (
    Stage("reply_cache", """
        hit = exact.current.get(data[2:])
        if hit is not None:
            reply = data[:2] + hit[0]
            index = hit[1]
            counter = fast
        """, lambda s: s.reply_cache, cut=""),
    Stage("answer", """
        if reply is None:
            ans = answer(data, client_of(src))
            reply = ans.wire
            if reply is None:
                return None
            index = ans.index
            counter = slow
        """, _always, cut="""
        ans = oversize(data, client_of(src))
        reply = ans.wire
        if reply is None:
            return None
        index = ans.index
        counter = slow
        """),
    Stage("stats", """
        counter[index] += 1
        """, _always),
    Stage("rrl", """
        action = check(client_of(src), monotonic())
        if action is DROP:
            rrl_counts["drop"] += 1
            return None
        """, lambda s: s.rrl is not None),
    Stage("truncate", """
        if action is SLIP:
            rrl_counts["slip"] += 1
            reply = truncated(data)
            if reply is None:
                return None
        """, lambda s: s.rrl is not None),
    Stage("fit", """
        if len(reply) > max_reply:
            stats.dropped += 1
            return None
        """, _always),
)


def _environment(s: Settings) -> dict[str, Any]:
    r, stats = s.responder, s.stats
    return {"exact": r.exact, "answer": r.answer, "oversize": r.oversize, "truncated": r.truncated,
            "fast": stats.fast, "slow": stats.slow, "stats": stats, "rrl_counts": stats.rrl,
            "check": s.rrl.check if s.rrl is not None else None, "monotonic": s.clock,
            "DROP": Action.DROP, "SLIP": Action.SLIP, "client_of": s.client_of, "max_reply": s.max_reply}


def _compose(name: str, parts: list[tuple[str, str]]) -> str:
    lines = [f"def {name}(data, src):", "    reply = None"]
    for stage, code in parts:
        lines.append(f"    # -- {stage}")
        lines += ["    " + line if line else "" for line in textwrap.dedent(code).strip("\n").splitlines()]
    lines.append("    return reply")
    return "\n".join(lines) + "\n"


class UdpPipeline:
    """`STAGES` built for one transport: `reply(data, src)` for a datagram, `reply_cut(header,
    src)` for one the kernel cut (or that is over `wire.MAX_QUERY_OCTETS`)."""

    def __init__(self, responder: Responder, stats: Stats, rrl: RateLimiter | None,
                 client_of: Callable[[Any], bytes], *, max_reply: int = MAX_UDP_REPLY,
                 clock: Callable[[], float] = time.monotonic, stages: tuple[Stage, ...] = STAGES) -> None:
        settings = Settings(responder, stats, rrl, client_of, max_reply, clock)
        active = [st for st in stages if st.on(settings)]
        self.stages = tuple(st.name for st in active)
        self.max_reply = max_reply
        whole = [(st.name, st.code) for st in active]
        cut = [(st.name, st.code if st.cut is None else st.cut) for st in active if st.cut != ""]
        self.source = _compose("reply", whole) + "\n\n" + _compose("reply_cut", cut)
        filename = f"<geodns.pipeline {'+'.join(self.stages)} #{id(self):x}>"
        namespace = _environment(settings)
        exec(compile(self.source, filename, "exec"), namespace)  # noqa: S102 - our own stage list, see above
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        self.reply: Handler = namespace["reply"]
        self.reply_cut: Handler = namespace["reply_cut"]


__all__ = ["MAX_UDP_REPLY", "STAGES", "Settings", "Stage", "UdpPipeline"]
