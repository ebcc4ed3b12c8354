"""The userspace VMM: what QEMU does around KVM_RUN.

It configures the VM through KVM's verbs (capabilities, CPUID), handles every user exit —
ucalls over port I/O, KVM_HC_MAP_GPA_RANGE into the shared-page tracker — and turns the run
into a `RunReport`. It sees only what real userspace sees: kvm_run exits and the host's view
of guest memory (ciphertext where a page is private); it never reads guest registers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from testbed.errors import TestbedError
from testbed.hw.exits import RunStop, StopReason
from testbed.hw.memory import HostMemory
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import (
    KVM_EXIT_IO_OUT,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_SYSTEM_EVENT_SEV_TERM,
    ApResetHoldExit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IoExit,
    KvmExit,
    MemoryFaultExit,
    MsrExit,
    ShutdownExit,
    SystemEventExit,
    exit_name,
)
from testbed.kvm.vcpu import KvmVcpu
from testbed.layout import UCALL_PORT
from testbed.trace import Tracer
from testbed.vmm.map_gpa import MapGpaHandler
from testbed.vmm.msr import MsrHandler
from testbed.vmm.ucall import Ucall, UcallCmd, UcallError, read_ucall
from testbed.x86 import vector_name

GHCB_MSR_TERM_REQ = 0x100
GHCB_SW_EXITINFO1_OFFSET = 0x398

OUTCOMES = ("done", "guest_assert", "unhandled_exception", "shutdown", "terminated", "timeout", "memory_fault",
            "internal_error", "kvm_run_error", "bad_ucall")


#: Entries a report keeps at each end of `user_exits` and of `ucalls`; what falls between is
#: counted (`user_exits_dropped`, `ucalls_dropped`), and `--trace` still has every one. A guest
#: in an exit loop used to grow the report until the timeout (1.4 GiB and 300 MB of JSON in 60 s).
REPORT_WINDOW = 1000

_T = TypeVar("_T")


class ReportWindow(list[_T]):
    """A list that keeps its first `keep` and its last `keep` entries: appending beyond
    2 * `keep` drops the oldest entry after the first `keep` and counts it in `dropped`.
    Everything else behaves as a list (indexing, iteration, JSON)."""

    def __init__(self, keep: int | None = None) -> None:
        super().__init__()
        self.keep = REPORT_WINDOW if keep is None else keep
        self.dropped = 0

    def append(self, entry: _T) -> None:
        """Add `entry` at the end, dropping the oldest entry of the tail if the window is full."""
        if len(self) >= 2 * self.keep:
            del self[self.keep]
            self.dropped += 1
        super().append(entry)

    def extend(self, entries: Iterable[_T]) -> None:
        """Append each of `entries` (bounded as append)."""
        for entry in entries:
            self.append(entry)


def _exit_window() -> ReportWindow[dict[str, Any]]:
    return ReportWindow()


@dataclass(frozen=True)
class SourceRef:
    """Where a guest assert is written (file, line)."""

    file: str
    line: int


@dataclass
class RunReport:
    """Everything a run produced, in the shape of `testbed run --json`."""

    outcome: str = "timeout"
    detail: str = ""
    #: the first and last REPORT_WINDOW ucalls (`ucalls_dropped` counts the others)
    ucalls: list[dict[str, Any]] = field(default_factory=_exit_window)
    #: vector, error_code, rip; cr2 for a #PF; file, line, symbol, offset where rip is in the program
    exception: dict[str, Any] | None = None
    #: the first and last REPORT_WINDOW user exits (`user_exits_dropped` counts the others;
    #: `exit_counts` counts every exit)
    user_exits: list[dict[str, Any]] = field(default_factory=_exit_window)
    shared_ranges: list[list[int]] = field(default_factory=list)
    exit_counts: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    termination: dict[str, int] | None = None
    #: outcome kvm_run_error: the errno KVM_RUN failed with (an exit handler returned -errno)
    errno: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def user_exits_dropped(self) -> int:
        """User exits left out of `user_exits` (between its first and last REPORT_WINDOW)."""
        return getattr(self.user_exits, "dropped", 0)

    @property
    def ucalls_dropped(self) -> int:
        """Ucalls left out of `ucalls` (between its first and last REPORT_WINDOW)."""
        return getattr(self.ucalls, "dropped", 0)

    @property
    def passed(self) -> bool:
        """The guest reached GUEST_DONE."""
        return self.outcome == "done"

    def syncs(self) -> list[int]:
        """The values of every GUEST_SYNC, in order."""
        return [u["args"][0] for u in self.ucalls if u["cmd"] == "sync"]

    def to_json(self) -> dict[str, Any]:
        """The `--json` object."""
        out: dict[str, Any] = {
            "outcome": self.outcome,
            "detail": self.detail,
            "ucalls": self.ucalls,
            "exception": self.exception,
            "user_exits": self.user_exits,
            "user_exits_dropped": self.user_exits_dropped,
            "ucalls_dropped": self.ucalls_dropped,
            "shared_ranges": self.shared_ranges,
            "stats": {"exits": dict(self.exit_counts), "wall_s": round(self.wall_s, 6)},
        }
        if self.termination is not None:
            out["termination"] = self.termination
        if self.errno is not None:
            out["errno"] = self.errno
        out.update(self.extra)
        return out


class Vmm:
    """Runs one vCPU to completion and records what userspace saw."""

    def __init__(
        self,
        vcpu: KvmVcpu,
        memory: HostMemory,
        map_gpa: MapGpaHandler,
        asserts: dict[int, SourceRef] | None = None,
        tracer: Tracer | None = None,
        record_exits: bool = True,
        implicit_conversion: str = "convert",
        msr: MsrHandler | None = None,
        locate: Callable[[int], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.vcpu = vcpu
        #: maps a guest address to its source (file, line, symbol, offset): host tooling, as a
        #: debugger with the guest's symbols would be; it reads no guest state
        self.locate = locate
        self.memory = memory
        self.map_gpa = map_gpa
        self.asserts = asserts or {}
        self.tracer = tracer if tracer is not None else Tracer.disabled()
        self.record_exits = record_exits
        self.implicit_conversion = implicit_conversion
        self.msr = msr if msr is not None else MsrHandler()
        #: where the final shared ranges come from (the VMM's tracker unless KVM keeps them)
        self.shared_source = map_gpa.tracker
        self.report = RunReport()
        self._reason_counts: dict[int, int] = {}  # per exit reason; named in the report at the end
        self._final: tuple[str, str] | None = None

    # ---------------------------------------------------------------- the run loop
    def run(self, timeout_s: float) -> RunReport:
        """Call KVM_RUN until the guest finishes, fails, or the time runs out."""
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while self._final is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._finish("timeout", f"guest did not finish within {timeout_s:g} s")
                break
            try:
                stop = self.vcpu.run(self, remaining)
            except KvmIoctlError as exc:
                # KVM_RUN returned -1/errno with no exit reason: the VM cannot run on. A host-side
                # failure the guest caused (e.g. an SEV-ES VMGEXIT handler returning -EINVAL).
                if self._final is None:
                    self.report.errno = exc.errno
                self._finish("kvm_run_error", str(exc))
                break
            self._on_stop(stop, timeout_s)
        self.report.wall_s = time.perf_counter() - start
        for reason, count in self._reason_counts.items():
            self.report.exit_counts[exit_name(reason)] += count
        assert self._final is not None
        self.report.outcome, self.report.detail = self._final
        self.report.shared_ranges = [[gfn, n] for gfn, n in self.shared_source.shared_ranges()]
        if self.shared_source.poisoned:
            self.report.extra["tracker_poisoned"] = True
        self.tracer.emit("vmm", "end", outcome=self.report.outcome, detail=self.report.detail)
        return self.report

    def _on_stop(self, stop: RunStop, timeout_s: float) -> None:
        if stop.reason is StopReason.TIMEOUT:
            self._finish("timeout", f"guest did not finish within {timeout_s:g} s")
        elif stop.reason is StopReason.EMULATOR_ERROR:
            self._finish("internal_error", f"emulator: {stop.detail}")

    def _finish(self, outcome: str, detail: str = "") -> None:
        if self._final is None:
            self._final = (outcome, detail)

    @property
    def ended(self) -> tuple[str, str] | None:
        """(outcome, detail) once the guest has finished or failed; None while it can run on."""
        return self._final

    # ------------------------------------------------------------------- exits
    def handle_exit(self, run: KvmExit) -> bool:
        """Userspace's half of KVM_RUN: True re-enters the guest, False stops."""
        reason = run.reason
        counts = self._reason_counts
        counts[reason] = counts.get(reason, 0) + 1
        if type(run) is HypercallExit:  # the hot path first
            if run.nr == KVM_HC_MAP_GPA_RANGE:
                run.ret = self.map_gpa.handle(run.args[0], run.args[1], run.args[2])
            if self.record_exits or self.tracer.enabled:
                self._record({"reason": "hypercall", "nr": run.nr, "args": list(run.args), "ret": run.ret,
                              "flags": run.flags})
            return True
        if isinstance(run, IoExit):
            return self._handle_io(run)
        if isinstance(run, ApResetHoldExit):
            # KVM_EXIT_AP_RESET_HOLD: the AP waits for a SIPI that nothing in the testbed sends.
            self._record({"reason": "ap_reset_hold"})
            self._finish("timeout", "vCPU parked in AP reset hold with nothing to wake it (no SIPI is modelled)")
            return False
        if isinstance(run, HltExit):
            self._record({"reason": "hlt"})
            self._finish("timeout", "vCPU halted with nothing to wake it (no interrupts are modelled)")
            return False
        if isinstance(run, ShutdownExit):
            self._record({"reason": "shutdown"})
            self._finish("shutdown", "triple fault")
            return False
        if isinstance(run, SystemEventExit):
            self._record({"reason": "system_event", "type": run.type, "data": list(run.data)})
            if run.type == KVM_SYSTEM_EVENT_SEV_TERM and run.data:
                value = run.data[0]
                if value & 0xFFF == GHCB_MSR_TERM_REQ:
                    # MSR protocol: data[0] is the MSR value, reason in bits 15:12 and 23:16.
                    term = {"reason_set": (value >> 12) & 0xF, "reason_code": (value >> 16) & 0xFF}
                    how = f"GHCB MSR 0x{value:x}"
                else:
                    # GHCB page protocol: data[0] is the GHCB's GPA; the reason is in its
                    # SW_EXITINFO1 (bits 3:0 set, 11:4 code), readable because the GHCB is shared.
                    try:
                        info1 = int.from_bytes(self.memory.read(value + GHCB_SW_EXITINFO1_OFFSET, 8), "little")
                    except TestbedError:
                        info1 = 0
                    term = {"reason_set": info1 & 0xF, "reason_code": (info1 >> 4) & 0xFF}
                    how = f"GHCB at 0x{value:x}"
                self.report.termination = term
                self._finish("terminated", f"guest requested termination ({how})")
            else:
                self._finish("terminated", f"system event {run.type}")
            return False
        if isinstance(run, MemoryFaultExit):
            private = bool(run.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)
            self._record({"reason": "memory_fault", "flags": run.flags, "gpa": run.gpa, "size": run.size})
            # QEMU's kvm_convert_memory(): an implicit conversion, then KVM_RUN retries.
            if self.implicit_conversion == "convert" and self.map_gpa.convert(
                run.gpa >> 12, max(1, run.size >> 12), private
            ) == 0:
                return True
            kind = "private" if private else "shared"
            why = ("the VMM refused to convert it" if self.implicit_conversion == "convert"
                   else "implicit conversions are refused")
            self._finish("memory_fault", f"guest made a {kind} access to gpa 0x{run.gpa:x}, which the host holds as "
                         f"{'shared' if private else 'private'}; {why}")
            return False
        if isinstance(run, MsrExit):
            # KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: userspace answers, KVM completes.
            self.msr.handle(run)
            self._record({"reason": exit_name(run.reason), "index": run.index, "msr_reason": run.msr_reason,
                          "data": run.data, "error": run.error})
            return True
        if isinstance(run, InternalErrorExit):
            self._record({"reason": "internal_error", "suberror": run.suberror, "detail": run.detail,
                          "data": list(run.data)})
            # run->internal as userspace reads it: the suberror says which KVM path gave up.
            self.report.extra["internal"] = {"suberror": run.suberror, "data": list(run.data)}
            self._finish("internal_error", run.detail)
            return False
        self._finish("internal_error", f"unexpected exit {exit_name(run.reason)}")
        return False

    def _record(self, entry: dict[str, Any]) -> None:
        if self.record_exits:
            self.report.user_exits.append(entry)
        if self.tracer.enabled:
            self.tracer.emit("vmm", "exit", **entry)

    def _handle_io(self, run: IoExit) -> bool:
        value = int.from_bytes(run.data[: run.size], "little")
        self._record({"reason": "io", "direction": "out" if run.direction == KVM_EXIT_IO_OUT else "in",
                      "port": run.port, "size": run.size, "value": value})
        if run.direction != KVM_EXIT_IO_OUT:
            run.data[:] = b"\xff" * run.size  # no device: reads float high
            return True
        if run.port != UCALL_PORT:
            return True  # no device: writes are dropped
        try:
            ucall = read_ucall(self.memory, value)
        except UcallError as exc:
            # The guest's message is malformed: the guest's failure, not the host's.
            self.report.extra["bad_ucall"] = {"gpa": value, "reason": str(exc)}
            self._finish("bad_ucall", str(exc))
            return False
        return self._handle_ucall(ucall)

    def _handle_ucall(self, ucall: Ucall) -> bool:
        entry: dict[str, Any] = {"cmd": ucall.name, "args": list(ucall.args)}
        if self.tracer.enabled:
            self.tracer.emit("guest", "ucall", cmd=ucall.name, args=list(ucall.args))
        if ucall.cmd == UcallCmd.UCALL_SYNC:
            self.report.ucalls.append(entry)
            return True
        if ucall.cmd == UcallCmd.UCALL_DONE:
            self.report.ucalls.append(entry)
            self._finish("done")
            return False
        if ucall.cmd == UcallCmd.UCALL_ABORT:
            site, a, b = [*ucall.args, 0, 0, 0][:3]
            where = self.asserts.get(site)
            entry = {"cmd": "abort", "args": [a, b]}
            if where is not None:
                entry["file"], entry["line"] = where.file, where.line
                loc = f"{where.file}:{where.line}"
            else:
                loc = f"unknown assert site {site}"
            self.report.ucalls.append(entry)
            self._finish("guest_assert", f"{loc}: GUEST_ASSERT_EQ failed: 0x{a:x} != 0x{b:x}")
            return False
        if ucall.cmd == UcallCmd.UCALL_UNHANDLED:
            vector, error, rip, cr2 = [*ucall.args, 0, 0, 0, 0][:4]
            exception: dict[str, Any] = {"vector": vector, "error_code": error, "rip": rip}
            detail = f"unexpected {vector_name(vector)} (error code 0x{error:x}) at rip 0x{rip:x}"
            if vector == 14:  # the runtime passes CR2 as the 4th argument
                exception["cr2"] = cr2
                detail += f", cr2 0x{cr2:x}"
            source = self.locate(rip) if self.locate is not None else None
            if source:
                exception.update(source)
                symbol = f" ({source['symbol']}+0x{source['offset']:x})" if source.get("symbol") else ""
                detail = f"{source['file']}:{source['line']}{symbol}: {detail}"
            self.report.exception = exception
            self._finish("unhandled_exception", detail)
            return False
        self.report.ucalls.append(entry)
        self.report.extra["bad_ucall"] = {"gpa": ucall.gpa, "reason": f"unknown command {ucall.cmd}"}
        self._finish("bad_ucall", f"ucall at 0x{ucall.gpa:x}: unknown command {ucall.cmd} (known: 1-4)")
        return False
