"""The contract between the proxy server and the connections it hosts, in both directions.

`ConnectionHost` is what a connection (HTTP/1.1 `downstream`, HTTP/2 `h2proxy`, byte `tunnel`,
the `prober`) may ask of the server that accepted it: the settings, the live routing state, the
upstream pool, the metrics, the coarse clock (`now`, ticked by the sweeper), the gateway's name
for `X-Geomesh-Forwarded` (`mark`), which peers are trusted, the custom-domain directory, the
ACME challenges and the HTTPS redirect (`port80`), a way to run a background task (`spawn`), and
the callbacks for bookkeeping (`conn_opened`/`conn_closed`, `health_changed`, `penalise_ip`,
`hand_over`). `ListenerHost` adds what the TLS listener needs for admission at
accept and for certificates on demand. `ServedConnection` is what the server may ask of every connection it counts: its `kind`,
its `deadline` (the sweeper calls `timed_out` past it), `drain` on shutdown and `abort` at the
drain deadline. `ProxyServer` meets both host Protocols; the connection modules import this
module, never `server.py`, so the server sits at the top of the proxy and a test or bench can
host a connection with a small fake.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types of the modules below the connections (none imports this one)
    from regional_gateway.proxy.admission import Admission, Refusal
    from regional_gateway.proxy.certificates import CertificateStore
    from regional_gateway.proxy.custom_domains import CustomDomains
    from regional_gateway.proxy.metrics import ProxyMetrics
    from regional_gateway.proxy.on_demand import OnDemandCertificates
    from regional_gateway.proxy.port80 import HttpsRedirect
    from regional_gateway.proxy.route_state import BackendRuntime, RouteState
    from regional_gateway.proxy.settings import ProxySettings
    from regional_gateway.proxy.upstream import Pool


class ServedConnection(Protocol):
    """What the server asks of a connection it counts (`conn_opened`)."""

    kind: str  # "http", "https", "mesh", "tunnel" or "h2": the counts of geomesh_gateway_connections
    deadline: float  # when the sweeper calls `timed_out` (0: no deadline)

    def timed_out(self) -> None:
        """The coarse clock passed `deadline`: act on it (408, 504, close) by the state."""

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the exchange in flight."""

    def abort(self) -> None:
        """The drain deadline passed: close at once."""


class ConnectionHost(Protocol):
    """What a connection may ask of the server that hosts it."""

    settings: ProxySettings
    state: RouteState
    pool: Pool
    metrics: ProxyMetrics
    certs: CertificateStore
    now: float
    mark: bytes
    draining: bool
    trusted_peers: frozenset[str]
    mesh_local_ips: frozenset[str]
    custom_domains: CustomDomains | None  # custom domains by TXT record (None: no resolver configured)
    acme_challenges: Mapping[bytes, bytes]  # ACME HTTP-01: token -> key authorization (`port80`)
    https_redirect: HttpsRedirect | None  # plain requests for hosts with a certificate go to https:// (`port80`)

    def spawn(self, coro: Coroutine) -> None:
        """Run `coro` as a task the server cancels on shutdown."""

    def conn_opened(self, conn: ServedConnection) -> bool:
        """Count an established connection; False (not counted) when it must be refused."""

    def conn_closed(self, conn: ServedConnection) -> None:
        """The connection ended (or was handed over): uncount it."""

    def health_changed(self, rt: BackendRuntime) -> None:
        """A backend's health state moved: re-derive its availability (and log it)."""

    def penalise_ip(self, ip: str, reason: str) -> None:
        """A connection of the client at `ip` was closed for abuse: its client into the penalty box."""

    def hand_over(self, conn: ServedConnection, transport: Any, protocol: Any) -> None:
        """Move `transport` from `conn`, which sniffed it, to `protocol`, which serves it."""


class ListenerHost(ConnectionHost, Protocol):
    """What the TLS listener needs in addition: admission before the handshake, certificates on demand."""

    admission: Admission
    pending_tls: int
    on_demand: OnDemandCertificates | None  # certificates on demand (None: no coordinator to ask)

    def admit(self, key: str | None) -> Refusal | None:
        """Why a new connection of client `key` (None: exempt) is refused at accept, or None."""

    def client_of(self, ip: str) -> str | None:
        """The admission key of a public client at `ip`; None for a trusted peer (exempt)."""
