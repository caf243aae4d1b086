"""Client login: startup negotiation (SSL/GSSENC/Cancel), TLS, and authentication.

[shell] A mixin of ``ClientSession``: SCRAM-SHA-256 (with channel binding over TLS), md5,
and IAM-style auth tokens, all checked by the proxy itself; failed logins back off per
address; unknown users fail exactly like wrong passwords.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, NoReturn

import trio

from trioproxy._auth.md5 import md5_check
from trioproxy._auth.scram import ScramServer
from trioproxy._auth.sigv4 import TokenRejected, looks_like_auth_token, verify_auth_token
from trioproxy._protocol.codes import Frontend
from trioproxy._protocol.framing import (
    MessageReader,
    StartupReader,
)
from trioproxy._protocol.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    PasswordMessage,
    SASLInitialResponse,
    SASLResponse,
)
from trioproxy._protocol.startup import (
    CancelRequestPacket,
    GSSENCRequestPacket,
    SSLRequestPacket,
    StartupPacket,
    parse_startup_packet,
)
from trioproxy._server.admission import peer_host
from trioproxy._server.session_base import SessionBase
from trioproxy._server.transport import TransportClosed
from trioproxy.config import ClientPasswordAuthType, IamAuth
from trioproxy.errors import (
    AuthenticationFailed,
    ProtocolError,
    SQLState,
)

if TYPE_CHECKING:
    from trioproxy._auth.credentials import UserCredentials


logger = logging.getLogger("trioproxy.client")


class _LoginFailed(Exception):
    """Login ended; the client was already told why (or cannot be)."""


class ClientAuthentication(SessionBase):
    async def _negotiate(self) -> StartupPacket:
        reader = StartupReader()
        ssl_refused = False
        tls_context = self.proxy.tls_context
        while True:
            packet = reader.next_packet()
            if packet is None:
                # Usually the packet is already here (a client sends it right after
                # connecting): then take it without a trip through the scheduler.
                data = self.transport.receive_now()
                if data is None:
                    data = await self._receive()
                elif not data:
                    raise TransportClosed("client closed the connection")
                reader.feed(data)
                continue
            request = parse_startup_packet(packet)
            if isinstance(request, SSLRequestPacket):
                if self.transport.is_tls or ssl_refused:
                    raise ProtocolError("SSL negotiation was already done on this connection")
                if reader.buffered:
                    # CVE-2021-23214: bytes after SSLRequest were sent in the clear.
                    raise ProtocolError("received unencrypted data after SSL request")
                if tls_context is None:
                    await self._send(b"N")
                    ssl_refused = True
                    continue
                await self._send(b"S")
                await self.transport.start_tls(tls_context, server_side=True)
            elif isinstance(request, GSSENCRequestPacket):
                if reader.buffered:
                    raise ProtocolError("received unencrypted data after GSSENC request")
                await self._send(b"N")
            elif isinstance(request, CancelRequestPacket):
                # Guessed keys cost time: a wrong key counts as a failed login of this
                # address, so its next attempts wait (never cancelling anyone else's query).
                await self._throttle_answer()
                if not await self.proxy.cancel(
                    request.process_id,
                    request.secret_key,
                    sender=peer_host(self.transport.peer),
                ):
                    self._count_failed_login()
                raise _LoginFailed
            else:
                if reader.buffered:
                    self._carry_over = b""
                    raise ProtocolError("unexpected data after the startup packet")
                return request

    async def _read_password_message(self, reader: MessageReader) -> bytes:
        while (message := reader.next_message()) is None:
            reader.feed(await self._receive())
        if message.type != Frontend.PASSWORD:
            raise ProtocolError(f"expected SASL response, got message type {chr(message.type)!r}")
        return message.body

    async def _authenticate(self, reader: MessageReader) -> None:
        # One snapshot of the credentials for the whole exchange: a secret refresh that
        # swaps proxy.credentials meanwhile affects only later logins.
        store = self.proxy.credentials
        user = store.lookup(self.user)
        if user is not None and user.iam_auth is not IamAuth.DISABLED:
            await self._authenticate_iam(reader, user)
            return
        if user is not None and user.client_password_auth_type is ClientPasswordAuthType.MD5:
            await self._authenticate_md5(reader, user)
            return
        # Over TLS, SCRAM-SHA-256-PLUS is offered with our certificate's binding data.
        binding = self.proxy.channel_binding if self.transport.is_tls else None
        scram = ScramServer(store.verifier_for(self.user), channel_binding=binding)
        await self._send(AuthenticationSASL(scram.mechanisms).encode())
        try:
            initial = SASLInitialResponse.parse(await self._read_password_message(reader))
            server_first = scram.handle_client_first(initial.mechanism, initial.data)
            await self._send(AuthenticationSASLContinue(server_first).encode())
            final = SASLResponse.parse(await self._read_password_message(reader))
            await self._throttle_answer()
            server_final = scram.handle_client_final(final.data)
            if store.lookup(self.user) is None:
                raise AuthenticationFailed("unknown user")  # unreachable: mock never matches
        except AuthenticationFailed as exc:
            # Same answer for a wrong password and an unknown user: no enumeration.
            await self._login_failed(
                f'password authentication failed for user "{self.user}"', exc.message
            )
        except ProtocolError as exc:
            # A broken or downgraded SCRAM exchange (e.g. channel binding claimed but not
            # used) counts as a failed login too; run() answers it with its SQLSTATE.
            logger.info(
                "client %d: SCRAM exchange for user %r refused: %s", self.id, self.user, exc.message
            )
            self._count_failed_login()
            raise
        self._held_reply = AuthenticationSASLFinal(server_final).encode()

    async def _authenticate_md5(self, reader: MessageReader, user: UserCredentials) -> None:
        """``client_password_auth_type = "md5"``: AuthenticationMD5Password with a fresh
        random salt, checked against md5(password + user) in constant time."""
        salt = secrets.token_bytes(4)
        await self._send(AuthenticationMD5Password(salt).encode())
        response = PasswordMessage.parse(await self._read_password_message(reader)).password
        await self._throttle_answer()
        stored = user.md5_verifier
        if stored is None or not md5_check(stored, salt, response):
            await self._login_failed(
                f'password authentication failed for user "{self.user}"', "wrong password (md5)"
            )

    def _count_failed_login(self) -> None:
        self.proxy.stats.failed_logins += 1
        self.proxy.login_throttle.record_failure(
            peer_host(self.transport.peer), trio.current_time()
        )

    async def _throttle_answer(self) -> None:
        """Failed-login back-off: once this client's address has failed too often, wait
        before *any* authentication answer (so the wait reveals nothing). Only this
        client's task sleeps; client_login_timeout still bounds the whole login."""
        throttle = self.proxy.login_throttle
        if not len(throttle):
            return  # no address has a failure on record: nobody waits (delay_for says 0)
        delay = throttle.delay_for(peer_host(self.transport.peer), trio.current_time())
        if delay > 0:
            logger.debug(
                "client %d: authentication answer delayed %.2f s (failed logins from %s)",
                self.id,
                delay,
                self.transport.peer,
            )
            await trio.sleep(delay)

    async def _login_failed(self, message: str, reason: str) -> NoReturn:
        """Refuse the login: the client gets ``message``, only the log gets ``reason``."""
        logger.info(
            "client %d: authentication failed for user %r from %s: %s",
            self.id,
            self.user,
            self.transport.peer,
            reason,
        )
        self._count_failed_login()
        await self._fatal(SQLState.INVALID_PASSWORD, message)
        raise _LoginFailed

    async def _authenticate_iam(self, reader: MessageReader, user: UserCredentials) -> None:
        """An IAM-style auth token (or, with iam_auth = ENABLED, the password) sent as a
        cleartext password: asked for only over TLS, as RDS Proxy does."""
        if not self.transport.is_tls:
            logger.info("client %d: IAM login refused without TLS", self.id)
            await self._fatal(
                SQLState.INVALID_AUTHORIZATION,
                "IAM authentication is allowed only with SSL connections.",
            )
            raise _LoginFailed
        await self._send(AuthenticationCleartextPassword().encode())
        body = await self._read_password_message(reader)
        secret = PasswordMessage.parse(body).password.decode("utf-8", "surrogateescape")
        await self._throttle_answer()
        policy = self.proxy.iam_policy
        if looks_like_auth_token(secret) and policy is not None:
            try:
                verified = verify_auth_token(
                    secret,
                    db_user=self.user,
                    keys=self.proxy.iam_keys,
                    policy=policy,
                    now=time.time(),
                )
            except TokenRejected as exc:
                await self._login_failed(
                    f'IAM authentication failed for user "{self.user}"', f"token rejected: {exc}"
                )
            logger.info(
                "client %d: IAM token of key %s accepted for user %r",
                self.id,
                verified.access_key_id,
                self.user,
            )
            return
        if user.iam_auth is IamAuth.ENABLED and user.verifier is not None:
            verifier = user.verifier
            # PBKDF2 is deliberately slow: keep it off the event loop.
            if await trio.to_thread.run_sync(verifier.check_password, secret):
                return
            await self._login_failed(
                f'password authentication failed for user "{self.user}"', "wrong password"
            )
        await self._login_failed(
            f'IAM authentication failed for user "{self.user}"', "not an IAM auth token"
        )
