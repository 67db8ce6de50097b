"""Concurrent requests gathered into one batch: one forward, one search, one vote for all of them.

    batcher = Batcher(answer_batch, max_batch=64, wait_ms=0, max_queue=256)
    answer = await batcher.submit(image, name)      # QueueFull when max_queue requests are waiting

A batch is whatever queued while the previous one ran (up to `max_batch`): an idle engine answers a lone
request at once, and under load requests share a forward, a search and a vote. `wait_ms` > 0 makes a
batch also wait that long for more to join. Batches run one at a time in the threadpool, so the event
loop keeps answering /health and reading uploads meanwhile.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from starlette.concurrency import run_in_threadpool


class QueueFull(Exception):
    """Too many requests waiting: the caller should answer 503 with Retry-After."""


class Batcher:
    def __init__(self, answer_batch: Callable[[list, list], list], max_batch: int = 64, wait_ms: float = 0.0,
                 max_queue: int = 256):
        self.answer_batch, self.max_batch, self.max_queue = answer_batch, max_batch, max_queue
        self.wait_s = wait_ms / 1000
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the batches run, for tests and /health

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, image, name: str):
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((image, name, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        queue = self._queue
        while not queue.empty():
            batch = [queue.get_nowait()]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [item for item in batch if not item[2].cancelled()]  # clients that went away
            if not batch:
                continue
            self.batches.append(len(batch))
            try:
                images, names = [b[0] for b in batch], [b[1] for b in batch]
                answers = await run_in_threadpool(self.answer_batch, images, names)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, _, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)
