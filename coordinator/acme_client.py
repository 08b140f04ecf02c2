"""The ACME protocol client the coordinator orders certificates with (docs/certificates.md).

A thin asyncio face on certbot's `acme` library (no JWS of our own): `AcmeClient` registers an
account (idempotent: the CA answers an existing key with its account URL) and runs one order by
DNS-01 (`order_dns01`: the zone's `<zone>` and `*.<zone>`) or HTTP-01 (`order_http01`: custom
domains). An order places the order, computes what the CA will look for, hands that to the
caller's `publish` (DNS-01: TXT owner name -> values, `x` and `*.x` sharing one name with two
values; HTTP-01: token -> key authorization), which returns once it is served everywhere; then it
answers the challenges, polls the authorizations, finalizes with a CSR for the certificate's key
and downloads the chain. `withdraw` gets what `publish` got, whenever `publish` was called,
success or not. The library's blocking calls run in threads (`asyncio.to_thread`), each order on
its own connection, so concurrent orders never share a nonce pool and the event loop never
blocks. The whole order, `publish` included, is bounded by `deadline`; nothing is retried here
(the caller backs off). Every failure is one `AcmeError` whose message names the order or the
URL, the step and the CA's problem detail. `new_key_pem`, `csr_pem` and `issued_from_chain` are
the pure key, CSR and chain handling; `Issued` is what a chain says about itself.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import josepy as jose
import requests
from acme import challenges, messages
from acme import client as acme_lib
from acme import errors as acme_errors
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from geomesh import validate
from geomesh.errors import GeomeshError, ValidationError

log = logging.getLogger(__name__)

USER_AGENT = "geomesh"
MAX_NAMES = 100          # Let's Encrypt's limit of names per certificate
MAX_PEM = 256 * 1024     # a key, CSR or chain larger than this is not one
_POLL_FIRST, _POLL_MAX = 0.2, 2.0  # seconds between authorization polls: doubling up to the max
_T = TypeVar("_T")

DnsChallenges = Mapping[str, tuple[str, ...]]   # "_acme-challenge.<name>" -> TXT values
HttpChallenges = Mapping[str, str]              # token -> key authorization


class AcmeError(GeomeshError):
    """An ACME operation failed; the message names what (the URL or the order and its step, the
    name) and carries the CA's problem detail when there is one."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate chain and what its leaf says: SAN DNS names in the leaf's order, validity
    (unix seconds) and serial (lower-case hex, no separators)."""

    chain_pem: str
    names: tuple[str, ...]
    not_before: float
    not_after: float
    serial: str

    def __post_init__(self) -> None:
        if "-----BEGIN CERTIFICATE-----" not in self.chain_pem:
            raise AcmeError("chain_pem: no PEM certificate in it")
        if not self.names:
            raise AcmeError("names: a certificate names at least one DNS name")
        if not (math.isfinite(self.not_before) and math.isfinite(self.not_after)
                and self.not_before <= self.not_after):
            raise AcmeError(f"not_after: {self.not_after} is before not_before {self.not_before}")
        if not self.serial or self.serial != self.serial.lower() or any(c not in "0123456789abcdef"
                                                                        for c in self.serial):
            raise AcmeError(f"serial: {self.serial[:80]!r} is not lower-case hex")


# -- keys, CSRs and chains (pure) -------------------------------------------------------------------

def new_key_pem() -> bytes:
    """A new EC P-256 private key, PKCS#8 PEM (for accounts and certificates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(field: str, key_pem: bytes) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if not isinstance(key_pem, bytes | bytearray):
        raise AcmeError(f"{field}: PEM bytes expected, not {type(key_pem).__name__}")
    if len(key_pem) > MAX_PEM:
        raise AcmeError(f"{field}: {len(key_pem)} bytes is too large for a private key")
    try:
        key = serialization.load_pem_private_key(bytes(key_pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise AcmeError(f"{field}: not an unencrypted PEM private key ({e})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
        return key
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
        return key
    raise AcmeError(f"{field}: an EC P-256/P-384 or RSA >= 2048 key is needed, not {type(key).__name__}")


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    """`names` as a certificate will carry them: lower-case, no trailing dot, a wildcard only as
    the whole leftmost label, no repeats, 1 to MAX_NAMES of them; else AcmeError naming names[i]."""
    if isinstance(names, str | bytes) or not isinstance(names, Sequence):
        raise AcmeError("names: a sequence of domain names is needed, not a single "
                        f"{type(names).__name__}")
    if not names:
        raise AcmeError("names: at least one domain name is needed")
    if len(names) > MAX_NAMES:
        raise AcmeError(f"names: {len(names)} names, at most {MAX_NAMES} fit in one certificate")
    out: list[str] = []
    for i, name in enumerate(names):
        field = f"names[{i}]"
        if not isinstance(name, str):
            raise AcmeError(f"{field}: a string is needed, not {type(name).__name__}")
        wildcard = name.startswith("*.")
        try:
            base = validate.fqdn(field, name[2:] if wildcard else name)
        except ValidationError as e:
            raise AcmeError(str(e)) from None
        full = f"*.{base}" if wildcard else base
        if full in out:
            raise AcmeError(f"{field}: {full!r} is listed twice")
        out.append(full)
    return tuple(out)


def csr_pem(key_pem: bytes, names: Sequence[str]) -> bytes:
    """A PEM CSR signed by `key_pem` asking for `names` (subjectAltName, in this order)."""
    checked = check_names(names)
    key = _load_key("key_pem", key_pem)
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in checked]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def issued_from_chain(chain_pem: str) -> Issued:
    """Parse a PEM chain (leaf first, each certificate issued by the next) into `Issued`."""
    if not isinstance(chain_pem, str):
        raise AcmeError(f"chain_pem: PEM text expected, not {type(chain_pem).__name__}")
    if len(chain_pem) > MAX_PEM:
        raise AcmeError(f"chain_pem: {len(chain_pem)} characters is too large for a chain")
    if "-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise AcmeError("chain_pem: no PEM certificate in it")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError as e:
        raise AcmeError(f"chain_pem: not a PEM certificate chain ({e})") from None
    for i in range(len(certs) - 1):
        if certs[i].issuer != certs[i + 1].subject:
            raise AcmeError(f"chain_pem: certificate {i + 1} did not issue certificate {i} "
                            "(the leaf comes first, then each issuer)")
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise AcmeError("chain_pem: the leaf has no subjectAltName") from None
    names = tuple(san.get_values_for_type(x509.DNSName))
    if not names:
        raise AcmeError("chain_pem: the leaf names no DNS name")
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
    return Issued(pem, names, leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp(),
                  format(leaf.serial_number, "x"))


def _same_public_key(chain_pem: str, key_pem: bytes) -> bool:
    leaf = x509.load_pem_x509_certificate(chain_pem.encode())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return leaf.public_key().public_bytes(*spki) == _load_key("key_pem", key_pem).public_key().public_bytes(*spki)


# -- failures, mapped once ------------------------------------------------------------------------

def _os_reason(exc: BaseException) -> str:
    """The innermost socket-level reason in a requests/urllib3 exception chain: 'connection
    refused', 'certificate verify failed: ...', else the exception's own text."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verify failed: {e.verify_message}"
        if isinstance(e, ssl.SSLError):  # its errno is OpenSSL's, not the OS's
            return f"TLS: {e.reason or e}"
        if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
            return os.strerror(e.errno).lower()
        reason = getattr(e, "reason", None)  # urllib3's MaxRetryError / NewConnectionError
        todo += [e.__cause__, e.__context__, reason if isinstance(reason, BaseException) else None]
        todo += [a for a in e.args if isinstance(a, BaseException)]
    return str(exc)[:300]


def problem_text(err: messages.Error) -> str:
    """An ACME problem document as one line: the detail, then the error type's code."""
    code = err.code or str(err.typ or "").rsplit(":", 1)[-1] or "unknown problem"
    detail = err.detail or err.title or err.description or ""
    return f"{detail} ({code})" if detail else code


def _failure(what: str, exc: BaseException) -> AcmeError:
    if isinstance(exc, AcmeError):
        return exc
    if isinstance(exc, messages.Error):
        detail = f"the CA says: {problem_text(exc)}"
    elif isinstance(exc, requests.exceptions.Timeout):
        detail = "no answer in time"
    elif isinstance(exc, requests.exceptions.RequestException):
        detail = _os_reason(exc)
    elif isinstance(exc, acme_errors.IssuanceError):
        detail = f"the CA refused to issue: {problem_text(exc.error)}"
    elif isinstance(exc, acme_errors.TimeoutError):
        detail = "the CA did not finish in time"
    elif isinstance(exc, acme_errors.ConflictError):
        detail = f"conflict (the CA points at {exc.location})"
    else:
        detail = f"{type(exc).__name__}: {str(exc)[:300]}" if str(exc) else type(exc).__name__
    return AcmeError(f"{what}: {detail}")


def _account_jwk(account_key_pem: bytes) -> tuple[jose.JWK, jose.JWASignature]:
    key = _load_key("account_key_pem", account_key_pem)
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    return jose.JWKEC(key=key), jose.ES256 if isinstance(key.curve, ec.SECP256R1) else jose.ES384


# -- the client ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Pending:
    """One authorization of an order still to be validated."""

    name: str                     # as in the certificate: "*.geo.test" for a wildcard's authz
    authzr: messages.AuthorizationResource
    challb: messages.ChallengeBody
    response: challenges.ChallengeResponse
    key: str                      # DNS-01: the TXT owner name; HTTP-01: the token
    value: str                    # DNS-01: the TXT value; HTTP-01: the key authorization


class AcmeClient:
    """One ACME account at one CA directory (see the module's docstring)."""

    def __init__(self, directory: str, *, account_key_pem: bytes, ca_bundle: Path | None = None,
                 email: str = "", timeout: float = 10.0) -> None:
        parts = urlsplit(directory) if isinstance(directory, str) else None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            raise AcmeError(f"directory: {str(directory)[:80]!r} is not an http(s) URL")
        if not isinstance(timeout, int | float) or not math.isfinite(timeout) or not 0 < timeout <= 300:
            raise AcmeError(f"timeout: {timeout!r} is not a number of seconds in (0, 300]")
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise AcmeError(f"ca_bundle: {ca_bundle} is not a file")
        if not isinstance(email, str) or len(email) > 254 or (email and "@" not in email):
            raise AcmeError(f"email: {str(email)[:80]!r} is not an e-mail address")
        self.directory = directory
        self.ca_bundle = Path(ca_bundle) if ca_bundle is not None else None
        self.email = email
        self.timeout = float(timeout)
        self._jwk, self._alg = _account_jwk(account_key_pem)
        self._directory: messages.Directory | None = None
        self._account: messages.RegistrationResource | None = None
        self._register_lock = asyncio.Lock()

    @property
    def account_url(self) -> str | None:
        return self._account.uri if self._account is not None else None

    def _network(self, account: messages.RegistrationResource | None) -> acme_lib.ClientNetwork:
        return acme_lib.ClientNetwork(self._jwk, account=account, alg=self._alg,
                                      verify_ssl=str(self.ca_bundle) if self.ca_bundle else True,
                                      user_agent=USER_AGENT, timeout=self.timeout)  # type: ignore[arg-type]

    @staticmethod
    async def _call(what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` in a worker thread; any failure becomes AcmeError naming `what`."""
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as e:  # one place maps every library, network and protocol failure
            raise _failure(what, e) from e

    async def _client(self, account: messages.RegistrationResource | None) -> acme_lib.ClientV2:
        """A ClientV2 on a connection of its own signing as `account` (None: with the JWK, as
        newAccount requires); the directory is fetched once."""
        net = self._network(account)
        if self._directory is None:
            self._directory = await self._call(f"ACME directory {self.directory}",
                                               acme_lib.ClientV2.get_directory, self.directory, net)
        return acme_lib.ClientV2(self._directory, net)

    async def register(self) -> str:
        """Register (or find) the account of this key at the CA, agreeing to its terms; returns
        the account URL. Asking again with the same key returns the same URL."""
        async with self._register_lock:
            client = await self._client(None)
            body = messages.NewRegistration.from_data(email=self.email or None, terms_of_service_agreed=True)

            def new_account() -> messages.RegistrationResource:
                try:
                    return client.new_account(body)
                except acme_errors.ConflictError as e:  # this key has an account: its URL
                    return messages.RegistrationResource(uri=e.location, body=messages.Registration())

            regr = await self._call(f"ACME account at {self.directory}", new_account)
            if not regr.uri:
                raise AcmeError(f"ACME account at {self.directory}: the CA gave no account URL")
            self._account = regr
            log.info("ACME account %s at %s", regr.uri, self.directory)
            return regr.uri

    async def order_dns01(self, names: Sequence[str], key_pem: bytes,
                          publish: Callable[[DnsChallenges], Awaitable[None]],
                          withdraw: Callable[[DnsChallenges], Awaitable[None]],
                          deadline: float = 90.0) -> Issued:
        """A certificate for `names` (wildcards allowed) by DNS-01; see the module's docstring."""
        return await self._order(challenges.DNS01, names, key_pem, publish, withdraw, deadline)

    async def order_http01(self, names: Sequence[str], key_pem: bytes,
                           publish: Callable[[HttpChallenges], Awaitable[None]],
                           withdraw: Callable[[HttpChallenges], Awaitable[None]],
                           deadline: float = 90.0) -> Issued:
        """A certificate for `names` (no wildcard) by HTTP-01; see the module's docstring."""
        return await self._order(challenges.HTTP01, names, key_pem, publish, withdraw, deadline)

    async def _order(self, kind: type[challenges.KeyAuthorizationChallenge], names: Sequence[str],
                     key_pem: bytes, publish: Callable[[Any], Awaitable[None]],
                     withdraw: Callable[[Any], Awaitable[None]], deadline: float) -> Issued:
        checked = check_names(names)
        csr = csr_pem(key_pem, checked)
        if kind is challenges.HTTP01:
            for i, name in enumerate(checked):
                if name.startswith("*."):
                    raise AcmeError(f"names[{i}]: {name!r}: a wildcard needs dns-01, http-01 cannot prove it")
        if not isinstance(deadline, int | float) or not math.isfinite(deadline) or deadline <= 0:
            raise AcmeError(f"deadline: {deadline!r} is not a positive number of seconds")
        label = f"ACME order for {', '.join(checked)}"
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        state = {"step": "starting"}
        published: Any = None
        try:
            async with asyncio.timeout(deadline):
                state["step"] = "registering the account"
                if self._account is None:
                    await self.register()
                client = await self._client(self._account)
                state["step"] = "placing the order"
                orderr = await self._call(f"{label}: new order", client.new_order, csr)
                pending = self._challenges(kind, orderr, label)
                if pending:
                    published = self._published(kind, pending)
                    state["step"] = f"publishing the {kind.typ} challenges (the caller's publish)"
                    try:
                        await publish(published)
                    except Exception as e:
                        raise _failure(f"{label}: publishing the challenges", e) from e
                for p in pending:
                    state["step"] = f"answering the {kind.typ} challenge for {p.name}"
                    await self._call(f"{label}: answering the {kind.typ} challenge for {p.name}",
                                     client.answer_challenge, p.challb, p.response)
                await self._await_valid(client, pending, label, kind, state)
                state["step"] = "finalizing (the CA is issuing the certificate)"
                until = datetime.datetime.now() + datetime.timedelta(seconds=max(0.0, end - loop.time()))
                done = await self._call(f"{label}: finalizing", client.finalize_order, orderr, until)
                issued = self._check_issued(done.fullchain_pem, key_pem, checked, label)
        except TimeoutError:
            raise AcmeError(f"{label}: no certificate within the deadline of {deadline:g} s; "
                            f"pending: {state['step']}") from None
        except AcmeError as e:
            if "accountDoesNotExist" in str(e):
                self._account = None  # the CA forgot the account: the next order registers again
            raise
        finally:
            if published is not None:
                await self._withdraw(withdraw, published, label)
        log.info("%s: issued serial %s, valid until %s", label, issued.serial,
                 datetime.datetime.fromtimestamp(issued.not_after, datetime.UTC).isoformat())
        return issued

    def _challenges(self, kind: type[challenges.KeyAuthorizationChallenge], orderr: messages.OrderResource,
                    label: str) -> list[_Pending]:
        """The order's authorizations still to prove, each with its `kind` challenge answered."""
        out: list[_Pending] = []
        for authzr in orderr.authorizations:
            body = authzr.body
            name = ("*." if body.wildcard else "") + body.identifier.value
            if body.status == messages.STATUS_VALID:
                continue
            if body.status != messages.STATUS_PENDING:
                raise AcmeError(f"{label}: the authorization for {name} is {body.status.name}")
            challb = next((c for c in body.challenges if isinstance(c.chall, kind)), None)
            if challb is None:
                offered = ", ".join(sorted({c.chall.typ for c in body.challenges})) or "none"
                raise AcmeError(f"{label}: the CA offers no {kind.typ} challenge for {name} (offers: {offered})")
            response, value = challb.chall.response_and_validation(self._jwk)
            if kind is challenges.DNS01:
                key = challb.chall.validation_domain_name(body.identifier.value)
            else:
                key = challb.chall.encode("token")
            out.append(_Pending(name, authzr, challb, response, key, value))
        return out

    @staticmethod
    def _published(kind: type[challenges.KeyAuthorizationChallenge], pending: list[_Pending]) -> Any:
        if kind is challenges.DNS01:
            txt: dict[str, tuple[str, ...]] = {}
            for p in pending:
                if p.value not in txt.get(p.key, ()):
                    txt[p.key] = (*txt.get(p.key, ()), p.value)
            return txt
        return {p.key: p.value for p in pending}

    async def _await_valid(self, client: acme_lib.ClientV2, pending: list[_Pending], label: str,
                           kind: type[challenges.KeyAuthorizationChallenge], state: dict[str, str]) -> None:
        """Poll until every authorization is valid; the first invalid ones raise with the CA's
        detail. Bounded by the order's deadline (the caller's timeout)."""
        wait = _POLL_FIRST
        todo = list(pending)
        while todo:
            state["step"] = f"the CA validating {', '.join(p.name for p in todo)}"
            await asyncio.sleep(wait)
            wait = min(wait * 2, _POLL_MAX)
            still: list[_Pending] = []
            failed: list[str] = []
            for p in todo:
                authzr, _ = await self._call(f"{label}: polling the authorization for {p.name}",
                                             client.poll, p.authzr)
                status = authzr.body.status
                if status == messages.STATUS_VALID:
                    continue
                if status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                    still.append(p)
                    continue
                errs = [problem_text(c.error) for c in authzr.body.challenges if c.error is not None]
                failed.append(f"{kind.typ} for {p.name} is {status.name}: " + ("; ".join(errs) or "no detail given"))
            if failed:
                raise AcmeError(f"{label}: " + " | ".join(failed))
            todo = still

    @staticmethod
    def _check_issued(chain_pem: str | None, key_pem: bytes, names: tuple[str, ...], label: str) -> Issued:
        if not chain_pem:
            raise AcmeError(f"{label}: the CA sent no certificate")
        try:
            issued = issued_from_chain(chain_pem)
        except AcmeError as e:
            raise AcmeError(f"{label}: the CA's chain: {e}") from None
        if set(issued.names) != set(names):
            raise AcmeError(f"{label}: the CA's certificate names {', '.join(issued.names)}")
        if not _same_public_key(issued.chain_pem, key_pem):
            raise AcmeError(f"{label}: the CA's certificate is not for the key of the CSR")
        return issued

    @staticmethod
    async def _withdraw(withdraw: Callable[[Any], Awaitable[None]], published: Any, label: str) -> None:
        """The caller's withdraw; its failure is logged, never hides the order's outcome."""
        try:
            await withdraw(published)
        except Exception as e:  # the caller's code; a stale challenge is harmless
            log.warning("%s: withdrawing the challenges failed: %s", label, e)
