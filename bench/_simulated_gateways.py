"""Simulated gateways for bench/mesh_convergence.py: many real GatewayControl sessions in one process.

A worker process holds a share of the N simulated gateways. Each has its own mTLS identity
(certificate CN = gateway name, as the coordinator requires), its own gRPC channel, registers,
keeps one `GatewayControl.Session` stream open with a heartbeat every `hb` seconds, and reads
every `SessionDown` as raw bytes, so the size recorded is exactly the serialized message. No
WireGuard: the peers are only recorded.

The orchestrator drives workers with JSON lines on stdin; replies are JSON lines on stdout:

    {"op": "register", "target", "pki", "gateways": [{"name", "region", "i"}]}
                                      Register each gateway                       -> registered
                                      (with "revision": the highest revision the registrations made)
    {"op": "open", "hb", "last_revision", "timeout", "rate"}
                                      open every session (a snapshot when last_revision is 0, else
                                      only what changed after it, as a reconnecting agent gets); a
                                      session is open once its gateway has seen itself alive -> opened
    {"op": "arm", "joiner"}           start counting bytes for a join             -> armed
                                      ...then, once every gateway here has the joiner as a peer and
                                      has seen it alive in its routing table:    -> joined
    {"op": "collect"}                 report an unfinished join now              -> joined (complete: false)
    {"op": "close"}                   end sessions, close channels                -> closed
    {"op": "exit"}

Times are `time.monotonic_ns()`, the same clock in every process of this host.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.pki import Pki

SESSION = "/geomesh.v1.GatewayControl/Session"
CONCURRENCY = 16        # registrations in flight per worker
OPEN_CONCURRENCY = 64   # sessions being opened at once per worker
OPEN_ATTEMPTS = 3       # a session that fails before its gateway is alive is opened again


def enroll_request(name: str, region: str, i: int) -> pb.Enrollment:
    """The enrollment `register_request` needs (an admin call before the gateway registers)."""
    return pb.Enrollment(name=name, region=region, public_ips=[f"192.0.2.{i % 254 + 1}"])


def register_request(name: str, region: str, i: int) -> pb.RegisterRequest:
    """A valid registration for simulated gateway number `i` (addresses are data only: no traffic)."""
    key = base64.b64encode((i + 1).to_bytes(32, "big")).decode()
    return pb.RegisterRequest(name=name, region=region, public_ip=f"192.0.2.{i % 254 + 1}", wg_port=20000 + i % 40000,
                              wg_public_key=key, proxy_port=8080)


@dataclass
class Gateway:
    name: str
    region: str
    i: int
    channel: grpc.aio.Channel | None = None
    call: grpc.aio.StreamStreamCall | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    first_bytes: int = 0
    alive_session: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str = ""
    # the current join
    peer_ns: int | None = None
    alive_ns: int | None = None
    bytes: int = 0
    msgs: int = 0


class Worker:
    def __init__(self) -> None:
        self.gateways: list[Gateway] = []
        self.joiner: str | None = None
        self.pending = 0
        self.target = ""
        self.pki: Pki | None = None

    def send(self, msg: dict) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def register(self, cmd: dict) -> None:
        self.target = cmd["target"]
        self.pki = Pki(Path(cmd["pki"]))
        self.gateways = [Gateway(g["name"], g["region"], g["i"]) for g in cmd["gateways"]]
        errors: list[str] = []
        sem = asyncio.Semaphore(CONCURRENCY)
        t0 = time.monotonic()
        revision = 0

        async def one(g: Gateway) -> None:
            nonlocal revision
            assert self.pki is not None
            async with sem:
                g.channel = client_channel(self.target, self.pki.identity("gateway", g.name))
                stub = pbg.GatewayControlStub(g.channel)
                for attempt in range(5):
                    try:
                        resp = await stub.Register(register_request(g.name, g.region, g.i), timeout=30)
                        revision = max(revision, resp.gateway.mod_revision)
                        return
                    except grpc.aio.AioRpcError as exc:
                        if attempt == 4:
                            errors.append(f"{g.name}: {exc.code().name} {exc.details()}")
                        await asyncio.sleep(0.2)

        await asyncio.gather(*(one(g) for g in self.gateways))
        self.send({"op": "registered", "seconds": time.monotonic() - t0, "errors": errors[:5],
                   "failed": len(errors), "revision": revision})

    async def open(self, cmd: dict) -> None:
        hb = float(cmd["hb"])
        last_revision = int(cmd.get("last_revision", 0))
        timeout = float(cmd.get("timeout", 120))
        rate = float(cmd.get("rate", 0))  # sessions per second from this worker; 0 = no limit
        sem = asyncio.Semaphore(OPEN_CONCURRENCY)
        t0 = time.monotonic()
        errors: list[str] = []
        retries = [0]

        async def one(k: int, g: Gateway) -> None:
            if rate > 0:
                await asyncio.sleep(k / rate)
            async with sem:
                assert g.channel is not None
                session = g.channel.stream_stream(SESSION, request_serializer=pb.SessionUp.SerializeToString,
                                                  response_deserializer=None)  # raw bytes: the exact size
                for attempt in range(OPEN_ATTEMPTS):  # a real agent reconnects too
                    if attempt:
                        retries[0] += 1
                        for t in g.tasks:
                            t.cancel()
                        g.ready, g.failed, g.first_bytes = asyncio.Event(), "", 0
                    g.call = session()
                    try:
                        await g.call.write(pb.SessionUp(hello=pb.SessionHello(name=g.name,
                                                                              last_revision=last_revision)))
                    except grpc.aio.AioRpcError as exc:
                        g.failed = f"{exc.code().name} {exc.details()}"
                        continue
                    g.tasks = [asyncio.create_task(self._read(g)), asyncio.create_task(self._heartbeats(g, hb))]
                    try:
                        await asyncio.wait_for(g.ready.wait(), max(t0 + timeout - time.monotonic(), 0.1))
                    except TimeoutError:
                        errors.append(f"{g.name}: not alive after {timeout}s")
                        return
                    if not g.failed:
                        g.alive_session = True
                        return
                errors.append(f"{g.name}: {g.failed} ({OPEN_ATTEMPTS} attempts)"[:200])

        await asyncio.gather(*(one(k, g) for k, g in enumerate(self.gateways)))
        self.send({"op": "opened", "seconds": time.monotonic() - t0, "failed": len(errors), "errors": errors[:5],
                   "retries": retries[0],
                   "first_bytes": [g.first_bytes for g in self.gateways if g.alive_session]})

    async def _heartbeats(self, g: Gateway, interval: float) -> None:
        # spread the heartbeats of many gateways over the interval
        await asyncio.sleep(interval * ((g.i * 0.618) % 1.0))
        while g.call is not None and not g.call.done():
            try:
                await g.call.write(pb.SessionUp(heartbeat=pb.Heartbeat(load=0.1)))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
                return
            await asyncio.sleep(interval)

    async def _read(self, g: Gateway) -> None:
        assert g.call is not None
        try:
            while True:
                raw = await g.call.read()
                if raw is grpc.aio.EOF:
                    break
                now = time.monotonic_ns()
                if not g.ready.is_set():
                    self._until_alive(g, raw)
                self._on_message(g, raw, now)
        except grpc.aio.AioRpcError as exc:
            g.failed = f"{exc.code().name} {exc.details()}"
            print(f"{time.strftime('%H:%M:%S')} {g.name}: session failed ({'open' if g.alive_session else 'opening'}): "
                  f"{g.failed} {exc.debug_error_string()[:300]}", file=sys.stderr, flush=True)
        except asyncio.CancelledError:
            pass
        g.failed = g.failed or "session ended"
        g.alive_session = False
        g.ready.set()

    @staticmethod
    def _until_alive(g: Gateway, raw: bytes) -> None:
        """Before the session counts as open: wait for the gateway's own record, alive."""
        if not g.first_bytes:
            g.first_bytes = len(raw)
        msg = pb.SessionDown.FromString(raw)
        if any(r.WhichOneof("kind") == "gateway" and r.gateway.name == g.name and r.gateway.alive
               for r in msg.routing.upserts):
            g.ready.set()

    def _on_message(self, g: Gateway, raw: bytes, now: int) -> None:
        joiner = self.joiner
        if joiner is None:
            return
        g.bytes += len(raw)
        g.msgs += 1
        if g.peer_ns is not None and g.alive_ns is not None:
            return
        msg = pb.SessionDown.FromString(raw)
        if g.peer_ns is None and any(p.name == joiner for p in msg.mesh.upserts):
            g.peer_ns = now
        if g.alive_ns is None and any(r.WhichOneof("kind") == "gateway" and r.gateway.name == joiner
                                      and r.gateway.alive for r in msg.routing.upserts):
            g.alive_ns = now
        if g.peer_ns is not None and g.alive_ns is not None:
            self.pending -= 1
            if self.pending == 0:
                self._report(complete=True)

    def arm(self, joiner: str) -> None:
        for g in self.gateways:
            g.peer_ns = g.alive_ns = None
            g.bytes = g.msgs = 0
        self.pending = sum(1 for g in self.gateways if g.alive_session)
        self.joiner = joiner
        self.send({"op": "armed", "joiner": joiner, "sessions": self.pending})

    def _report(self, complete: bool) -> None:
        live = [g for g in self.gateways if g.alive_session or g.peer_ns is not None]
        self.send({"op": "joined", "joiner": self.joiner, "complete": complete,
                   "peer_ns": [g.peer_ns for g in live], "alive_ns": [g.alive_ns for g in live],
                   "bytes": [g.bytes for g in live], "msgs": [g.msgs for g in live]})
        self.joiner = None

    async def close(self) -> None:
        self.joiner = None
        for g in self.gateways:
            for t in g.tasks:
                t.cancel()
            if g.call is not None:
                g.call.cancel()
        await asyncio.gather(*(t for g in self.gateways for t in g.tasks), return_exceptions=True)
        await asyncio.gather(*(g.channel.close() for g in self.gateways if g.channel is not None),
                             return_exceptions=True)
        self.gateways = []
        self.send({"op": "closed"})

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**26)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "register":
                await self.register(cmd)
            elif op == "open":
                await self.open(cmd)
            elif op == "arm":
                self.arm(cmd["joiner"])
            elif op == "collect":
                if self.joiner is not None:
                    self._report(complete=False)
            elif op == "close":
                await self.close()
            elif op == "exit":
                break
            else:
                raise ValueError(f"unknown command {op!r}")
        if self.gateways:
            await self.close()


def main() -> int:
    asyncio.run(Worker().serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
