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

from trioproxy._protocol.codes import CANCEL_REQUEST_CODE
from trioproxy._protocol.startup import CancelRequestPacket, parse_startup_packet
from trioproxy._server.backend import deliver_cancel
from trioproxy.errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from trioproxy.config import PeerConfig

logger = logging.getLogger("trioproxy.cluster")

#: Forwarded requests carry this worker's own keys: 4-byte secrets (16 bytes in all).
_FORWARDED_SIZE = 16
#: A forwarding hop must not hold the client's connection for long.
FORWARD_TIMEOUT = 5.0


def cancel_socket_path(directory: Path, worker: int) -> Path:
    return directory / f"cancel-{worker}.sock"


def _packet(process_id: int, secret_key: bytes) -> bytes:
    """The CancelRequest, byte for byte as the client sent it."""
    return struct.pack("!iii", 8 + 4 + len(secret_key), CANCEL_REQUEST_CODE, process_id) + (
        secret_key
    )


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
    failure = await deliver_cancel(
        peer.host, peer.port, _packet(process_id, secret_key), FORWARD_TIMEOUT
    )
    if failure is not None:
        logger.warning(
            "cancel: peer %d (%s:%d) unreachable: %s", peer.peer_id, peer.host, peer.port, failure
        )


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
                while len(data) < _FORWARDED_SIZE:
                    chunk = await stream.receive_some(_FORWARDED_SIZE - len(data))
                    if not chunk:
                        return
                    data += chunk
                try:
                    request = parse_startup_packet(data[4:])
                except ProtocolError:
                    return
                if not isinstance(request, CancelRequestPacket):
                    return
                right = await check(request.process_id, request.secret_key)
                await stream.send_all(b"1" if right else b"0")

    try:
        task_status.started()
        await trio.serve_listeners(handle, [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
