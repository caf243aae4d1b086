"""Secret sources for the database credentials: parsing and applying them, sans-IO.

[core] A user may take its backend credentials (and, as RDS Proxy does, the password its
clients are checked against) from a *secret*: a JSON document in AWS Secrets Manager's
shape, ``{"username": "...", "password": "...", ...}``, read from a file (``secret_file``)
or from Secrets Manager (``secret_arn``). Reading is the shell's job
(``trioproxy._server.secret_refresh``); this module only

* parses the document (:func:`parse_secret`),
* describes where a user's secret lives (:func:`secret_ref`), and
* merges the secrets into the configured users (:func:`effective_users`), giving the
  ``UserSource`` objects a ``CredentialStore`` is built from.

Rules of the merge, for a user with a secret:

* the secret's ``username``, when present, is the backend user (rotation "alternating
  users" swaps it); otherwise ``backend_user`` (default: the user's own name);
* the secret's ``password`` is the backend password;
* clients are checked against the user's own ``password``/``scram_verifier`` when the table
  gives one, else against the secret's password.

Error messages name the user and the source, never the secret's content: a :class:`SecretError`
may be logged.
"""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING

import attrs

from trioproxy.config import ClientPasswordAuthType, IamAuth

if TYPE_CHECKING:
    from collections.abc import Mapping

    from trioproxy.config import UserConfig

__all__ = [
    "EffectiveUser",
    "SecretError",
    "SecretKind",
    "SecretRef",
    "SecretValue",
    "arn_region",
    "effective_users",
    "parse_secret",
    "secret_ref",
]

#: A secret document larger than this is refused (Secrets Manager's own limit is 64 KiB).
MAX_SECRET_SIZE = 65536


class SecretError(ValueError):
    """A secret could not be read or parsed. The message never quotes the secret."""


class SecretKind(enum.Enum):
    FILE = "secret_file"
    ARN = "secret_arn"


@attrs.frozen
class SecretRef:
    """Where one user's secret lives. Neither a path nor an ARN is itself a secret."""

    kind: SecretKind
    location: str

    def __str__(self) -> str:
        return f"{self.kind.value} {self.location}"


@attrs.frozen(kw_only=True)
class SecretValue:
    """The part of a secret the proxy uses."""

    username: str | None
    password: str = attrs.field(repr=False)


def parse_secret(data: str | bytes) -> SecretValue:
    """Parse a Secrets Manager style JSON document; raise :class:`SecretError`.

    ``password`` is required, ``username`` optional; every other key (``engine``, ``host``,
    ``port``, ``dbname``, ...) is ignored: where the database is comes from ``[backend]``.
    """
    if len(data) > MAX_SECRET_SIZE:
        raise SecretError(f"secret is larger than {MAX_SECRET_SIZE} bytes")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError("secret is not UTF-8 text") from None
    try:
        document = json.loads(data)
    except ValueError:
        # The decoder's message can quote the document: leave it out.
        raise SecretError(
            'secret is not a JSON object like {"username": ..., "password": ...}'
        ) from None
    if not isinstance(document, dict):
        raise SecretError('secret is not a JSON object like {"username": ..., "password": ...}')
    password = document.get("password")
    if not isinstance(password, str) or not password:
        raise SecretError('secret has no "password" string')
    if "\0" in password:
        raise SecretError('secret "password" contains NUL characters')
    username = document.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise SecretError('secret "username" must be a non-empty string')
    if username is not None and "\0" in username:
        raise SecretError('secret "username" contains NUL characters')
    return SecretValue(username=username, password=password)


def secret_ref(user: UserConfig) -> SecretRef | None:
    """Where ``user``'s secret lives, or None for a user without a secret source."""
    if user.secret_file is not None:
        return SecretRef(SecretKind.FILE, str(user.secret_file))
    if user.secret_arn is not None:
        return SecretRef(SecretKind.ARN, user.secret_arn)
    return None


def arn_region(arn: str) -> str:
    """The region field of an ARN (``arn:aws:secretsmanager:<region>:...``)."""
    parts = arn.split(":")
    if len(parts) < 7 or parts[0] != "arn" or not parts[3]:
        raise SecretError(f"not a Secrets Manager ARN: {arn}")
    return parts[3]


@attrs.frozen(kw_only=True)
class EffectiveUser:
    """A configured user with its secret applied (a ``credentials.UserSource``)."""

    name: str
    password: str | None = attrs.field(repr=False)
    scram_verifier: str | None = attrs.field(repr=False)
    backend_user: str
    backend_password: str | None = attrs.field(repr=False)
    iam_auth: IamAuth = IamAuth.DISABLED
    client_password_auth_type: ClientPasswordAuthType = ClientPasswordAuthType.SCRAM_SHA_256


def effective_users(
    users: Mapping[str, UserConfig], secrets: Mapping[str, SecretValue]
) -> dict[str, EffectiveUser]:
    """The users with their secrets applied.

    ``secrets`` maps user names to the values read for them; a user that has a secret
    source but no entry raises :class:`SecretError` (the caller decides whether that means
    "cannot start" or "keep the previous credentials").
    """
    result: dict[str, EffectiveUser] = {}
    for name, user in users.items():
        ref = secret_ref(user)
        password = user.password
        backend_user = user.backend_user
        backend_password = user.backend_password
        if ref is not None:
            secret = secrets.get(name)
            if secret is None:
                raise SecretError(f"user {name!r}: {ref} has not been read")
            if password is None:
                password = secret.password
            backend_user = secret.username or backend_user
            backend_password = secret.password
        result[name] = EffectiveUser(
            name=name,
            password=password,
            scram_verifier=user.scram_verifier,
            backend_user=backend_user,
            backend_password=backend_password,
            iam_auth=user.iam_auth,
            client_password_auth_type=user.client_password_auth_type,
        )
    return result
