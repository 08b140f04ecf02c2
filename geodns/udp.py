"""DNS over UDP: plumbing around `geodns.pipeline.UdpPipeline`, which decides every reply.

On Linux (64-bit) `BatchUdp` reads and writes in batches with recvmmsg/sendmmsg (through ctypes
on preallocated buffers), driven by the event loop's reader callback: one wake-up, up to 64
queries in, up to 64 replies out, two system calls. Per query the Python work here is a slice of
the receive buffer, one call of the pipeline (whose first stage, the reply cache, answers most
queries with a dict look-up and an ID patch), one copy into the send buffer and a few integer
stores. The client's sockaddr is reused as the reply's destination without being decoded; the
pipeline decodes it (`BatchUdp._client`) only for the stages that need the address (a cache
miss, rate limiting). Elsewhere `ProtocolUdp` (an asyncio DatagramProtocol) runs the same
pipeline one packet at a time. A datagram over `wire.MAX_QUERY_OCTETS` is cut there by the kernel
(the receive slot is that long; `ProtocolUdp` cuts it itself) and answered FORMERR from its
header alone (`UdpPipeline.reply_cut`), so its size costs nothing; a reply longer than the send
slot is dropped by the pipeline (EDNS payload is capped at 4096).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import socket
import sys

from geodns.answer import Responder, client_of
from geodns.pipeline import UdpPipeline
from geodns.rrl import RateLimiter
from geodns.stats import Stats
from geodns.wire import HEADER_LEN, MAX_QUERY_OCTETS

log = logging.getLogger("geodns.udp")

BATCH = 64
SLOT = 4096  # per-datagram buffer; replies are <= 4096
RECV_LEN = MAX_QUERY_OCTETS  # larger queries are cut (MSG_TRUNC) and refused
MAX_BATCHES_PER_WAKEUP = 16  # then yield to the loop (TCP, feed) even under full load
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
SOCKADDR_LEN = 28  # sizeof(struct sockaddr_in6), enough for both families


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return libc


_LIBC = _libc()


def batch_supported() -> bool:
    return _LIBC is not None


class BatchUdp:
    """recvmmsg/sendmmsg on one non-blocking UDP socket, driven by `loop.add_reader`."""

    def __init__(self, sock: socket.socket, responder: Responder, stats: Stats,
                 rrl: RateLimiter | None = None) -> None:
        assert _LIBC is not None
        self.sock = sock
        self.responder = responder
        self.stats = stats
        self.rrl = rrl
        self.pipeline = UdpPipeline(responder, stats, rrl, self._client, max_reply=SLOT)
        self._fd = sock.fileno()
        self._v6 = sock.family == socket.AF_INET6
        self._loop: asyncio.AbstractEventLoop | None = None
        # every buffer below is referenced from self: the kernel writes into them
        n = BATCH
        self._rbuf = ctypes.create_string_buffer(n * SLOT)
        self._sbuf = ctypes.create_string_buffer(n * SLOT)
        self._names = ctypes.create_string_buffer(n * 32)
        self._riov = (_Iovec * n)()
        self._siov = (_Iovec * n)()
        self._rh = (_Mmsghdr * n)()
        self._sh = (_Mmsghdr * n)()
        rbase, sbase, nbase = (ctypes.addressof(b) for b in (self._rbuf, self._sbuf, self._names))
        for i in range(n):
            self._riov[i].base, self._riov[i].len = rbase + i * SLOT, RECV_LEN
            self._siov[i].base = sbase + i * SLOT
            self._rh[i].hdr.name, self._rh[i].hdr.namelen = nbase + i * 32, SOCKADDR_LEN
            self._rh[i].hdr.iov, self._rh[i].hdr.iovlen = ctypes.addressof(self._riov) + i * ctypes.sizeof(_Iovec), 1
            self._sh[i].hdr.iov, self._sh[i].hdr.iovlen = ctypes.addressof(self._siov) + i * ctypes.sizeof(_Iovec), 1
        self._name_addr = [nbase + i * 32 for i in range(n)]
        self._rmv = memoryview(self._rbuf).cast("B")
        self._smv = memoryview(self._sbuf).cast("B")
        self._nmv = memoryview(self._names).cast("B")
        self._rh32 = memoryview(self._rh).cast("B").cast("I")
        self._sh32 = memoryview(self._sh).cast("B").cast("I")
        self._sh64 = memoryview(self._sh).cast("B").cast("Q")
        self._siov64 = memoryview(self._siov).cast("B").cast("Q")
        size = ctypes.sizeof(_Mmsghdr)
        assert size % 8 == 0
        self._stride32 = size // 4
        self._stride64 = size // 8
        self._len_at = _Mmsghdr.len.offset // 4
        self._namelen_at = _Msghdr.namelen.offset // 4
        self._flags_at = _Msghdr.flags.offset // 4
        self._name_at = _Msghdr.name.offset // 8

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._on_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None

    def _client(self, i: int) -> bytes:
        """The packed address of the client in receive slot `i` (until the next recvmmsg)."""
        base = i * 32
        if self._v6:
            return self._nmv[base + 8:base + 24].tobytes()
        return self._nmv[base + 4:base + 8].tobytes()

    def _on_readable(self) -> None:
        assert _LIBC is not None
        recvmmsg, sendmmsg = _LIBC.recvmmsg, _LIBC.sendmmsg
        fd = self._fd
        rp, sp = ctypes.addressof(self._rh), ctypes.addressof(self._sh)
        rmv, smv = self._rmv, self._smv
        rh32, sh32, sh64, siov64 = self._rh32, self._sh32, self._sh64, self._siov64
        s32, s64 = self._stride32, self._stride64
        msize = ctypes.sizeof(_Mmsghdr)
        len_at, namelen_at, flags_at, name_at = self._len_at, self._namelen_at, self._flags_at, self._name_at
        name_addr = self._name_addr
        stats = self.stats
        reply_of, reply_cut = self.pipeline.reply, self.pipeline.reply_cut
        for _ in range(MAX_BATCHES_PER_WAKEUP):
            n = recvmmsg(fd, rp, BATCH, MSG_DONTWAIT, None)
            if n <= 0:
                if n < 0:
                    err = ctypes.get_errno()
                    if err not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                        log.warning("recvmmsg failed: %s", errno.errorcode.get(err, err))
                return
            stats.udp_batches += 1
            stats.udp_datagrams += n
            j = 0
            for i in range(n):
                at = i * s32
                size = rh32[at + len_at]
                off = i * SLOT
                if rh32[at + flags_at] & MSG_TRUNC:
                    reply = reply_cut(rmv[off:off + min(size, HEADER_LEN)].tobytes(), i)
                else:
                    reply = reply_of(rmv[off:off + size].tobytes(), i)
                if reply is None:
                    continue
                rlen = len(reply)
                o = j * SLOT
                smv[o:o + rlen] = reply
                siov64[j * 2 + 1] = rlen
                sh64[j * s64 + name_at] = name_addr[i]
                sh32[j * s32 + namelen_at] = rh32[at + namelen_at]
                j += 1
            for i in range(n):
                rh32[i * s32 + namelen_at] = SOCKADDR_LEN
            done = 0
            while done < j:
                sent = sendmmsg(fd, sp + done * msize, j - done, 0)
                if sent > 0:
                    done += sent
                    continue
                err = ctypes.get_errno() if sent < 0 else 0
                if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                    stats.dropped += j - done  # socket buffer full: UDP may lose these
                    break
                if err != errno.EINTR:
                    # one destination failed (e.g. an ICMP error queued for it): skip it
                    stats.dropped += 1
                    done += 1
            if n < BATCH:
                return


class ProtocolUdp(asyncio.DatagramProtocol):
    """One datagram at a time, for platforms without recvmmsg."""

    def __init__(self, responder: Responder, stats: Stats, rrl: RateLimiter | None = None) -> None:
        self.responder = responder
        self.stats = stats
        self.rrl = rrl
        self.pipeline = UdpPipeline(responder, stats, rrl, _client_of_addr)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) > MAX_QUERY_OCTETS:  # what the batch transport's receive slot does
            reply = self.pipeline.reply_cut(data[:HEADER_LEN], addr)
        else:
            reply = self.pipeline.reply(data, addr)
        if reply is not None:
            assert self.transport is not None
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


def _client_of_addr(addr: tuple) -> bytes:
    return client_of(addr[0])
