"""The run timeout: one watchdog thread per process stops a vCPU's run at its deadline.

Unicorn's own `emu_start(..., timeout=)` creates a thread for every call (uc.c
enable_emu_timer: a joinable thread polling every 2 us, joined when the run ends), ~0.3 ms
per run: it was the whole cost of a KVM_RUN that returns at each user exit. Instead each
hardware run arms this process's one watchdog with its deadline (`arm`) and disarms it when
it returns (`disarm`); the watchdog sleeps on a condition variable until the earliest armed
deadline and calls that run's `stop` (uc_emu_stop, which Unicorn's timer thread also calls
from its own thread). The watchdog is woken only when a run's deadline is earlier than the
one it sleeps until: back-to-back runs, each with a later deadline, never wake it.

Each vCPU has one `Alarm`; every arming is a new generation of it. The watchdog fires an
alarm only while it is armed, holding the lock that `disarm` takes, so a run that ended is
never stopped on behalf of another, and it records the generation it fired for (`fired`):
a later run (a later generation) never reads an earlier run's timeout, and the run loop
tells a timeout apart from a stop the hypervisor requested. A stop can still land just
after the run's engine call returned and be reset by the next `emu_start` of the same run:
the watchdog therefore repeats the stop every REPEAT_S while the alarm stays armed. Only
armed alarms are held here; `release` (the vCPU's close) disarms one and drops its stop.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

#: How often a fired alarm's stop is repeated while its run has not ended.
REPEAT_S = 0.05

#: The longest single sleep (threading's wait rejects timeouts above threading.TIMEOUT_MAX).
_MAX_WAIT_S = 3600.0


class Alarm:
    """A vCPU's alarm: `stop` ends its current run from the watchdog's thread. `generation`
    counts its armings; `fired` is the generation the watchdog stopped (0: none)."""

    __slots__ = ("deadline", "fired", "generation", "stop")

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop: Callable[[], None] | None = stop
        self.deadline = float("inf")
        self.generation = 0
        self.fired = 0

    @property
    def timed_out(self) -> bool:
        """The watchdog stopped the current (or last) arming at its deadline."""
        return self.fired == self.generation != 0


class Watchdog:
    """Stops runs at their deadline from one daemon thread, started at the first `arm`."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # arm/disarm take the plain lock (`with` on a Condition is a Python-level call); the
        # condition is built over the same lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._armed: set[Alarm] = set()
        #: when the thread wakes next (inf: it waits for an arm)
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None
        #: stops the watchdog issued (tests read it)
        self.stops = 0

    @property
    def armed(self) -> int:
        """How many runs are armed now."""
        return len(self._armed)

    @property
    def thread(self) -> threading.Thread | None:
        """The watchdog's thread, once a run armed it."""
        return self._thread

    def arm(self, alarm: Alarm, deadline: float) -> None:
        """Arm `alarm` for a run that must end by `deadline` (time.monotonic): a new
        generation. Disarm it when the run returns."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="testbed-run-watchdog", daemon=True)
                self._thread.start()
            alarm.generation += 1
            alarm.deadline = deadline
            self._armed.add(alarm)
            if deadline < self._wake_at:
                self._wake_at = deadline
                self._cond.notify()

    def disarm(self, alarm: Alarm) -> None:
        """The run ended: the watchdog no longer stops it (idempotent)."""
        with self._lock:
            self._armed.discard(alarm)

    def release(self, alarm: Alarm) -> None:
        """Disarm `alarm` for good and drop its stop (the vCPU is closing)."""
        self.disarm(alarm)
        alarm.stop = None

    def _loop(self) -> None:
        cond = self._cond
        with cond:
            while True:
                now = time.monotonic()
                wake = float("inf")
                for alarm in list(self._armed):
                    if alarm.deadline <= now:
                        alarm.fired = alarm.generation
                        alarm.deadline = now + REPEAT_S  # repeated until the run disarms it
                        stop = alarm.stop
                        if stop is not None:
                            self.stops += 1
                            with contextlib.suppress(Exception):  # a failed stop must not end the watchdog
                                stop()
                    wake = min(wake, alarm.deadline)
                self._wake_at = wake
                cond.wait(None if wake == float("inf") else min(max(wake - now, 0.0), _MAX_WAIT_S))


#: The process's watchdog.
WATCHDOG = Watchdog()

if hasattr(os, "register_at_fork"):
    # A forked child has no watchdog thread: it starts its own at its first run.
    os.register_at_fork(after_in_child=WATCHDOG._reset)
