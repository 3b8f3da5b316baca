"""A client that goes away while its request waits for its answer: the watch on the
connection (:func:`watch`) and the wait it cuts short (:func:`unless_disconnected`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.requests import Request

#: Returns once the client has gone away (its connection closed).
Disconnected = Callable[[], Awaitable[None]]

T = TypeVar("T")


def watch(request: Request) -> Disconnected:
    """Returns once the client has closed its connection (the body is read already, so the
    next ASGI message is the disconnect)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


class ClientGone(Exception):
    """The client closed its connection while its request waited."""


async def unless_disconnected(waiting: Awaitable[T], disconnected: Disconnected) -> T:
    """``await waiting`` in this task, cancelled (and :class:`ClientGone` raised) if
    ``disconnected`` returns first. One watcher task per request, and no ``asyncio.wait``:
    the wait itself runs in the request's own task."""
    task = asyncio.current_task()
    assert task is not None
    gone = finished = False

    def cancel_the_wait(watcher: asyncio.Future[None]) -> None:
        nonlocal gone
        # ``finished``: a callback already scheduled when the wait ended must not cancel
        # what the task does next (sending the answer)
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(cancel_the_wait)
    try:
        return await waiting
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:  # cancelled by the watcher alone
            raise ClientGone from None
        raise
    finally:
        finished = True
        watcher.remove_done_callback(cancel_the_wait)
        watcher.cancel()
