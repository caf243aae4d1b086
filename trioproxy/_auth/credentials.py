"""Who may log in, with what, and which credentials the proxy uses for the server.

[core] Built once from the configuration (and rebuilt on reload). Client verifiers are
derived here, at load time, so no PBKDF2 ever runs per login on the event loop. An unknown
user gets a deterministic mock verifier: the SCRAM exchange looks the same and fails at
the same step as a wrong password, so user names cannot be enumerated.

Secret sources (``secret_file`` / ``secret_arn``) are merged into the users before the
store is built (``trioproxy._auth.secrets.effective_users``); when they rotate, a new store
replaces this one, built with ``previous=`` so unchanged passwords keep their verifiers.
"""

from __future__ import annotations

import hmac
import secrets
from typing import TYPE_CHECKING, Protocol

import attrs

from trioproxy._auth.md5 import md5_verifier
from trioproxy._auth.scram import ScramVerifier
from trioproxy.config import ClientPasswordAuthType, IamAuth

if TYPE_CHECKING:
    from collections.abc import Mapping


class UserSource(Protocol):
    """What the store needs of a configured user (``trioproxy.config.UserConfig``)."""

    @property
    def name(self) -> str: ...
    @property
    def password(self) -> str | None: ...
    @property
    def scram_verifier(self) -> str | None: ...
    @property
    def backend_user(self) -> str: ...
    @property
    def backend_password(self) -> str | None: ...
    @property
    def iam_auth(self) -> IamAuth: ...
    @property
    def client_password_auth_type(self) -> ClientPasswordAuthType: ...


@attrs.frozen(kw_only=True)
class UserCredentials:
    name: str
    #: None only for users that log in with IAM tokens alone.
    verifier: ScramVerifier | None = attrs.field(repr=False)
    backend_user: str
    backend_password: str | None = attrs.field(repr=False)
    iam_auth: IamAuth = IamAuth.DISABLED
    client_password_auth_type: ClientPasswordAuthType = ClientPasswordAuthType.SCRAM_SHA_256
    #: ``"md5" + md5hex(password + name)``, for clients that use MD5; None without a password.
    md5_verifier: str | None = attrs.field(default=None, repr=False)
    #: A keyed hash of the password the verifier was derived from: a rebuilt store (a
    #: refreshed secret) reuses the verifier, and its salt, when the password is unchanged.
    password_tag: bytes | None = attrs.field(default=None, repr=False, eq=False)


class CredentialStore:
    def __init__(
        self,
        users: Mapping[str, UserSource],
        *,
        mock_secret: bytes | None = None,
        previous: CredentialStore | None = None,
    ) -> None:
        """``previous``: the store this one replaces (secrets were refreshed). Its mock
        secret is kept, so unknown users see the same salts as before, and verifiers of
        unchanged passwords are reused instead of derived again (PBKDF2, random salt).
        """
        if previous is not None:
            mock_secret = previous._mock_secret
        self._mock_secret: bytes = (
            mock_secret if mock_secret is not None else secrets.token_bytes(32)
        )
        self._users: dict[str, UserCredentials] = {}
        for name, user in users.items():
            verifier: ScramVerifier | None = None
            tag: bytes | None = None
            if user.scram_verifier:
                verifier = ScramVerifier.parse(user.scram_verifier)
            elif user.password is not None:
                tag = self._tag(name, user.password)
                old = previous.lookup(name) if previous is not None else None
                if (
                    old is not None
                    and old.password_tag is not None
                    and old.verifier is not None
                    and hmac.compare_digest(old.password_tag, tag)
                ):
                    verifier = old.verifier
                if verifier is None:
                    verifier = ScramVerifier.from_password(user.password)
            elif user.iam_auth is not IamAuth.REQUIRED:
                raise ValueError(f"user {name!r} has neither a password nor a scram_verifier")
            backend_password = (
                user.backend_password if user.backend_password is not None else user.password
            )
            self._users[name] = UserCredentials(
                name=name,
                verifier=verifier,
                backend_user=user.backend_user or name,
                backend_password=backend_password,
                iam_auth=user.iam_auth,
                client_password_auth_type=user.client_password_auth_type,
                md5_verifier=(
                    md5_verifier(name, user.password) if user.password is not None else None
                ),
                password_tag=tag,
            )

    def _tag(self, name: str, password: str) -> bytes:
        message = name.encode("utf-8", "surrogatepass") + b"\0"
        message += password.encode("utf-8", "surrogateescape")
        return hmac.digest(self._mock_secret, b"trioproxy password tag\0" + message, "sha256")

    def backend_login(self, name: str) -> tuple[str, str | None] | None:
        """The backend user and password the proxy uses for ``name`` right now."""
        user = self._users.get(name)
        return None if user is None else (user.backend_user, user.backend_password)

    def __len__(self) -> int:
        return len(self._users)

    def lookup(self, name: str) -> UserCredentials | None:
        return self._users.get(name)

    def verifier_for(self, name: str) -> ScramVerifier:
        """The user's verifier, or a mock one that no proof can satisfy."""
        user = self._users.get(name)
        if user is not None and user.verifier is not None:
            return user.verifier
        return ScramVerifier.mock_for(name, self._mock_secret)
