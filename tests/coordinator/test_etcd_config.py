"""Table tests of the pure etcd configuration rules: `--etcd` endpoint lists, the TLS flags, the
translation of the deploy example to a loopback cluster, and the store's "never sent" rule."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from coordinator.main import parser
from coordinator.server import CoordinatorConfig
from coordinator.store import EtcdConfig, EtcdEndpoint, never_sent, parse_endpoints, unavailable
from geomesh.errors import ValidationError
from geomesh.lab.processes import DEPLOY_EXAMPLE, cluster_member_env, read_env_file

GOOD = [
    ("127.0.0.1:2379", [EtcdEndpoint("127.0.0.1", 2379)]),
    ("a:1,b:2", [EtcdEndpoint("a", 1), EtcdEndpoint("b", 2)]),
    (["a:1", "b:2,c:3"], [EtcdEndpoint("a", 1), EtcdEndpoint("b", 2), EtcdEndpoint("c", 3)]),
    ("https://etcd-1.internal:2379/", [EtcdEndpoint("etcd-1.internal", 2379, "https")]),
    ("[::1]:2379", [EtcdEndpoint("::1", 2379)]),
    (" HTTP://10.0.0.11:2379 ", [EtcdEndpoint("10.0.0.11", 2379, "http")]),
]

BAD = [
    ("", "empty"),
    ("a:1,,b:2", "empty"),
    ("a", "not host:port"),
    ("a:0", "not host:port"),
    ("a:65536", "not host:port"),
    (":2379", "not host:port"),
    ("unix://x:1", "scheme must be http or https"),
    ("::1:2379", "IPv6 host in brackets"),
    ("[::1:2379", "unclosed"),
    ("a b:1", "bad host"),
    ("a:1,a:1", "listed twice"),
    (",".join(f"h{i}:1" for i in range(33)), "at most 32"),
]


@pytest.mark.parametrize(("value", "want"), GOOD)
def test_endpoint_lists(value: str | list[str], want: list[EtcdEndpoint]) -> None:
    assert list(parse_endpoints(value)) == want


@pytest.mark.parametrize(("value", "message"), BAD)
def test_bad_endpoint_lists_name_the_flag(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as exc:
        parse_endpoints(value)
    assert exc.value.field == "etcd"


TLS = [
    # (endpoints, ca, cert, key) -> tls on, or the field named in the error
    (("a:1",), None, None, None, False),
    (("https://a:1",), None, None, None, True),
    (("a:1",), Path("ca.pem"), None, None, True),
    (("a:1",), Path("ca.pem"), Path("c.pem"), Path("c.key"), True),
    (("a:1",), Path("ca.pem"), Path("c.pem"), None, "etcd_key"),
    (("a:1",), Path("ca.pem"), None, Path("c.key"), "etcd_cert"),
    (("http://a:1", "https://b:1"), None, None, None, "etcd"),
    (("http://a:1",), Path("ca.pem"), None, None, "etcd"),
]


@pytest.mark.parametrize(("endpoints", "ca", "cert", "key", "want"), TLS)
def test_tls_settings(endpoints, ca, cert, key, want) -> None:  # noqa: ANN001
    if isinstance(want, bool):
        assert EtcdConfig.parse(list(endpoints), ca=ca, cert=cert, key=key).tls is want
    else:
        with pytest.raises(ValidationError) as exc:
            EtcdConfig.parse(list(endpoints), ca=ca, cert=cert, key=key)
        assert exc.value.field == want


def test_a_missing_tls_file_is_named() -> None:
    config = EtcdConfig.parse("a:1", ca=Path("/nonexistent/ca.pem"))
    with pytest.raises(ValidationError) as exc:
        config.credentials()
    assert exc.value.field == "etcd_ca"


def test_flags_comma_separated_and_repeated_make_one_list() -> None:
    args = parser().parse_args(["--etcd", "https://a:1,https://b:1", "--etcd", "https://c:1",
                                "--etcd-ca", "ca.pem", "--etcd-cert", "c.pem", "--etcd-key", "c.key"])
    config = CoordinatorConfig(etcd=",".join(args.etcd), etcd_ca=args.etcd_ca, etcd_cert=args.etcd_cert,
                               etcd_key=args.etcd_key, insecure=True)
    assert [str(e) for e in config.etcd_config.endpoints] == ["https://a:1", "https://b:1", "https://c:1"]
    assert parser().parse_args([]).etcd is None  # the default, 127.0.0.1:2379, applies
    with pytest.raises(ValidationError, match="etcd: an endpoint is empty"):
        CoordinatorConfig(etcd="a:1,", insecure=True)


@pytest.mark.parametrize(("code", "details", "want"), [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: refused", True),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed", False),
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", False),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "failed to connect to all addresses", False),
])
def test_only_a_call_that_never_left_is_sent_again(code: grpc.StatusCode, details: str, want: bool) -> None:
    assert never_sent(code, details) is want


def test_the_deploy_example_becomes_member_two_on_loopback(tmp_path: Path) -> None:
    example = read_env_file(DEPLOY_EXAMPLE.read_text())
    files = {v: tmp_path / Path(v).name for k, v in example.items() if k.endswith("_FILE")}
    env = cluster_member_env(example, 1, [(2001, 3001), (2002, 3002), (2003, 3003)], files, tmp_path / "d")
    assert env["ETCD_NAME"] == "etcd-2"
    assert env["ETCD_LISTEN_CLIENT_URLS"] == "https://127.0.0.1:2002"
    assert env["ETCD_ADVERTISE_CLIENT_URLS"] == "https://127.0.0.1:2002"
    assert env["ETCD_LISTEN_PEER_URLS"] == env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == "https://127.0.0.1:3002"
    assert env["ETCD_INITIAL_CLUSTER"] == ("etcd-1=https://127.0.0.1:3001,etcd-2=https://127.0.0.1:3002,"
                                           "etcd-3=https://127.0.0.1:3003")
    assert env["ETCD_DATA_DIR"] == str(tmp_path / "d")
    # the example asks for client certificates, and serves no plaintext listener
    assert env["ETCD_CLIENT_CERT_AUTH"] == "true" and "ETCD_TRUSTED_CA_FILE" in env
    assert "http://" not in env["ETCD_LISTEN_CLIENT_URLS"]
    with pytest.raises(ValueError, match="no file given"):
        cluster_member_env(example, 0, [(1, 2)], {}, tmp_path)


def test_an_env_file_line_that_is_not_key_value_is_refused() -> None:
    assert read_env_file('# c\nA="x y"\nB=z\n') == {"A": "x y", "B": "z"}
    with pytest.raises(ValueError, match="line 2"):
        read_env_file("A=1\nnot a setting\n")


@pytest.mark.parametrize("code,details,want", [
    (grpc.StatusCode.UNAVAILABLE, "connection refused", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
    (grpc.StatusCode.UNKNOWN, "context deadline exceeded", True),    # etcd could not commit in time
    (grpc.StatusCode.UNKNOWN, "etcdserver: request timed out", True),
    (grpc.StatusCode.UNKNOWN, "etcdserver: leader changed", True),
    (grpc.StatusCode.UNKNOWN, "something else", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large", False),
])
def test_which_etcd_failures_mean_unavailable(code, details: str, want: bool) -> None:  # noqa: ANN001
    assert unavailable(code, details) is want
