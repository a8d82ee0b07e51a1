"""Benchmark configurations run in concurrent processes that compile together and are timed one at a time.

On the GPU machine most of a speed benchmark's wall time is compilation (Dynamo and Inductor on one CPU core per
process), not the timed generate. Running `jobs` configurations at once in their own processes overlaps those
compiles on the host's many cores; the timed part of each is then serialised, so no measurement shares the GPU or
the host with another process's work:

1. every process of a wave builds its model and runs its first (compiling) generate;
2. each then waits until every process of the wave has finished that step (or failed, or died);
3. the processes take turns, under one lock, for their timed part.

Each process measures its own peak memory and counters, so those stay per configuration; only compile seconds
include the wave's contention. A wave's processes hold their models at once: `jobs` is bounded by device memory.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: how long a finished process waits for the rest of its wave before it is timed anyway
SETTLE_TIMEOUT_S = 1800.0


class Turn:
    """The timed-part gate of one wave: `__call__()` is the context manager a task wraps its measurement in."""

    def __init__(self, settled: Any, lock: Any, parties: int) -> None:
        self.settled, self.lock, self.parties = settled, lock, parties

    def settle(self) -> None:
        """One more process of the wave has compiled, failed or died."""
        with self.settled.get_lock():
            self.settled.value += 1

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.settle()
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while self.settled.value < self.parties and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self.lock.acquire(timeout=SETTLE_TIMEOUT_S):  # its holder died while timed
            raise TimeoutError(f"no turn to time within {SETTLE_TIMEOUT_S:.0f} s")
        try:
            yield
        finally:
            self.lock.release()


def _worker(task: Callable[[Any, Callable], Any], index: int, item: Any, turn: Turn, results: Any) -> None:
    settled = False

    def gated() -> contextlib.AbstractContextManager:
        nonlocal settled
        settled = True
        return turn()

    try:
        results.put((index, task(item, gated), None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides what a failure means
        if not settled:
            turn.settle()
        results.put((index, None, traceback.format_exc()))


def run_in_waves(task: Callable[[Any, Callable], Any], items: Sequence[Any], jobs: int,
                 on_result: Callable[[Any, Any, str | None], None]) -> None:
    """Run `task(item, turn)` for every item, `jobs` processes at a time (spawned, so each has its own CUDA
    context); `task` must be a module-level function and wrap its timed part in `with turn():`. Calls
    `on_result(item, value, error)` in the parent as each finishes: `error` is the traceback of a task that raised,
    or a line saying its process died (killed, out of memory) without a result."""
    context = multiprocessing.get_context("spawn")
    for start in range(0, len(items), jobs):
        wave = dict(enumerate(items[start:start + jobs]))
        turn = Turn(context.Value("i", 0), context.Lock(), len(wave))
        results = context.Queue()
        processes = {index: context.Process(target=_worker, args=(task, index, item, turn, results))
                     for index, item in wave.items()}
        for process in processes.values():
            process.start()
        pending = set(wave)
        while pending:
            dead = [i for i in pending if not processes[i].is_alive()]
            try:  # a process that exited may still have a result in the pipe: read before declaring it dead
                index, value, error = results.get(timeout=2 if dead else 5)
            except queue.Empty:
                for index in dead:
                    pending.discard(index)
                    turn.settle()  # let the rest of the wave go on
                    on_result(wave[index], None,
                              f"process exited with code {processes[index].exitcode} and no result")
                continue
            pending.discard(index)
            on_result(wave[index], value, error)
        for process in processes.values():
            process.join()
