"""Concurrent requests gathered into one batch: one forward, one search, one vote for all of them.

    batcher = Batcher(answer_batch, max_batch=64, wait_ms=0, max_queue=256)
    answer = await batcher.submit(image, name)      # QueueFull when max_queue requests are waiting

A batch is whatever queued while the previous one ran (up to `max_batch`): an idle engine answers a lone
request at once, and under load requests share a forward, a search and a vote. `wait_ms` > 0 makes a
batch also wait that long for more to join. Batches run one at a time in the threadpool, so the event
loop keeps answering /health and reading uploads meanwhile. A batch that fails is answered again one
request at a time, so one request's failure is its own.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from starlette.concurrency import run_in_threadpool


class QueueFull(Exception):
    """Too many requests waiting: the caller should answer 503 with Retry-After."""


class Batcher:
    def __init__(self, answer_batch: Callable[[list, list], list], max_batch: int = 64, wait_ms: float = 0.0,
                 max_queue: int = 256):
        self.answer_batch, self.max_batch, self.max_queue = answer_batch, max_batch, max_queue
        self.wait_s = wait_ms / 1000
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches: deque[int] = deque(maxlen=1000)  # sizes of the latest batches, for tests

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, image, name: str):
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a queue and a worker belong to one event loop (a restart makes another)
            self._loop, self._queue, self._worker = loop, asyncio.Queue(), None
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting")
        future = loop.create_future()
        self._queue.put_nowait((image, name, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        queue, batch = self._queue, []
        try:
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
                if batch:
                    self.batches.append(len(batch))
                    await self._answer(batch)
                batch = []
        except BaseException as e:  # shutdown, cancellation: no request is left waiting for ever
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e if isinstance(e, Exception) else RuntimeError("server stopping"))
            while not queue.empty():
                _, _, future = queue.get_nowait()
                if not future.done():
                    future.set_exception(RuntimeError("server stopping"))
            raise

    async def _answer(self, batch: list) -> None:
        images, names = [b[0] for b in batch], [b[1] for b in batch]
        try:
            answers = await run_in_threadpool(self.answer_batch, images, names)
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers for {len(batch)} images")
        except Exception as e:  # noqa: BLE001
            if len(batch) == 1:
                batch[0][2].done() or batch[0][2].set_exception(e)
                return
            for item in batch:  # a failed batch (out of memory, one odd image): each answered alone
                await self._answer([item])
            return
        for (_, _, future), answer in zip(batch, answers):
            if not future.done():
                future.set_result(answer)
