"""asyncio streaming over the engine: a background thread steps the engine while requests stream deltas.

Only the engine thread touches the engine. Event loops post adds and aborts to an inbox that the thread
applies between steps, so a loop never waits for a step: when adding and removing a request took the
engine's lock, every stream of the loop stopped until the step in flight ended (at c = 32, a request's
first token waited ~300 ms in the engine replica before it was sent). A consumer that stops iterating
(client disconnect, cancellation) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator

from workers.config import InvalidRequest, SamplingParams
from workers.engine import LLMEngine
from workers.request import RequestOutput

Entry = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: deque[tuple] = deque()  # ("add", id, prompt, params) / ("abort", id), in posting order
        self._adds_posted = self._adds_applied = 0  # each written by one thread: adds not yet in the engine
        self._queues_lock = threading.Lock()  # held only to read or change `_queues`, never during a step
        self._queues: dict[str, Entry] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tidal-engine", daemon=True)
        self._thread.start()

    def waiting(self) -> int:
        """Requests admitted and not running: the engine's queue and the adds it has not applied yet."""
        return self.engine.load().waiting + self._adds_posted - self._adds_applied

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield one RequestOutput per engine step that produced tokens; the last has finished=True. A request
        the engine refuses raises its InvalidRequest at the first iteration."""
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._queues_lock:
            if rid in self._queues:
                raise InvalidRequest(f"request id {rid!r} is already in use")
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._adds_posted += 1
        self._post(("add", rid, prompt, params))
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            with self._queues_lock:
                self._queues.pop(rid, None)
            if not finished:
                self._post(("abort", rid))

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _post(self, op: tuple) -> None:
        self._inbox.append(op)
        self._wake.set()

    def _apply_inbox(self) -> None:
        while self._inbox:
            op = self._inbox.popleft()
            if op[0] == "abort":
                self.engine.abort(op[1])
                continue
            _, rid, prompt, params = op
            try:
                self.engine.add_request(prompt, params, rid)
            except Exception as e:  # refused (InvalidRequest): only its own stream hears of it
                with self._queues_lock:
                    entry = self._queues.pop(rid, None)
                if entry:
                    _deliver({entry[0]: [(entry[1], e)]})
            finally:
                self._adds_applied += 1

    def _loop(self) -> None:
        while not self._stopped:
            self._apply_inbox()
            busy = self.engine.has_unfinished()
            try:
                outputs = self.engine.step() if busy else []
                error = None
            except Exception as e:  # a failed step fails the requests in it, not the server
                outputs, error = [], e
            with self._queues_lock:
                if error is None:
                    items = [(self._queues.get(o.request_id), o) for o in outputs]
                else:
                    items = [(entry, error) for entry in self._queues.values()]
                    failed = list(self._queues)
                    self._queues.clear()
            if error is not None:
                for rid in failed:
                    self.engine.abort(rid)
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for entry, item in items:
                if entry is not None:
                    by_loop.setdefault(entry[0], []).append((entry[1], item))
            _deliver(by_loop)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()  # anything posted since is still in the inbox, applied next round


def _deliver(by_loop: dict[asyncio.AbstractEventLoop, list]) -> None:
    """One wake-up per event loop and step, not one per request."""
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
