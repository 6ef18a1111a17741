"""Rows in, rows out: up to `batch_size` requests share each decoding step; waiting ones join as rows free up.

A request that comes back to the row it last used (a chat session's next turn) keeps its cached K/V there;
one that moves to another row (or whose row was used by someone else meanwhile) starts its caches over.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from .decoder import Decoder
from .request import Request


class Scheduler:
    def __init__(self, decoder: Decoder, batch_size: int):
        self.decoder = decoder
        self.batch_size = batch_size
        self.rows: list[Request | None] = [None] * batch_size
        self.waiting: deque[Request] = deque()
        self._last_owner: list[Request | None] = [None] * batch_size  # whose K/V each cache row holds
        self.sweeps = 0  # target sweeps run so far: one per step with a live row, however many rows share it

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
        if any(r is not None and not r.done for r in self.rows):
            self.decoder.step(self.rows)
            self.sweeps += 1
        finished += [r for r in self.rows if r is not None and r.done and r not in finished]
        for b, r in enumerate(self.rows):
            if r is not None and r.done:
                self.rows[b] = None
        return finished

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
        stops iterating early cancels the requests still running, so they never hold rows afterwards."""
        requests = list(requests)
        for r in requests:
            self.add(r)
        try:
            while not self.idle:
                yield self.step()
        finally:
            for r in requests:
                if r in self.waiting or r in self.rows:
                    self.cancel(r, r.finish_reason or "cancelled")
