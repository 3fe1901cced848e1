"""The request and byte bounds of the NBD server (transport/budget.py), on their own."""

from __future__ import annotations

import trio
import trio.testing

from blockfuse.transport.budget import ByteBudget, Reservation


def test_take_now_takes_all_or_nothing() -> None:
    slots, connection, server = ByteBudget(2), ByteBudget(100), ByteBudget(50)
    first = Reservation(slots, (connection, server))
    assert first.take_now(40)
    second = Reservation(slots, (connection, server))
    assert not second.take_now(40)  # the server's budget has 10 left
    assert (slots.held, connection.held, server.held) == (1, 40, 40), "nothing half taken"
    first.release()
    assert second.take_now(40)
    assert (slots.held, connection.held, server.held) == (1, 40, 40)


async def test_take_now_does_not_overtake_a_waiter() -> None:
    budget = ByteBudget(100)
    budget.acquire_now(90)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(budget.acquire, 50)  # waits for room
        await trio.testing.wait_all_tasks_blocked()
        assert not budget.acquire_now(5), "5 bytes fit, but the waiter asked first"
        budget.release(90)
    assert budget.held == 50
