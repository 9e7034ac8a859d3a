"""asyncio streaming over the engine: a background thread steps the engine while requests stream deltas.

The engine is single-threaded; one lock serialises add/abort/step. A consumer that stops iterating
(client disconnect, cancellation) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from workers.config import SamplingParams
from workers.engine import LLMEngine
from workers.request import RequestOutput


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tidal-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield one RequestOutput per engine step that produced tokens; the last has finished=True."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            rid = self.engine.add_request(prompt, params, request_id)  # raises InvalidRequest
            self._queues[rid] = (loop, queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            with self._lock:
                self._queues.pop(rid, None)
                if not finished:
                    self.engine.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            entry = self._queues.pop(request_id, None)
        if entry:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, asyncio.CancelledError(f"request {request_id} aborted"))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_unfinished()
                try:
                    outputs = self.engine.step() if busy else []
                    error = None
                except Exception as e:  # a failed step fails the requests in it, not the server
                    outputs, error = [], e
                deliveries = [(self._queues.get(o.request_id), o) for o in outputs]
                if error is not None:
                    deliveries = [(q, error) for q in self._queues.values()]
                    for rid in list(self._queues):
                        self.engine.abort(rid)
                    self._queues.clear()
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for entry, item in deliveries:
                if entry is not None:
                    loop, queue = entry
                    by_loop.setdefault(loop, []).append((queue, item))
            for loop, items in by_loop.items():  # one wake-up per loop and step, not one per request
                loop.call_soon_threadsafe(_put_all, items)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
