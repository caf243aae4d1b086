"""Carrying a CancelRequest to the process that issued its key.

[shell] Two hops exist:

* to another *worker* of this instance: over that worker's private Unix socket in the
  instance's run directory. The request is the 16-byte CancelRequest; the answer is one
  byte, ``1`` if the key was right, ``0`` if not, so the worker the client reached can
  apply its failed-login back-off to the client's address as it would for its own keys;
* to another *instance* (``[[peers]]``): a plain PostgreSQL CancelRequest to its normal
  port, as PgBouncer peers do. PostgreSQL's protocol has no answer to a cancel: the peer
  just closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from typing import TYPE_CHECKING

import trio

from trioproxy._protocol.messages import CancelRequest
from trioproxy._server.transport import Transport, TransportClosed, open_tcp
from trioproxy.errors import TrioproxyError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from trioproxy.config import PeerConfig

logger = logging.getLogger("trioproxy.cluster")

_PACKET = struct.Struct("!iiiI")
_CANCEL_CODE = 80877102
#: A forwarding hop must not hold the client's connection for long.
FORWARD_TIMEOUT = 5.0


def cancel_socket_path(directory: Path, worker: int) -> Path:
    return directory / f"cancel-{worker}.sock"


def _packet(process_id: int, secret_key: bytes) -> bytes:
    (secret,) = struct.unpack("!I", secret_key)
    return CancelRequest(process_id, secret).encode()


async def forward_to_worker(
    directory: Path, worker: int, process_id: int, secret_key: bytes
) -> bool | None:
    """Ask worker ``worker`` to cancel; its verdict on the key, or None if unreachable."""
    with trio.move_on_after(FORWARD_TIMEOUT):
        try:
            stream = await trio.open_unix_socket(str(cancel_socket_path(directory, worker)))
        except OSError as exc:
            logger.warning("cancel: worker %d unreachable: %s", worker, exc)
            return None
        async with stream:
            try:
                await stream.send_all(_packet(process_id, secret_key))
                answer = await stream.receive_some(1)
            except trio.BrokenResourceError:
                return None
            return answer == b"1" if answer else None
    logger.warning("cancel: worker %d did not answer within %g s", worker, FORWARD_TIMEOUT)
    return None


async def forward_to_peer(peer: PeerConfig, process_id: int, secret_key: bytes) -> None:
    """Hand a CancelRequest to the instance that issued its key (no answer comes back)."""
    transport: Transport | None = None
    with trio.move_on_after(FORWARD_TIMEOUT):
        try:
            transport = await open_tcp(peer.host, peer.port)
            await transport.send_all(_packet(process_id, secret_key))
            await transport.receive_some(1)  # the peer closes when done
        except (TrioproxyError, TransportClosed) as exc:
            logger.warning(
                "cancel: peer %d (%s:%d) unreachable: %s", peer.peer_id, peer.host, peer.port, exc
            )
        finally:
            if transport is not None:
                transport.close()


async def serve_cancel_socket(
    path: Path,
    check: Callable[[int, bytes], Awaitable[bool]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """This worker's private endpoint for cancel requests other workers forward."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a crashed predecessor with the same worker id
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with (
                trio.move_on_after(FORWARD_TIMEOUT),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                data = b""
                while len(data) < _PACKET.size:
                    chunk = await stream.receive_some(_PACKET.size - len(data))
                    if not chunk:
                        return
                    data += chunk
                length, code, process_id, _secret = _PACKET.unpack(data)
                if length != _PACKET.size or code != _CANCEL_CODE:
                    return
                right = await check(process_id, data[12:16])
                await stream.send_all(b"1" if right else b"0")

    try:
        task_status.started()
        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
