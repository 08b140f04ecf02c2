"""Network namespaces for the lab and the tests: a topology of an "internet" and hosts joined to it.

`topology.py` builds it (`Topology`: the internet namespace with a bridge per documentation
network, hosts with a public address each, WireGuard interface names), `namespace.py` is one
namespace (`Namespace`, `Host`: run commands and processes inside, open sockets inside by setns,
`in_netns`), `tcp_forward.py` relays TCP between a namespace's loopback and the host's
(`TcpForward`), and `cleanup.py` removes what a topology created, after a crash too (`sweep`,
`leftovers`). Callers use the names re-exported here: `from geomesh.lab import netns`, then
`netns.Topology`, `netns.sweep`, `netns.unavailable_reason`.
"""

from geomesh.errors import ValidationError
from geomesh.lab.netns.cleanup import (
    DEFAULT_STATE_DIR,
    PREFIX_RE,
    WG_SOCKET_DIR,
    kill_all,
    leftovers,
    proc_start_time,
    sweep,
    teardown_state,
)
from geomesh.lab.netns.namespace import (
    NETNS_DIR,
    Host,
    Namespace,
    NetnsError,
    in_netns,
    list_namespaces,
    namespace_pids,
    unavailable_reason,
)
from geomesh.lab.netns.tcp_forward import TcpForward
from geomesh.lab.netns.topology import NAME_RE, PUBLIC_NETWORKS, Topology

__all__ = [
    "DEFAULT_STATE_DIR", "NAME_RE", "NETNS_DIR", "PREFIX_RE", "PUBLIC_NETWORKS", "WG_SOCKET_DIR", "Host",
    "Namespace", "NetnsError", "TcpForward", "Topology", "ValidationError", "in_netns", "kill_all", "leftovers",
    "list_namespaces", "namespace_pids", "proc_start_time", "sweep", "teardown_state", "unavailable_reason",
]
