"""The out-queue of one NBD connection (transport/sender.py), on its own."""

from __future__ import annotations

import trio
import trio.testing

from blockfuse.errors import BlockError
from blockfuse.transport.sender import Sender


async def test_a_notice_sent_by_a_cancelled_caller_still_goes_out_whole(
    autojump_clock: object,
) -> None:
    """``send_if_idle`` sends what is due (a DISC after a lone ESHUTDOWN reply) even when
    its caller's scope was cancelled just before: the send is shielded and bounded by
    the sender's timeout, not by a deadline the cancel made ``-inf`` (which dropped the
    connection at once, over a stream written without a socket's fd)."""
    ours, theirs = trio.testing.memory_stream_pair()
    broken: list[BlockError] = []
    sender = Sender(ours, None, "test", 30.0, broken.append)
    sender.queue(b"disc")
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            scope.cancel()
            await sender.send_if_idle()
        assert await theirs.receive_some(4) == b"disc"
    assert broken == []
