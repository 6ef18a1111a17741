"""The engine's own thread: the only code that touches the scheduler.

A step can take seconds (an offloaded 70B sweep streams every layer), so steps never run on the event loop.
The loop hands the worker callables through a queue (add this job, cancel that one, stop); the worker runs
them between steps, so requests join and leave the batch at step boundaries and a cancelled request's row is
free for the next step. After each step it hands every job the text its tokens settled (and, at the end, the
outcome) back to the loop with `loop.call_soon_threadsafe`: nothing on the loop ever waits for a step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..api.text import TextStream
from ..decode.request import Request
from ..errors import OffloadError, UsageError

log = logging.getLogger("offload_runtime.serve")

# The runtime's finish reasons as OpenAI names them ("cancelled" never reaches a client: it left).
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


@dataclass(frozen=True)
class Outcome:
    finish_reason: str  # OpenAI's: "stop" (end of sequence or a stop string) | "length" (max_tokens, context)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failure:
    status: int  # the HTTP status a reply that has not started yet gets
    message: str


@dataclass(frozen=True)
class Update:
    """What one step did for one job: new settled text; the last update also carries how it ended."""

    text: str = ""
    outcome: Outcome | None = None
    failure: Failure | None = None

    @property
    def final(self) -> bool:
        return self.outcome is not None or self.failure is not None


@dataclass(eq=False)
class Job:
    """A request in the worker's hands. `deliver` runs on the event loop, once per update."""

    id: str
    request: Request
    text: TextStream
    deliver: Callable[[Update], None]
    arrived: float  # time.perf_counter() when the HTTP request came in
    prompt: Any = None  # what the client sent, logged only with --log-prompts
    shown: int = 0  # characters of settled text already delivered
    first_text_s: float | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot the worker publishes after every step (read by /health from the loop)."""

    running: int = 0  # rows busy in the batch
    sweeps: int = 0  # target sweeps so far
    completion_tokens: int = 0  # tokens generated so far, all requests
    finished: int = 0  # requests that ran to their end
    cancelled: int = 0  # requests whose client left
    failed: int = 0
    mean_request_s: float = 0.0  # exponential moving average of finished requests' wall time
    alive: bool = True


class EngineWorker:
    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop, *, log_prompts: bool = False):
        self.engine = engine
        self.scheduler = engine.scheduler
        self.loop = loop
        self.log_prompts = log_prompts
        self.status = WorkerStatus()
        self._inbox: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._jobs: dict[Request, Job] = {}
        self._stopping = False
        self._counts = dict(completion_tokens=0, finished=0, cancelled=0, failed=0)
        self._mean_s = 0.0
        self._thread = threading.Thread(target=self._run, name="offload-engine", daemon=True)

    # --- called from the event loop

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        self._inbox.put(lambda: self._add(job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(lambda: self._cancel(job))

    def stop_soon(self) -> None:
        """Stop after the step in flight; jobs still running get a 503-style failure. Returns at once, and may be
        called from a signal handler (SimpleQueue.put is reentrant)."""
        self._inbox.put(self._stop)

    def close(self, timeout: float = 30.0) -> None:
        """stop_soon, then wait for the thread. Blocks (call it off the loop); a step that outlasts `timeout` is
        left to the daemon thread."""
        self.stop_soon()
        self._thread.join(timeout)

    # --- the thread

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands(block=self.scheduler.idle)
                self._publish()  # a cancelled row is free now, before the next step
                if self._stopping or self.scheduler.idle:
                    continue
                try:
                    finished = self.scheduler.step()
                except Exception as e:  # noqa: BLE001 - one bad step fails its rows, not the server
                    log.exception("a decoding step failed")
                    self._fail_running(Failure(500, f"the engine failed: {type(e).__name__}: {e}"))
                    continue
                for job in self._jobs.values():
                    self._send_text(job)
                for req in finished:
                    self._finish(self._jobs.pop(req))
                self._publish()
        finally:
            for job in list(self._jobs.values()):
                self.scheduler.cancel(job.request, "cancelled")
                self._end(job, Update(failure=Failure(503, "the server is shutting down; retry later")), "failed")
            self._jobs.clear()
            self._stopping = True
            self._publish()

    def _take_commands(self, block: bool) -> None:
        if block:
            self._inbox.get()()
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    def _add(self, job: Job) -> None:
        self._jobs[job.request] = job
        self.scheduler.add(job.request)
        if self.log_prompts:
            log.info("%s prompt: %r", job.id, job.prompt)

    def _cancel(self, job: Job) -> None:
        if self._jobs.pop(job.request, None) is None:
            return  # it finished meanwhile
        self.scheduler.cancel(job.request, "cancelled")
        self._end(job, Update(failure=Failure(499, "the client went away")), "cancelled")

    def _stop(self) -> None:
        self._stopping = True

    def _fail_running(self, failure: Failure) -> None:
        for row in list(self.scheduler.rows):
            job = self._jobs.pop(row, None) if row is not None else None
            if job is not None:
                self.scheduler.cancel(job.request, "failed")
                self._end(job, Update(failure=failure), "failed")
        self._publish()

    def _send_text(self, job: Job) -> None:
        settled = job.text.settled()
        if len(settled) > job.shown:
            self._deliver(job, Update(text=settled[job.shown:]))
            job.shown = len(settled)
            if job.first_text_s is None:
                job.first_text_s = time.perf_counter() - job.arrived

    def _finish(self, job: Job) -> None:
        req = job.request
        if req.error is not None:  # decoding this request failed alone (the scheduler kept the others going)
            e = req.error
            user = isinstance(e, OffloadError)
            message = str(e) if user else f"the engine failed on this request: {type(e).__name__}: {e}"
            if not user:
                log.error("%s failed: %s: %s", job.id, type(e).__name__, e)
            self._end(job, Update(failure=Failure(400 if isinstance(e, UsageError) else 500, message)), "failed")
            return
        job.text.finish()
        text = job.text.result()
        outcome = Outcome(FINISH[req.finish_reason], req.n_prompt, len(req.generated))
        if job.first_text_s is None and len(text) > job.shown:
            job.first_text_s = time.perf_counter() - job.arrived
        self._end(job, Update(text=text[job.shown:], outcome=outcome), "finished")
        if self.log_prompts:
            log.info("%s reply: %r", job.id, text)

    def _end(self, job: Job, update: Update, count: str) -> None:
        """The job's last update, its statistics line, and the running totals (published first, so a client
        that has its reply never reads totals without it)."""
        req, s = job.request, job.request.stats
        wall = time.perf_counter() - job.arrived
        self._counts[count] += 1
        self._counts["completion_tokens"] += len(req.generated)
        if count == "finished":
            self._mean_s = wall if self._counts["finished"] == 1 else 0.8 * self._mean_s + 0.2 * wall
        self._publish()
        self._deliver(job, update)
        first = f"{job.first_text_s:.2f} s" if job.first_text_s is not None else "-"
        log.info("%s %s (%s): %d prompt + %d new tokens in %.2f s, %.1f tokens/s, %.2f tokens/step over %d "
                 "steps, first text after %s", job.id, count, req.finish_reason, req.n_prompt, len(req.generated),
                 wall, len(req.generated) / wall if wall > 0 else 0.0, s.tokens_per_step, s.steps, first)

    def _deliver(self, job: Job, update: Update) -> None:
        try:
            self.loop.call_soon_threadsafe(job.deliver, update)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    def _publish(self) -> None:
        self.status = WorkerStatus(running=self.scheduler.active, sweeps=self.scheduler.sweeps,
                                   mean_request_s=self._mean_s, alive=not self._stopping, **self._counts)
