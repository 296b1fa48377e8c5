"""Micro-batching: concurrent requests share one forward pass.

A request becomes one job (one image, its prompt or question, its decoding options). Jobs wait in an
asyncio queue; a collector takes the first job, then keeps taking until ``max_batch`` jobs are in hand or
``max_wait_ms`` have passed since the first one arrived, splits them into groups that can share a
``generate`` call (same task and decoding options; prompts and questions may differ, they are padded),
and runs each group through the predictor's batch API (``caption`` / ``answer`` with a list of images) in
one worker thread. The event loop never runs model code, so uploads, health checks and new requests keep
flowing while a batch is computing, and they pile up into the next batch.

The wait is adaptive (:meth:`MicroBatcher.wait_for_company`): a new batch waits for company only when
other jobs are queued or being computed right now, or when the previous batch had company (clients whose
answers arrive together send their next requests a moment apart). A lone client sending one request after
another, or sparse traffic, gets no wait at all, so one client is never slower than an unbatched server;
after a burst ends, one batch at most waits. (An average of the company seen at arrival, the previous rule,
took ~15 lone requests to forget a burst of 32 clients, each held ``max_wait_ms``.)

Requests still arriving count as company too. The server marks each model request as arriving from the moment
its headers are in until its jobs are queued (:meth:`MicroBatcher.arriving`, used by an ASGI middleware), and a
batch that is not full keeps waiting while any request is arriving, up to ``arrival_wait_ms`` after its first
job. Why: clients answered together send their next requests together, but the event loop reads and checks
their bodies one after another (~1 ms each with two cores shared with the model), so such a wave reaches the
queue over tens of milliseconds; a fixed ``max_wait_ms`` cut it into one full batch and one of a few jobs
(32 clients, 2 workers: mean batch 9.7 of 16).

One worker thread by default: on a GPU, or on a CPU where torch's intra-op threads already use every
core, a second concurrent forward pass only competes for the same hardware. For small models on a CPU,
where one forward pass cannot keep several cores busy, ``workers=N`` runs up to N batches at once (each
worker thread with the caller's torch thread count); a free worker is awaited before the next batch is
collected, so batches keep filling while the workers are busy. An exception in one group reaches only
that group's requests. Libraries such as Ray Serve (``@serve.batch``) or Triton's dynamic batcher do this
for their own serving stacks; neither is a dependency we want for one asyncio queue, hence this module.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

logger = logging.getLogger(__name__)

TASKS = ("caption", "vqa")
# The batching defaults, here only: ServerSettings and `lavis-ext serve`'s flags take them from these.
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_ARRIVAL_WAIT_MS = 50.0
DEFAULT_MAX_QUEUE = 256


class _Arrival:
    """One request announced as arriving; settled once, when its jobs are queued or the request ends."""

    __slots__ = ("batcher", "open")

    def __init__(self, batcher: "MicroBatcher"):
        self.batcher, self.open = batcher, True
        batcher._arriving += 1

    def settle(self) -> None:
        if self.open:
            self.open = False
            self.batcher._arriving -= 1


# The arriving request of the running task (set by MicroBatcher.arriving, read by submit_many): a context
# variable, so the server's middleware and its endpoint need not pass the request around.
_ARRIVAL: ContextVar[_Arrival | None] = ContextVar("lavis_ext_arrival", default=None)


class QueueFullError(RuntimeError):
    """The batcher holds ``max_queue`` waiting jobs already: the server is overloaded (HTTP 503)."""


class BatcherStoppedError(RuntimeError):
    """The batcher is not running (starting up or shutting down): HTTP 503."""


@dataclass
class _Job:
    task: str
    image: Any  # PIL image
    text: str | None  # caption prompt (None: the model's) or the question
    decoding: Any  # lavis_ext.inference.Decoding (frozen, hashable)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def group_key(self) -> tuple:
        # A None prompt means "the model's prompt"; it can share a batch with explicit prompts.
        return (self.task, self.decoding)


@dataclass
class BatchStats:
    """Counts the server reports at ``GET /stats``: how many requests shared each forward pass."""

    jobs: int = 0
    batches: int = 0
    failed_batches: int = 0
    waited: int = 0  # batches that waited for company (the rest started at once)
    batch_sizes: Counter = field(default_factory=Counter)
    model_cpu_s: float = 0.0  # CPU time of the worker threads inside the model calls (successful batches)

    def record(self, size: int, ok: bool, cpu_s: float = 0.0) -> None:
        self.model_cpu_s += cpu_s
        self.jobs += size
        self.batches += 1
        self.batch_sizes[size] += 1
        if not ok:
            self.failed_batches += 1

    def to_dict(self) -> dict:
        return {
            "jobs": self.jobs,
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "batches_waited": self.waited,
            "mean_batch_size": round(self.jobs / self.batches, 3) if self.batches else 0.0,
            "max_batch_size": max(self.batch_sizes, default=0),
            "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            # what the model costs per request, apart from HTTP and upload checks (the worker thread's CPU time)
            "model_cpu_ms_per_job": round(self.model_cpu_s * 1000 / self.jobs, 3) if self.jobs else 0.0,
            "model_cpu_s": round(self.model_cpu_s, 6),
        }


class MicroBatcher:
    """Gathers jobs from concurrent requests into batched ``predictor.caption`` / ``predictor.answer`` calls.

    Args:
        predictor: a ``lavis_ext.inference.Blip2Predictor`` (anything with its ``caption``/``answer``).
        max_batch: most jobs per forward pass.
        max_wait_ms: longest a job waits for company before its batch starts (only under concurrent load; see
            the module docstring).
        arrival_wait_ms: longest a batch that is not full waits, from its first job, while requests are still
            arriving (module docstring); at least ``max_wait_ms``.
        max_queue: waiting jobs beyond which ``submit`` fails with ``QueueFullError`` (back-pressure).
        workers: forward passes that may run at once (worker threads); see the module docstring.
    """

    def __init__(self, predictor, max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
                 max_queue: int = DEFAULT_MAX_QUEUE, workers: int = 1, arrival_wait_ms: float = DEFAULT_ARRIVAL_WAIT_MS):
        if int(max_batch) < 1:
            raise ValueError(f"max_batch={max_batch!r} must be >= 1")
        if float(max_wait_ms) < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms!r} must be >= 0")
        if int(max_queue) < 1:
            raise ValueError(f"max_queue={max_queue!r} must be >= 1")
        if int(workers) < 1:
            raise ValueError(f"workers={workers!r} must be >= 1")
        if float(arrival_wait_ms) < 0:
            raise ValueError(f"arrival_wait_ms={arrival_wait_ms!r} must be >= 0")
        self.predictor = predictor
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.workers = int(workers)
        self.arrival_wait = max(float(arrival_wait_ms) / 1000.0, self.max_wait)
        self.stats = BatchStats()
        self._in_flight = 0  # jobs submitted and not yet answered
        self._arriving = 0  # requests announced (MicroBatcher.arriving) whose jobs are not queued yet
        self._last_batch = 0  # size of the batch collected last
        self._queue: asyncio.Queue | None = None
        self._collector: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._free_workers: asyncio.Semaphore | None = None
        self._running_batches: set[asyncio.Task] = set()

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._collector is not None and not self._collector.done()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the collector on the running loop and the worker thread."""
        if self.running:
            return
        import torch

        self._queue = asyncio.Queue(maxsize=self.max_queue)
        # torch.set_num_threads is per thread under OpenMP: give the worker the count set in this thread
        # (``lavis-ext serve --threads``), or it runs with the OMP_NUM_THREADS default instead.
        threads = torch.get_num_threads()
        self._free_workers = asyncio.Semaphore(self.workers)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lavis-ext-batch",
                                            initializer=torch.set_num_threads, initargs=(threads,))
        self._collector = asyncio.get_running_loop().create_task(self._collect_forever(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop: waiting and running jobs fail with ``BatcherStoppedError`` (HTTP 503); the worker threads finish
        their current forward pass before this returns."""
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
            self._collector = None
        for task in list(self._running_batches):  # their jobs' requests get cancelled, the threads finish
            task.cancel()
        await asyncio.gather(*self._running_batches, return_exceptions=True)
        if self._queue is not None:
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(BatcherStoppedError("the server is shutting down; retry"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- submitting -----------------------------------------------------------------------------
    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark the request handled inside this block as arriving until it queues its jobs (or the block ends),
        so that a batch being collected waits for it (module docstring). The server's middleware wraps each
        model request in it; ``submit_many`` in the same task settles it."""
        ticket = _Arrival(self)
        token = _ARRIVAL.set(ticket)
        try:
            yield
        finally:
            ticket.settle()
            _ARRIVAL.reset(token)

    async def submit(self, task: str, image, text: str | None, decoding) -> str:
        """Queue one job and wait for its output string.

        Raises:
            ValueError: unknown task, or a VQA job without a question.
            QueueFullError / BatcherStoppedError: overload / not running (HTTP 503).
            Exception: whatever the model raised for this job's batch.
        """
        (result,) = await self.submit_many(task, [image], [text], decoding)
        return result

    async def submit_many(self, task: str, images, texts, decoding) -> list[str]:
        """Queue several jobs (one per image) and wait for all; they may land in different batches."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images and {len(texts)} texts; give one text (or None) per image")
        if task == "vqa" and any(not (t and str(t).strip()) for t in texts):
            raise ValueError("every VQA job needs a non-empty question")
        if not self.running:
            raise BatcherStoppedError("the model worker is not running (starting up or shutting down); retry")
        if self._queue.qsize() + len(images) > self.max_queue:
            raise QueueFullError(
                f"{self._queue.qsize()} jobs are waiting (limit {self.max_queue}); the server is overloaded, retry later"
            )
        ticket = _ARRIVAL.get()
        if ticket is not None:
            ticket.settle()  # queued now: no longer arriving
        loop = asyncio.get_running_loop()
        jobs = [_Job(task, image, text, decoding, loop.create_future()) for image, text in zip(images, texts)]
        for job in jobs:
            self._in_flight += 1
            job.future.add_done_callback(self._job_done)
            self._queue.put_nowait(job)
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except asyncio.CancelledError:  # the client went away: its jobs are skipped if not started
            for job in jobs:
                job.future.cancel()
            raise

    # ---- adaptive wait --------------------------------------------------------------------------
    def _job_done(self, _future) -> None:
        self._in_flight -= 1

    def wait_for_company(self, in_batch: int = 0) -> float:
        """Seconds a batch holding ``in_batch`` jobs waits for more: ``max_wait_ms`` when other jobs are queued,
        running or arriving now, or the previous batch had company; else 0 (a request alone gains nothing from
        waiting)."""
        others = self._in_flight - in_batch + self._arriving
        return self.max_wait if others > 0 or self._last_batch > 1 else 0.0

    # ---- the collector and the worker -----------------------------------------------------------
    async def _collect_forever(self) -> None:
        while True:
            # Wait for a free worker *before* collecting: while every worker is busy, jobs pile up in the
            # queue and form the next, fuller batch.
            await self._free_workers.acquire()
            try:
                batch = await self._collect_batch()
            except BaseException:
                self._free_workers.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._running_batches.add(task)
            task.add_done_callback(self._running_batches.discard)

    async def _run_batch(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            for group in _groups(batch):
                group = [job for job in group if not job.future.done()]  # cancelled by a departed client
                if not group:
                    continue
                try:
                    outputs, cpu_s = await loop.run_in_executor(self._executor, self._run_group, group)
                except asyncio.CancelledError:  # stop(): the thread finishes; this batch's requests get a 503
                    _fail(batch, BatcherStoppedError("the server is shutting down; retry"))
                    raise
                except Exception as exc:  # delivered to this group's requests only
                    logger.exception("batch of %d %s job(s) failed", len(group), group[0].task)
                    self.stats.record(len(group), ok=False)
                    _fail(group, exc)
                    continue
                self.stats.record(len(group), ok=True, cpu_s=cpu_s)
                for job, output in zip(group, outputs):
                    if not job.future.done():
                        job.future.set_result(output)
        finally:
            self._free_workers.release()

    async def _collect_batch(self) -> list[_Job]:
        """The first waiting job, then more until ``max_batch`` or :meth:`wait_for_company` after the first one's
        arrival, longer (up to ``arrival_wait_ms``) while requests are arriving; jobs already queued always join."""
        first = await self._queue.get()
        batch = [first]
        deadline = first.enqueued + self.wait_for_company(in_batch=1)
        self.stats.waited += deadline > first.enqueued
        try:
            await self._fill(batch, deadline, first.enqueued + self.arrival_wait)
        except asyncio.CancelledError:  # stop() while filling: these jobs are out of the queue already
            _fail(batch, BatcherStoppedError("the server is shutting down; retry"))
            raise
        self._last_batch = len(batch)
        return batch

    async def _fill(self, batch: list[_Job], deadline: float, arrival_deadline: float) -> None:
        while len(batch) < self.max_batch:
            try:  # whatever piled up while the previous batch ran joins at once
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            now = time.perf_counter()
            remaining = deadline - now
            if remaining <= 0 and self._arriving > 0:  # requests still being received: wait for the next one
                remaining = min(arrival_deadline - now, max(self.max_wait, 0.001))
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout=remaining))
            except asyncio.TimeoutError:
                continue  # past the deadline now: stops unless requests are still arriving

    def _run_group(self, group: list[_Job]) -> tuple[list[str], float]:
        """Worker thread: one batched forward pass for jobs sharing task and decoding options; its outputs and
        the thread's CPU seconds in it (torch's intra-op threads beyond this one are not counted)."""
        start = time.thread_time()
        images = [job.image for job in group]
        decoding = group[0].decoding
        if group[0].task == "caption":
            default = self.predictor.caption_prompt
            prompts = [default if job.text is None else job.text for job in group]
            prompt = prompts[0] if len(set(prompts)) == 1 else prompts
            outputs = self.predictor.caption(images, prompt=prompt, decoding=decoding)
        else:
            outputs = self.predictor.answer(images, [job.text for job in group], decoding=decoding)
        if len(outputs) != len(group):
            raise RuntimeError(f"the model returned {len(outputs)} outputs for {len(group)} inputs")
        return list(outputs), time.thread_time() - start


def _fail(jobs: list[_Job], exc: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


def _groups(batch: list[_Job]) -> list[list[_Job]]:
    """Jobs that can share a ``generate`` call, in order of their first job's arrival."""
    groups: dict[tuple, list[_Job]] = {}
    for job in batch:
        groups.setdefault(job.group_key, []).append(job)
    return list(groups.values())
