"""The control socket of a server: status and pivot without a mount.

A Unix socket (mode 0600: pivoting is for the server's owner) that speaks one JSON
request per connection, one line each way::

    > {"op": "status"}
    < {"ok": true, "server": {"listening": [URI, ...], "connections": 2},
       "devices": [{"name": "disk", "kind": "mirror", "size": "1073741824", ...}]}
    > {"op": "pivot", "device": "disk"}
    < {"ok": true, "state": "pivoted", "device": {...}}
    < {"ok": false, "errno": 16, "error": "...", "device": {...}}     (refused)

``pivot``, ``retry``, ``cancel`` and ``rate`` (with ``"value": "67108864"`` or
``"none"``) are a mirror's controls, as the ``user.blockfuse.*`` writes of a mount's
flat file (``pivot``, ``retry``, ``cancel``, ``rate_limit``), with the device's status
after them; the status reply also has the server's ``pid``.

A device's entry holds the same keys with the same (string) values as the
``user.blockfuse.*`` attributes of a mount's flat file, plus its ``name``; ``blockfuse
status`` turns either into the same lines (or the same JSON).  A request is at most
``MAX_REQUEST`` bytes and must arrive within ``REQUEST_TIMEOUT`` seconds; at most
``MAX_CLIENTS`` are served at once (more are closed at once).  A request that is not
JSON (or nests too deep to parse) gets EINVAL; a failure of ours answering one gets EIO:
either ends that client only, never the server.

``ask`` is the client side, for the CLI (blocking: the CLI has no event loop).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..block import send_control
from ..errors import BlockError
from .exports import Export, facts

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
MAX_CLIENTS = 16
STATUS_TIMEOUT = 15.0
PIVOT_TIMEOUT = 180.0
"""Seconds the CLI waits for a pivot: both sides are flushed first (each flush bounded
by its device, an NBD one by its 30 s request timeout, with retries)."""

Reply = dict[str, Any]
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ControlError(Exception):
    """The control socket cannot be asked; the message is one line for the user."""


class Control:
    """Answers status and pivot requests about ``exports``; ``server_facts`` says what
    the server itself is doing (where it listens, how many connections)."""

    def __init__(self, exports: Sequence[Export], server_facts: Callable[[], Reply]) -> None:
        self._exports = {e.name: e for e in exports}
        self._server_facts = server_facts
        self._clients = trio.CapacityLimiter(MAX_CLIENTS)
        self._scope = trio.CancelScope()

    def stop(self) -> None:
        """End ``serve`` (the listener closes)."""
        self._scope.cancel()

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with self._scope:
            async with listener, trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._client, stream)

    async def _client(self, stream: trio.abc.Stream) -> None:
        async with stream:
            try:
                self._clients.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                reply = await self._reply_to(stream)
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except STREAM_ERRORS:
                pass
            finally:
                self._clients.release()

    async def _reply_to(self, stream: trio.abc.Stream) -> Reply:
        """The reply to the client's request.  A failure of ours answering it is an error
        reply: it costs this client, never the server."""
        try:
            request = await self._request(stream)
            return await self.answer(request) if request is not None else bad_request()
        except STREAM_ERRORS:
            raise
        except Exception as exc:
            log.exception("control request failed unexpectedly")
            return refused(errno.EIO, f"internal error: {exc}")

    async def _request(self, stream: trio.abc.Stream) -> Reply | None:
        data = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\n" not in data and len(data) <= MAX_REQUEST:
                more = await stream.receive_some(MAX_REQUEST)
                if not more:
                    break
                data += more
        try:
            request = json.loads(data.partition(b"\n")[0])
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            return None
        return request if isinstance(request, dict) else None

    async def answer(self, request: Reply) -> Reply:
        op = request.get("op")
        if op == "status":
            devices = [{"name": name, **await facts(e)} for name, e in self._exports.items()]
            server = self._server_facts()
            return {"ok": True, "pid": os.getpid(), "server": server, "devices": devices}
        if op in CONTROLS:
            value = str(request.get("value", "1")).encode()
            return await self._control(str(request.get("device", "")), CONTROLS[op], value)
        return bad_request()

    async def _control(self, name: str, key: str, value: bytes) -> Reply:
        export = self._exports.get(name)
        if export is None:
            known = ", ".join(sorted(self._exports))
            return refused(errno.ENOENT, f"no device named {name!r} (devices: {known})")
        try:
            await send_control(export.bytes.device, key, value, name)
        except BlockError as exc:
            return {**refused(exc.errno, str(exc)), "device": await facts(export)}
        status = await facts(export)
        return {"ok": True, "state": status.get("state", "?"), "device": status}


CONTROLS = {"pivot": "pivot", "retry": "retry", "cancel": "cancel", "rate": "rate_limit"}
"""The control requests, and the ``user.blockfuse.*`` key each is to a device."""


def refused(err: int, message: str) -> Reply:
    return {"ok": False, "errno": err, "error": message}


def bad_request() -> Reply:
    ops = ", ".join(["status", *CONTROLS])
    return refused(errno.EINVAL, f'not a request (send {{"op": OP}}, OP one of {ops})')


# --- the client side (blocking, for the CLI) ----------------------------------------------


def ask(path: str, request: Reply, timeout: float = STATUS_TIMEOUT) -> Reply:
    """Send ``request`` to the control socket at ``path``; its reply.  Raises
    ``ControlError`` when the server cannot be reached or does not answer in time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = receive_line(sock)
        except TimeoutError as exc:
            raise ControlError(f"{path} did not answer within {timeout:g} s") from exc
        except OSError as exc:
            raise ControlError(f"cannot reach the server at {path}: {exc.strerror or exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise ControlError(f"{path} is not a blockfuse control socket") from exc
    if not isinstance(reply, dict):
        raise ControlError(f"{path} is not a blockfuse control socket")
    return reply


def receive_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        more = sock.recv(1 << 16)
        if not more:
            break
        data += more
    return data
