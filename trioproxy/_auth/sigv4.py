"""IAM database auth tokens (RDS-style SigV4 presigned URLs), verified offline, sans-IO.

A client that logs in the way RDS Proxy clients do sends, as its password, a token made by
``boto3.client("rds").generate_db_auth_token(...)`` or ``new Signer({...}).getAuthToken()``
from ``@aws-sdk/rds-signer``: a SigV4 query-string-signed ``GET`` of ``https://host:port/`` with
the scheme cut off::

    proxy.example.internal:5432/?Action=connect&DBUser=app&X-Amz-Algorithm=AWS4-HMAC-SHA256
    &X-Amz-Credential=AKID%2F20261128%2Fus-east-1%2Frds-db%2Faws4_request
    &X-Amz-Date=20261128T120000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host
    &X-Amz-Signature=<64 hex digits>

(one line; ``X-Amz-Security-Token=...`` may be there too). :func:`verify_auth_token` checks
such a token against the proxy's own key registry (access key id -> :class:`AccessKey`) and a
:class:`TokenPolicy`; nothing here talks to AWS. :func:`generate_auth_token` is our own signer,
for tests, demos and docs; it makes the same string botocore does.

What is signed (as botocore and the JS SDK do it for service ``rds-db``)::

    canonical request = "GET\\n/\\n" + canonical query + "\\n"
                        + "host:" + host header + "\\n\\n" + "host\\n" + hex(SHA-256(b""))
    string to sign    = "AWS4-HMAC-SHA256\\n" + X-Amz-Date + "\\n"
                        + yyyymmdd + "/" + region + "/rds-db/aws4_request\\n"
                        + hex(SHA-256(canonical request))
    signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, yyyymmdd), region), "rds-db"),
                             "aws4_request")
    signature         = hex(HMAC(signing key, string to sign))

The canonical query is every parameter but ``X-Amz-Signature``, name and value
percent-encoded per RFC 3986 (unreserved ``A-Z a-z 0-9 - _ . ~`` kept, every other UTF-8
byte as ``%XX`` in upper case), sorted by name, joined with ``&``. The payload hash is that of
the empty body: presigned RDS tokens do not use ``UNSIGNED-PAYLOAD`` (that is S3's).

The host header the client signed is not always the host:port written in the token: botocore
lower-cases the host and drops the port when it is 443, the JS SDK signs the host exactly as
written and always with its port. The verifier tries those few spellings of the one endpoint
(:func:`_host_header_candidates`); all of them name the endpoint that the policy accepted.

Session tokens (``X-Amz-Security-Token``) are accepted and, being part of the signed query,
cannot be altered, but they are **not** checked with STS or anywhere else: the signature by
the registered secret key is the whole proof. A key in the registry is a long-term secret the
proxy shares with its clients, whatever a client's SDK calls it.

A token is a bearer credential: anyone who sees it can log in with it, as often as they like,
until it expires (at most ``max_expires`` seconds, 15 minutes by default), exactly as with RDS.
Accept tokens only over TLS, and never log them.

Every way a token can fail raises :class:`TokenRejected`, with a :class:`RejectCode` for
metrics and tests and a precise ``reason`` for the proxy's log. Neither ever tells the client
anything (the shell answers every failure with the same "password authentication failed"),
and the reason never contains a secret key, the signature or the session token: at most short,
escaped quotes of the token's other fields.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import re
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "ALGORITHM",
    "ANY_USER",
    "MAX_TOKEN_LENGTH",
    "SERVICE",
    "AccessKey",
    "RejectCode",
    "TokenPolicy",
    "TokenRejected",
    "VerifiedToken",
    "generate_auth_token",
    "looks_like_auth_token",
    "verify_auth_token",
]

ALGORITHM: Final = "AWS4-HMAC-SHA256"
SERVICE: Final = "rds-db"
TERMINATOR: Final = "aws4_request"
ANY_USER: Final = "*"
# Real tokens are 400-1500 bytes (session tokens make the long ones); a PostgreSQL password
# message can be far longer, so refuse oversized ones before parsing anything.
MAX_TOKEN_LENGTH: Final = 4096
# What AWS itself allows for X-Amz-Expires; the policy's max_expires is the real limit.
_SIGV4_MAX_EXPIRES: Final = 604800
_EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
_DEFAULT_HTTPS_PORT: Final = 443

_P_ACTION: Final = "Action"
_P_USER: Final = "DBUser"
_P_ALGORITHM: Final = "X-Amz-Algorithm"
_P_CREDENTIAL: Final = "X-Amz-Credential"
_P_DATE: Final = "X-Amz-Date"
_P_EXPIRES: Final = "X-Amz-Expires"
_P_SIGNED_HEADERS: Final = "X-Amz-SignedHeaders"
_P_SIGNATURE: Final = "X-Amz-Signature"
_P_SECURITY_TOKEN: Final = "X-Amz-Security-Token"  # noqa: S105 - a parameter name
_REQUIRED_PARAMS: Final = (
    _P_ACTION,
    _P_USER,
    _P_ALGORITHM,
    _P_CREDENTIAL,
    _P_DATE,
    _P_EXPIRES,
    _P_SIGNED_HEADERS,
    _P_SIGNATURE,
)
_KNOWN_PARAMS: Final = frozenset((*_REQUIRED_PARAMS, _P_SECURITY_TOKEN))

# RFC 3986 section 2.3.
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"
)
# What may appear in the token at all: printable ASCII, no space. (Everything else arrives
# percent-encoded from every SDK.)
_TOKEN_CHARS_RE: Final = re.compile(r"[\x21-\x7e]*")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
# A DNS name or IPv4 address (letters, digits, '-', '.'; RFC 1123), or an IPv6 literal.
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_IPV6_RE: Final = re.compile(r"\[[0-9A-Fa-f:.]+\]")
_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_AMZ_DATE_RE: Final = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})Z")
_REGION_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_EXPIRES_RE: Final = re.compile(r"[1-9][0-9]{0,6}")
_SIGNATURE_RE: Final = re.compile(r"[0-9a-f]{64}")
# For log reasons: how much of an attacker-supplied value we quote.
_SHOW_MAX: Final = 64
# ... and of an unknown parameter name: enough for "X-Amz-Content-Sha256", too little for a
# name that swallowed a signature or session token because its '&' was lost.
_SHOW_NAME_MAX: Final = 20


class RejectCode(enum.StrEnum):
    """Why a token was refused, coarse enough for a metric label."""

    TOO_LONG = "too_long"
    MALFORMED = "malformed"  # not host:port/?query, bad characters, bad percent-encoding
    DUPLICATE_PARAM = "duplicate_param"
    UNKNOWN_PARAM = "unknown_param"
    MISSING_PARAM = "missing_param"
    BAD_ACTION = "bad_action"
    BAD_ALGORITHM = "bad_algorithm"
    BAD_CREDENTIAL = "bad_credential"  # X-Amz-Credential is not key/date/region/rds-db/aws4_request
    BAD_DATE = "bad_date"  # X-Amz-Date malformed, or not the credential scope's date
    BAD_EXPIRES = "bad_expires"  # X-Amz-Expires not an integer 1..604800
    BAD_SIGNED_HEADERS = "bad_signed_headers"
    BAD_SIGNATURE_FORMAT = "bad_signature_format"
    UNKNOWN_KEY = "unknown_key"
    SIGNATURE_MISMATCH = "signature_mismatch"
    WRONG_ENDPOINT = "wrong_endpoint"
    WRONG_REGION = "wrong_region"
    WRONG_USER = "wrong_user"  # signed for another database user than the one logging in
    USER_NOT_ALLOWED = "user_not_allowed"  # the key may not log in as this user
    EXPIRES_TOO_LONG = "expires_too_long"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"  # dated in the future beyond the allowed clock skew


class TokenRejected(Exception):
    """The token does not let this client in.

    ``reason`` is for the proxy's log only: never send it to the client. It never contains
    the secret key, the signature (given or expected) or the session token.
    """

    def __init__(self, code: RejectCode, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def _frozen_str_set(values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str):
        # frozenset("abc") would silently be {"a", "b", "c"}.
        raise TypeError("expected a collection of strings, not a single string")
    return frozenset(values)


def _normalize_endpoints(values: Iterable[str]) -> frozenset[str]:
    endpoints = _frozen_str_set(values)
    normalized: set[str] = set()
    for endpoint in endpoints:
        parsed = _split_host_port(endpoint)
        if parsed is None:
            raise ValueError(f"endpoint must be host:port, got {endpoint!r}")
        host, port = parsed
        normalized.add(f"{host.lower()}:{port}")
    return frozenset(normalized)


def _check_access_key_id(instance: object, attribute: object, value: str) -> None:
    if not value or "/" in value or not _TOKEN_CHARS_RE.fullmatch(value):
        raise ValueError(f"bad access key id {value!r}")


def _check_nonempty(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty")


@attrs.frozen(kw_only=True)
class AccessKey:
    """One entry of the proxy's key registry.

    ``allowed_users`` names the database users this key may log in as; ``"*"`` allows any.
    """

    access_key_id: str = attrs.field(validator=_check_access_key_id)
    secret_access_key: str = attrs.field(repr=False, validator=_check_nonempty)
    allowed_users: frozenset[str] = attrs.field(converter=_frozen_str_set)

    def allows(self, db_user: str) -> bool:
        return ANY_USER in self.allowed_users or db_user in self.allowed_users


@attrs.frozen(kw_only=True)
class TokenPolicy:
    """What the proxy accepts besides a good signature.

    ``endpoints`` are the ``host:port`` names clients sign for (the host is compared case-
    insensitively; IPv6 as ``[::1]:5432``); ``regions`` the regions in the credential scope.
    ``max_clock_skew`` (seconds) is how far in the future X-Amz-Date may be; it does not
    lengthen a token's life. ``max_expires`` caps X-Amz-Expires (RDS uses 900).
    """

    endpoints: frozenset[str] = attrs.field(converter=_normalize_endpoints)
    regions: frozenset[str] = attrs.field(converter=_frozen_str_set)
    max_clock_skew: float = attrs.field(default=300.0)
    max_expires: int = attrs.field(default=900)

    @max_clock_skew.validator
    def _check_skew(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not 0 <= value <= 3600:
            raise ValueError(f"max_clock_skew must be within 0..3600 seconds, got {value!r}")

    @max_expires.validator
    def _check_max_expires(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not 1 <= value <= _SIGV4_MAX_EXPIRES:
            raise ValueError(f"max_expires must be within 1..{_SIGV4_MAX_EXPIRES}, got {value!r}")


@attrs.frozen(kw_only=True)
class VerifiedToken:
    """A token that passed every check."""

    access_key_id: str
    db_user: str
    region: str
    endpoint: str  # "host:port" as the policy spells it (host lower-cased)
    signed_at: float  # epoch seconds (X-Amz-Date)
    expires_at: float  # epoch seconds: signed_at + X-Amz-Expires
    has_session_token: bool


# --- encoding ----------------------------------------------------------------------------


def _uri_encode(value: str) -> str:
    """RFC 3986 percent-encoding of the UTF-8 bytes, as SigV4 wants it (upper-case hex)."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in value.encode("utf-8"))


def _strict_unquote(value: str, what: str) -> str:
    """Percent-decode; reject stray '%', bad hex and non-UTF-8. '+' stays a plus sign."""
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == "%":
            pair = value[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise TokenRejected(RejectCode.MALFORMED, f"bad percent-encoding in {what}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(ord(c))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenRejected(RejectCode.MALFORMED, f"{what} is not UTF-8") from None


def _show(value: str, limit: int = _SHOW_MAX) -> str:
    """Quote a value from the token for the log: bounded, escaped, one line."""
    if len(value) > limit:
        return repr(value[:limit]) + f"...({len(value)} chars)"
    return repr(value)


def _split_host_port(authority: str) -> tuple[str, int] | None:
    host, sep, port_text = authority.rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port_text):
        return None
    port = int(port_text)
    if port > 65535:
        return None
    if not (_HOSTNAME_RE.fullmatch(host) or _IPV6_RE.fullmatch(host)):
        return None
    return host, port


# --- signing -----------------------------------------------------------------------------


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.digest(key, msg.encode("utf-8"), "sha256")


def _signing_key(secret: str, date: str, region: str) -> bytes:
    k_date = _hmac(("AWS4" + secret).encode("utf-8"), date)
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, SERVICE)
    return _hmac(k_service, TERMINATOR)


def _canonical_query(params: Mapping[str, str]) -> str:
    pairs = sorted(
        (_uri_encode(name), _uri_encode(value))
        for name, value in params.items()
        if name != _P_SIGNATURE
    )
    return "&".join(f"{name}={value}" for name, value in pairs)


def _signature(
    *, secret: str, amz_date: str, region: str, host_header: str, canonical_query: str
) -> str:
    canonical_request = "\n".join(
        ("GET", "/", canonical_query, f"host:{host_header}", "", "host", _EMPTY_SHA256)
    )
    scope = f"{amz_date[:8]}/{region}/{SERVICE}/{TERMINATOR}"
    string_to_sign = "\n".join(
        (
            ALGORITHM,
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        )
    )
    return hmac.new(
        _signing_key(secret, amz_date[:8], region), string_to_sign.encode("utf-8"), "sha256"
    ).hexdigest()


def _host_header_candidates(host: str, port: int) -> list[str]:
    """The host headers a client may have signed for ``host:port``, most likely first.

    botocore: lower-cased host, port left out when it is 443 (the https default). The JS SDK:
    the host as the caller wrote it, port always included. Go and others: one of these.
    """
    candidates = [_botocore_host_header(host, port), f"{host}:{port}", f"{host.lower()}:{port}"]
    if port == _DEFAULT_HTTPS_PORT:
        candidates.append(host)
    return list(dict.fromkeys(candidates))


def _botocore_host_header(host: str, port: int) -> str:
    host = host.lower()
    return host if port == _DEFAULT_HTTPS_PORT else f"{host}:{port}"


def _format_amz_date(now: float) -> str:
    moment = datetime.datetime.fromtimestamp(int(now), tz=datetime.UTC)
    return moment.strftime("%Y%m%dT%H%M%SZ")


def generate_auth_token(
    *,
    host: str,
    port: int,
    db_user: str,
    region: str,
    key: AccessKey,
    now: float,
    expires: int = 900,
    session_token: str | None = None,
) -> str:
    """Sign a token the way ``generate_db_auth_token`` in botocore does (same string).

    ``now`` is epoch seconds (fractions are dropped, as X-Amz-Date has whole seconds).
    """
    if _split_host_port(f"{host}:{port}") is None:
        raise ValueError(f"bad endpoint {host!r}:{port!r}")
    if not _REGION_RE.fullmatch(region):
        raise ValueError(f"bad region {region!r}")
    if not 1 <= expires <= _SIGV4_MAX_EXPIRES:
        raise ValueError(f"expires must be within 1..{_SIGV4_MAX_EXPIRES}, got {expires!r}")
    amz_date = _format_amz_date(now)
    params = {
        _P_ACTION: "connect",
        _P_USER: db_user,
        _P_ALGORITHM: ALGORITHM,
        _P_CREDENTIAL: f"{key.access_key_id}/{amz_date[:8]}/{region}/{SERVICE}/{TERMINATOR}",
        _P_DATE: amz_date,
        _P_EXPIRES: str(expires),
        _P_SIGNED_HEADERS: "host",
    }
    if session_token is not None:
        params[_P_SECURITY_TOKEN] = session_token
    signature = _signature(
        secret=key.secret_access_key,
        amz_date=amz_date,
        region=region,
        host_header=_botocore_host_header(host, port),
        canonical_query=_canonical_query(params),
    )
    query = "&".join(f"{_uri_encode(k)}={_uri_encode(v)}" for k, v in params.items())
    return f"{host}:{port}/?{query}&{_P_SIGNATURE}={signature}"


# --- verification --------------------------------------------------------------------------


def looks_like_auth_token(password: str) -> bool:
    """A cheap guess whether a password is an IAM auth token rather than a real password."""
    return (
        len(password) <= MAX_TOKEN_LENGTH
        and "?" in password
        and f"{_P_SIGNATURE}=" in password
        and f"{_P_ALGORITHM}=" in password
    )


@attrs.frozen
class _Parsed:
    host: str
    port: int
    params: dict[str, str]


def _parse(token: str) -> _Parsed:
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenRejected(
            RejectCode.TOO_LONG, f"token is {len(token)} characters, over {MAX_TOKEN_LENGTH}"
        )
    if not _TOKEN_CHARS_RE.fullmatch(token):
        raise TokenRejected(
            RejectCode.MALFORMED, "token has characters outside printable ASCII or spaces"
        )
    location, sep, query = token.partition("?")
    if not sep:
        raise TokenRejected(RejectCode.MALFORMED, "token has no '?' (not host:port/?query)")
    # botocore and the JS SDK write host:port/?..., the Go SDK host:port?... (both sign "/").
    authority = location.removesuffix("/")
    if "/" in authority:
        raise TokenRejected(RejectCode.MALFORMED, "token path is not '/'")
    if "#" in query:
        raise TokenRejected(RejectCode.MALFORMED, "token has a fragment")
    host_port = _split_host_port(authority)
    if host_port is None:
        raise TokenRejected(
            RejectCode.MALFORMED, f"token starts with no host:port, {_show(authority)}"
        )
    params: dict[str, str] = {}
    for index, field in enumerate(query.split("&"), 1):
        raw_name, eq, raw_value = field.partition("=")
        # Every SDK percent-encodes '=' in values. (Quote none of it: a field that lost its
        # '=' or '&' may hold the signature or the session token.)
        if not eq or not raw_name or "=" in raw_value:
            raise TokenRejected(RejectCode.MALFORMED, f"query field {index} is not name=value")
        name = _strict_unquote(raw_name, "a parameter name")
        if name not in _KNOWN_PARAMS:
            raise TokenRejected(
                RejectCode.UNKNOWN_PARAM, f"unknown parameter {_show(name, _SHOW_NAME_MAX)}"
            )
        if name in params:
            raise TokenRejected(RejectCode.DUPLICATE_PARAM, f"parameter {name} given twice")
        params[name] = _strict_unquote(raw_value, name)
    missing = [name for name in _REQUIRED_PARAMS if name not in params]
    if missing:
        raise TokenRejected(RejectCode.MISSING_PARAM, f"missing {', '.join(missing)}")
    return _Parsed(host=host_port[0], port=host_port[1], params=params)


def _amz_date_epoch(amz_date: str) -> float:
    m = _AMZ_DATE_RE.fullmatch(amz_date)
    if m is None:
        raise TokenRejected(
            RejectCode.BAD_DATE, f"X-Amz-Date {_show(amz_date)} is not YYYYMMDDTHHMMSSZ"
        )
    year, month, day, hour, minute, second = (int(part) for part in m.groups())
    try:
        moment = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    except ValueError:
        raise TokenRejected(
            RejectCode.BAD_DATE, f"X-Amz-Date {_show(amz_date)} is no real time"
        ) from None
    return moment.timestamp()


def verify_auth_token(
    token: str,
    *,
    db_user: str,
    keys: Mapping[str, AccessKey],
    policy: TokenPolicy,
    now: float,
) -> VerifiedToken:
    """Check ``token``, sent as the password of a login as ``db_user``, at time ``now``.

    ``now`` is epoch seconds. Returns what the token proves; raises :class:`TokenRejected`
    (and nothing else, whatever the token) when it must not let the client in. Syntax is
    checked first, then the signature, then what the signed token asks for: so a forged
    token is refused as a signature mismatch, and a genuine one for the wrong user, endpoint,
    region or time says exactly that in the log.
    """
    parsed = _parse(token)
    p = parsed.params

    # --- syntax of the signed fields
    if p[_P_ACTION] != "connect":
        raise TokenRejected(RejectCode.BAD_ACTION, f"Action is {_show(p[_P_ACTION])}, not connect")
    if p[_P_ALGORITHM] != ALGORITHM:
        raise TokenRejected(
            RejectCode.BAD_ALGORITHM, f"X-Amz-Algorithm is {_show(p[_P_ALGORITHM])}"
        )
    if p[_P_SIGNED_HEADERS] != "host":
        raise TokenRejected(
            RejectCode.BAD_SIGNED_HEADERS,
            f"X-Amz-SignedHeaders is {_show(p[_P_SIGNED_HEADERS])}, not host",
        )
    credential = p[_P_CREDENTIAL].split("/")
    if (
        len(credential) != 5
        or not credential[0]
        or credential[3] != SERVICE
        or credential[4] != TERMINATOR
        or not _REGION_RE.fullmatch(credential[2])
    ):
        raise TokenRejected(
            RejectCode.BAD_CREDENTIAL,
            f"X-Amz-Credential {_show(p[_P_CREDENTIAL])} is not "
            "<key>/<yyyymmdd>/<region>/rds-db/aws4_request",
        )
    access_key_id, scope_date, region = credential[0], credential[1], credential[2]
    amz_date = p[_P_DATE]
    signed_at = _amz_date_epoch(amz_date)
    if scope_date != amz_date[:8]:
        raise TokenRejected(
            RejectCode.BAD_DATE,
            f"credential scope date {_show(scope_date)} is not the date of X-Amz-Date {amz_date}",
        )
    if not _EXPIRES_RE.fullmatch(p[_P_EXPIRES]) or int(p[_P_EXPIRES]) > _SIGV4_MAX_EXPIRES:
        raise TokenRejected(
            RejectCode.BAD_EXPIRES,
            f"X-Amz-Expires {_show(p[_P_EXPIRES])} is not an integer 1..{_SIGV4_MAX_EXPIRES}",
        )
    expires = int(p[_P_EXPIRES])
    if not _SIGNATURE_RE.fullmatch(p[_P_SIGNATURE]):
        raise TokenRejected(
            RejectCode.BAD_SIGNATURE_FORMAT, "X-Amz-Signature is not 64 lower-case hex digits"
        )

    # --- the signature
    key = keys.get(access_key_id)
    if key is None or key.access_key_id != access_key_id:
        raise TokenRejected(RejectCode.UNKNOWN_KEY, f"unknown access key id {_show(access_key_id)}")
    canonical_query = _canonical_query(p)
    given = p[_P_SIGNATURE].encode("ascii")
    matched = False
    for host_header in _host_header_candidates(parsed.host, parsed.port):
        expected = _signature(
            secret=key.secret_access_key,
            amz_date=amz_date,
            region=region,
            host_header=host_header,
            canonical_query=canonical_query,
        )
        # No early exit: every candidate costs the same whichever matches.
        matched |= hmac.compare_digest(expected.encode("ascii"), given)
    if not matched:
        raise TokenRejected(
            RejectCode.SIGNATURE_MISMATCH,
            f"signature does not match for key {access_key_id} (tampered token or wrong secret)",
        )

    # --- what the genuine token asks for
    endpoint = f"{parsed.host.lower()}:{parsed.port}"
    if endpoint not in policy.endpoints:
        raise TokenRejected(
            RejectCode.WRONG_ENDPOINT,
            f"token signed for {_show(endpoint)}, not an endpoint of ours",
        )
    if region not in policy.regions:
        raise TokenRejected(RejectCode.WRONG_REGION, f"token signed for region {region}")
    token_user = p[_P_USER]
    if token_user != db_user:
        raise TokenRejected(
            RejectCode.WRONG_USER,
            f"token signed for database user {_show(token_user)}, login is as {_show(db_user)}",
        )
    if not key.allows(db_user):
        raise TokenRejected(
            RejectCode.USER_NOT_ALLOWED,
            f"key {access_key_id} may not log in as database user {_show(db_user)}",
        )
    if expires > policy.max_expires:
        raise TokenRejected(
            RejectCode.EXPIRES_TOO_LONG,
            f"X-Amz-Expires {expires} is over the allowed {policy.max_expires}",
        )
    if signed_at > now + policy.max_clock_skew:
        raise TokenRejected(
            RejectCode.NOT_YET_VALID,
            f"token dated {amz_date}, {signed_at - now:.0f} s ahead of our clock "
            f"(allowed skew {policy.max_clock_skew:g} s)",
        )
    expires_at = signed_at + expires
    if now >= expires_at:
        raise TokenRejected(
            RejectCode.EXPIRED,
            f"token dated {amz_date} expired {now - expires_at:.0f} s ago (lifetime {expires} s)",
        )
    return VerifiedToken(
        access_key_id=access_key_id,
        db_user=token_user,
        region=region,
        endpoint=endpoint,
        signed_at=signed_at,
        expires_at=expires_at,
        has_session_token=_P_SECURITY_TOKEN in p,
    )
