"""What the gateway does about file descriptors running out: the rules, apart from the sockets.

Every client connection holds a descriptor, and a proxied one a second for its backend, so the
process's `RLIMIT_NOFILE` soft limit (1024 for a service without `LimitNOFILE` on current
systemd) caps the gateway long before `--max-connections` (10,000) would. At start the soft
limit is raised to the hard limit (`raise_nofile_limit`), and `fd_warning` says when
`max_connections` still exceeds what the descriptors allow.

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


def fd_warning(max_connections: int, fd_limit: int) -> str | None:
    """Why `max_connections` cannot be reached with `fd_limit` descriptors, or None."""
    allowed = connections_allowed(fd_limit)
    if max_connections <= allowed:
        return None
    return (f"max_connections {max_connections} exceeds the {allowed} proxied connections that the file "
            f"descriptor limit {fd_limit} allows; raise LimitNOFILE (or ulimit -n) or lower --max-connections")


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
