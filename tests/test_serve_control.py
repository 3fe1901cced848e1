"""The control socket against requests that break it, and the flush and close at the end of
``blockfuse serve`` whatever ended the serving."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import trio

from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.wrapper import PassThrough
from blockfuse.serve.control import Control
from blockfuse.serve.listen import Address, listen
from blockfuse.serve.runtime import serve_exports

from .servekit import export_of, mem_export

TIMEOUT = 10


async def ask(path: Path, request: bytes) -> dict[str, object]:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(request)
            data = b""
            while more := await stream.receive_some(1 << 16):
                data += more
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def failing_facts() -> dict[str, object]:
    raise RuntimeError("a bug in the status")


@pytest.mark.parametrize(
    ("request_", "facts"),
    [
        (b"[" * 3000 + b"\n", lambda: {}),  # RecursionError in the JSON parser
        (b'{"op": "status"}\n', failing_facts),
    ],
    ids=["nested-json", "failing-status"],
)
async def test_a_control_request_that_fails_gets_an_error_and_the_socket_answers_on(
    short_tmp: Path, request_: bytes, facts: object
) -> None:
    path = short_tmp / "c.ctl"
    listening = await listen([Address(path=str(path))])
    control = Control([mem_export()], facts)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, listening.listeners[0])
        reply = await ask(path, request_)
        assert reply["ok"] is False and reply["errno"]
        reply = await ask(path, b'{"op": "pivot", "device": "nope"}\n')
        assert reply["ok"] is False and "no device named" in str(reply["error"])
        control.stop()


class Recorded(PassThrough):
    """Remembers whether it was flushed and closed."""

    def __init__(self, inner: MemoryDevice) -> None:
        super().__init__(inner)
        self.flushed = self.closed = False

    async def flush(self) -> None:
        self.flushed = True
        await self._inner.flush()

    async def aclose(self) -> None:
        self.closed = True
        await self._inner.aclose()


async def test_serving_that_fails_still_flushes_and_closes_the_devices(short_tmp: Path) -> None:
    device = Recorded(MemoryDevice(1 << 20))
    listening = await listen([Address(path=str(short_tmp / "nbd.sock"))])

    def fail() -> None:
        raise RuntimeError("the serving failed")

    with trio.fail_after(TIMEOUT), pytest.RaisesGroup(RuntimeError, flatten_subgroups=True):
        await serve_exports([export_of(device)], listening, None, io.StringIO(), on_ready=fail)
    assert device.flushed and device.closed
