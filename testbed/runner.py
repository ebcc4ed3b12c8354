"""Running many scenarios: one executor seam over a local process pool or a Dask cluster.

A *task* is a deterministic unit, (scenario, vm type, vendor, options), sent as a small dict
of JSON values: the guest's source text travels with it (so a remote worker needs only an
installed testbed, not the user's files), and its result is a small JSON dict
(`testbed.matrix.observe`). The same task gives the same result wherever it runs: the
options carry a fixed seed, and nothing in the result is a time or an address that varies.

Executors (`make_executor`):
- `SerialExecutor`: in this process (1 worker).
- `PoolExecutor`: a local process pool (the default, one worker per core). Workers start from
  the forkserver (never a fork of a threaded parent), warm the assembler and the emulator once
  in their initializer, and live for the whole run, so every later task finds Keystone, the
  runtime front end and Unicorn loaded; the parent assembles each guest first, so workers
  find it in the cross-process assembly cache (testbed/asm/cache.py).
- `DaskExecutor`: a `distributed` cluster (`--scheduler ADDRESS`, or a `Client` passed in,
  e.g. a LocalCluster's); the `distributed` package is the optional extra `testbed[dask]`.
  Tasks are submitted with a key derived from the task's content (pure), so resubmitting
  the same task reuses its result on the cluster.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

from testbed.errors import UsageError

Task = dict[str, Any]
Result = dict[str, Any]

#: a trivial guest run once per worker so Keystone, the runtime front end and Unicorn are loaded
_WARM_GUEST = "guest_main:\n    GUEST_DONE\n"


def task_key(task: Task) -> str:
    """A stable name for a task: the SHA-256 of its canonical JSON (same task, same key)."""
    blob = json.dumps(task, sort_keys=True, separators=(",", ":")).encode()
    return "testbed-task-" + hashlib.sha256(blob).hexdigest()[:32]


def warm_worker() -> None:
    """Load the assembler and the emulator in this process (a pool worker's initializer)."""
    from testbed.api import run_guest
    from testbed.machine import VmOptions

    run_guest("<warm>", VmOptions(memory=8 << 20), text=_WARM_GUEST)


def run_task(task: Task) -> Result:
    """Run one task in this process and return its small JSON result (never raises for what
    the guest does; options that do not validate, or a guest the host cannot back, become
    `{"error": text}`: a cell that could not run, never equal to any other)."""
    from testbed.matrix import observe

    return observe(task)


class Executor(Protocol):
    """Maps run_task over tasks, results in task order; `close()` releases the workers."""

    name: str
    workers: int

    def map(self, fn: Callable[[Task], Result], tasks: Sequence[Task]) -> list[Result]: ...

    def close(self) -> None: ...


class SerialExecutor:
    """Every task in this process, one after the other."""

    name = "serial"
    workers = 1

    def map(self, fn: Callable[[Task], Result], tasks: Sequence[Task]) -> list[Result]:
        """Run each task here."""
        return [fn(t) for t in tasks]

    def close(self) -> None:
        """Nothing to release."""


class PoolExecutor:
    """A local process pool of `workers` warm workers (forkserver start)."""

    name = "pool"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        ctx = multiprocessing.get_context("forkserver")
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=warm_worker)

    def map(self, fn: Callable[[Task], Result], tasks: Sequence[Task]) -> list[Result]:
        """Run the tasks on the pool; the longest-running (SNP, TDX) are submitted first."""
        order = sorted(range(len(tasks)), key=lambda i: _cost(tasks[i]), reverse=True)
        futures = {i: self._pool.submit(fn, tasks[i]) for i in order}
        return [futures[i].result() for i in range(len(tasks))]

    def close(self) -> None:
        """Stop the workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor:
    """A Dask `distributed` cluster: `address` (tcp://host:port) or an existing `client`."""

    name = "dask"

    def __init__(self, address: str | None = None, client: Any = None) -> None:
        try:
            import distributed
        except ImportError:
            raise UsageError("--scheduler needs the `distributed` package: pip install 'testbed[dask]'") from None
        self._own = client is None
        if client is None:
            try:
                client = distributed.Client(address, timeout="10s")  # type: ignore[no-untyped-call]
            except (OSError, TimeoutError, ValueError) as exc:
                raise UsageError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        self.client = client
        self.workers = len(client.scheduler_info().get("workers", {})) or 1

    def map(self, fn: Callable[[Task], Result], tasks: Sequence[Task]) -> list[Result]:
        """Submit every task (keyed by its content) and gather the results in order."""
        futures = [self.client.submit(fn, t, key=task_key(t), pure=True, priority=_cost(t)) for t in tasks]
        return list(self.client.gather(futures))

    def close(self) -> None:
        """Close the client if this executor opened it (a client passed in stays the caller's)."""
        if self._own:
            self.client.close()


def _cost(task: Task) -> int:
    """Rough relative cost of a task, to start the slow ones first (SNP/TDX boots validate memory)."""
    return {"sev-snp": 3, "tdx": 3, "sev-es": 1}.get(str(task.get("options", {}).get("vm_type")), 0)


def make_executor(workers: int | None = None, scheduler: str | None = None) -> Executor:
    """The executor for `--workers N` / `--scheduler ADDRESS` (default: one worker per core)."""
    if scheduler is not None:
        return DaskExecutor(scheduler)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < 1:
        raise UsageError(f"--workers {workers}: expected at least 1")
    return SerialExecutor() if workers == 1 else PoolExecutor(workers)
