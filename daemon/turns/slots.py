"""The concurrency cap: at most N turns run their CLI at once, the rest wait in FIFO order."""

from __future__ import annotations

import asyncio
from collections import OrderedDict


class Slots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self._queue: OrderedDict[str, asyncio.Future[None]] = OrderedDict()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def acquire(self, process_id: str) -> None:
        if self.running < self.limit and not self._queue:
            self.running += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue[process_id] = fut
        try:
            await fut
        except asyncio.CancelledError:
            self._queue.pop(process_id, None)
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        # Hand the slot straight to the oldest waiter, so the FIFO order holds.
        while self._queue:
            _, fut = self._queue.popitem(last=False)
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1

    def position(self, process_id: str) -> int | None:
        """1 for the next turn to run, None if the turn is not waiting."""
        for i, pid in enumerate(self._queue):
            if pid == process_id:
                return i + 1
        return None
