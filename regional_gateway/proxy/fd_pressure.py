"""What the gateway does about file descriptors running out: the rules, apart from the sockets.

Every client connection holds a descriptor, and a proxied one a second for its backend, so the
process's `RLIMIT_NOFILE` soft limit (1024 for a service without `LimitNOFILE` on current
systemd) caps the gateway long before `--max-connections` (10,000) would. At start the soft
limit is raised to the hard limit (`raise_nofile_limit`), and the cap the server enforces is
`connection_cap`: `--max-connections`, lowered to what the descriptors carry (two per connection,
`RESERVED_FDS` kept for listeners, logs, health probes, metrics and the agent) when they carry
fewer. Beyond that cap connections are refused at accept, cheaply, instead of failing later for
lack of a descriptor (a backend connect, a health probe) while the process has none left.

When `accept()` fails for lack of descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM) the listening
socket stays readable, and a listener that simply tries again spins at 100 % CPU and logs a line
per attempt. `AcceptBackoff` is what a listener does instead: stop reading the listening socket
for a pause that doubles from `BACKOFF_MIN` to `BACKOFF_MAX` while failures go on (pending
clients wait in the backlog meanwhile), and log at most once per `LOG_INTERVAL`, with the number
of failures not logged since.
"""

from __future__ import annotations

import errno
import resource

NO_FD_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# accept() errors about one pending connection (it went away, or a firewall refused it): skip it
TRANSIENT_ERRNOS = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                              errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
                              errno.ENETUNREACH))
BACKOFF_MIN = 0.1
BACKOFF_MAX = 1.0
LOG_INTERVAL = 10.0
# descriptors kept for the process itself (listeners, logs, metrics, health probes, the agent)
RESERVED_FDS = 64
FDS_PER_CONNECTION = 2  # the client's and the backend's


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as far as the kernel allows); returns the
    (soft, hard) limits in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # e.g. an infinite hard limit above the kernel's nr_open
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def connections_allowed(fd_limit: int) -> int:
    """Proxied connections `fd_limit` descriptors carry (two each, some kept for the process)."""
    return max(0, (fd_limit - RESERVED_FDS) // FDS_PER_CONNECTION)


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """The client connections the server takes: `max_connections`, or fewer when `fd_limit`
    descriptors cannot carry that many (at least one; an unlimited `fd_limit` is negative)."""
    if fd_limit < 0:
        return max_connections
    return max(1, min(max_connections, connections_allowed(fd_limit)))


class AcceptBackoff:
    """Back-off and log throttling of one listener's accept failures (pure; times in seconds)."""

    __slots__ = ("delay", "next_log", "suppressed")

    def __init__(self) -> None:
        self.delay = 0.0
        self.next_log = 0.0
        self.suppressed = 0

    def failed(self, now: float) -> tuple[float, int | None]:
        """An accept failed at `now`: (seconds to stop reading the listener, None to stay quiet
        or the number of failures not logged since the last line, to log one now)."""
        self.delay = BACKOFF_MIN if self.delay == 0.0 else min(BACKOFF_MAX, self.delay * 2)
        if now >= self.next_log:
            self.next_log = now + LOG_INTERVAL
            suppressed, self.suppressed = self.suppressed, 0
            return self.delay, suppressed
        self.suppressed += 1
        return self.delay, None

    def succeeded(self) -> None:
        """A connection was accepted: the next failure starts from the shortest pause again."""
        self.delay = 0.0
