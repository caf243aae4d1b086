"""What the parts of a client session share: the attributes and the I/O primitives.

[shell] ``ClientSession`` is assembled from mixins with one job each (authentication,
session parameters); this base declares, for the type checker, what they use of each
other. It has no behaviour of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trioproxy._pool.pool import BackendPool
    from trioproxy._server.backend import ServerConnection
    from trioproxy._server.proxy import Proxy
    from trioproxy._server.transport import Transport
    from trioproxy._session.state import SessionState
    from trioproxy.config import Config


class SessionBase:
    proxy: Proxy
    config: Config
    transport: Transport
    id: int
    user: str
    database: str
    pool: BackendPool | None
    server: ServerConnection | None
    parameters: dict[str, str]
    extra_parameters: dict[str, str]
    startup_extra_parameters: dict[str, str]
    session: SessionState
    secret_key: bytes
    #: The last answer of the authentication exchange (SASLFinal), held back to go out
    #: with whatever is sent next (AuthenticationOk and the rest): one send per login less.
    _held_reply: bytes = b""

    if TYPE_CHECKING:

        async def _send(self, data: bytes) -> None: ...
        async def _receive(self) -> bytes: ...
        async def _fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None: ...
        async def _borrow(self) -> ServerConnection: ...
        def _try_borrow(self) -> ServerConnection | None: ...
        def _give_back_server(self) -> None: ...
