"""Rows in, rows out: up to `batch_size` requests share each decoding step; waiting ones join as rows free up.

A request that comes back to the row it last used (a chat session's next turn) keeps its cached K/V there;
one that moves to another row (or whose row was used by someone else meanwhile) starts its caches over.

A step that raises does not take every row down with it: each live row then runs that step again alone, and
only a row that also fails alone ends, with the error kept on its request (finish_reason "error"). Nothing
else changes: a row's state is committed (to its own cache row and request) only after the shared forwards
have run, so a failed step leaves every row either committed or as it was; the rerun redraws the tree of a
row that was not committed, and a request's tokens (greedy) or their distribution (sampled) do not depend
on the tree or on which rows share a sweep.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Iterable, Iterator

from ..errors import UsageError
from .decoder import Decoder
from .request import Request


class Scheduler:
    def __init__(self, decoder: Decoder, batch_size: int):
        self.decoder = decoder
        self.batch_size = batch_size
        self.rows: list[Request | None] = [None] * batch_size
        self.waiting: deque[Request] = deque()
        self._last_owner: list[Request | None] = [None] * batch_size  # whose K/V each cache row holds
        self.sweeps = 0  # target sweeps run to the end so far, however many rows share each
        self._running = threading.Lock()  # held by the one `run` in progress (a call, or a stream not yet closed)

    @property
    def idle(self) -> bool:
        return not self.waiting and all(r is None for r in self.rows)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def _fill_rows(self) -> None:
        for b in range(self.batch_size):
            while self.rows[b] is None and self.waiting:
                req = self.waiting.popleft()
                if req.done:  # cancelled while it waited
                    continue
                if self._last_owner[b] is not req or req.row != b:
                    req.target_cached = req.draft_cached = 0  # its K/V (if any) lives elsewhere
                req.row = b
                self._last_owner[b] = req
                self.rows[b] = req

    def step(self) -> list[Request]:
        """One decoding step over the rows (after filling free ones); returns the requests that finished."""
        self._fill_rows()
        finished = [r for r in self.rows if r is not None and r.done]  # cancelled between steps
        live = [r for r in self.rows if r is not None and not r.done]
        if live:
            self._step_isolated(live)
        finished += [r for r in self.rows if r is not None and r.done and r not in finished]
        for b, r in enumerate(self.rows):
            if r is not None and r.done:
                self.rows[b] = None
        return finished

    def _step_isolated(self, live: list[Request]) -> None:
        try:
            self.decoder.step(self.rows)
            self.sweeps += 1
            return
        except Exception as e:  # noqa: BLE001 - whatever one row raised, the others must go on
            if len(live) == 1:
                self._fail(live[0], e)
                return
        for req in live:
            if req.done:  # finished in the failed step, before the row that raised
                continue
            alone: list[Request | None] = [None] * self.batch_size
            alone[req.row] = req
            try:
                self.decoder.step(alone)
                self.sweeps += 1
            except Exception as e:  # noqa: BLE001
                self._fail(req, e)

    def _fail(self, req: Request, error: Exception) -> None:
        req.fail(error)
        for cache in (self.decoder.target_cache, self.decoder.draft_cache):
            if cache is not None:
                cache.clear(req.row)
        self._last_owner[req.row] = None

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """Stop a request now: it leaves its row (or the queue) and keeps the tokens it has."""
        if not request.done:
            request.finish_reason = reason
        if request in self.waiting:
            self.waiting.remove(request)
        for b, r in enumerate(self.rows):
            if r is request:
                self.rows[b] = None

    def run(self, requests: Iterable[Request]) -> Iterator[list[Request]]:
        """Decode `requests` to the end; yields, after every step, the ones that finished in it. A caller that
        stops iterating early cancels the requests still running, so they never hold rows afterwards.

        One run at a time: a second one (another thread, or a call while a stream is suspended) would take the
        first one's rows and end it silently, so it is refused."""
        if not self._running.acquire(blocking=False):
            raise UsageError("this engine is already decoding another call (a generate in another thread, or a "
                             "stream not yet finished or closed); finish or close that stream first, or give each "
                             "thread its own engine (python -m offload_runtime.serve batches concurrent requests)")
        requests = list(requests)
        try:
            for r in requests:
                self.add(r)
            while not self.idle:
                yield self.step()
        finally:
            for r in requests:
                if r in self.waiting or r in self.rows:
                    self.cancel(r, r.finish_reason or "cancelled")
            self._running.release()
