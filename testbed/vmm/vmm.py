"""The userspace VMM: what QEMU does with each exit KVM_RUN returns.

`handle_exit` is the default VMM: one `match` over the exit types (kvm/uapi.py) that answers
each as QEMU would — ucalls over port I/O, KVM_HC_MAP_GPA_RANGE into the shared-page tracker,
implicit conversions on KVM_EXIT_MEMORY_FAULT, the filtered MSR — and says whether the run
goes on. `Vmm` holds its state and records the run into a `RunReport`. The loop calling
KVM_RUN is the host API's (testbed/api.py). The VMM sees only what real userspace sees:
kvm_run exits and the host's view of guest memory; it never reads guest registers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, assert_never

from testbed.errors import TestbedError
from testbed.hw.memory import HostMemory
from testbed.kvm.uapi import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_TESTBED_DONATE_ENC_STATUS,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_SYSTEM_EVENT_SEV_TERM,
    KVM_SYSTEM_EVENT_TDX_FATAL,
    ApResetHoldExit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IoInExit,
    IoOutExit,
    KvmExit,
    MemoryFaultExit,
    RdmsrExit,
    ShutdownExit,
    SystemEventExit,
    TdxExit,
    WrmsrExit,
)
from testbed.layout import UCALL_PORT
from testbed.trace import Tracer
from testbed.vmm.donate import DonateHandler
from testbed.vmm.map_gpa import MapGpaHandler
from testbed.vmm.msr import MsrHandler
from testbed.vmm.pinning import PinAccounting
from testbed.vmm.tdx import TdxUserspace
from testbed.vmm.ucall import Ucall, UcallError, read_ucall, resolve_failure
from testbed.x86 import ERROR_CODE_VECTORS, Vector, vector_name

if TYPE_CHECKING:
    from testbed.asm import Program

#: The ReportFatalError message registers R14, R15, RBX, RDI, RSI, R8, R9, RDX (the GHCI's order,
#: QEMU's COPY_REG sequence) as indices into system_event.data, which holds the GPRs in
#: VCPU_REGS_* order (RAX 0, RCX 1, RDX 2, RBX 3, RSP 4, RBP 5, RSI 6, RDI 7, R8..R15 8..15) - the
#: numbering RCX's exposed-register bitmap uses too
FATAL_MESSAGE_REGS = (14, 15, 3, 7, 6, 8, 9, 2)
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


class SharedSource(Protocol):
    """Where the report's shared ranges come from (a SharedTracker, or PageEncBitmapSource)."""

    def shared_ranges(self) -> list[tuple[int, int]]: ...

    @property
    def poisoned(self) -> bool: ...


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


@dataclass(frozen=True)
class VmEnd:
    """How the default VMM ends a run: the report's `outcome` and `detail`, the report keys that
    go with it (`termination`, `exception`, `internal`, `bad_ucall`), and the exit it answered."""

    outcome: str
    detail: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)
    exit: KvmExit | None = None


def _ucall_name(ucall: Ucall) -> str:
    """"sync", "done", "abort", "unhandled", "cmd_<n>": the command's name, whichever form the
    ucall carries (a name or a number)."""
    cmd = ucall.cmd
    return cmd if isinstance(cmd, str) else ucall.name


class Vmm:
    """The default VMM: its state (the shared-page tracker and conversion policy, the MSR it
    handles, the host's view of memory) and the record of one run (`report`).

    `handle(exit)` answers one exit as QEMU would (`handle_exit` below) and records it; KVM_RUN
    is called by the run loop (testbed/api.py), not here."""

    def __init__(
        self,
        memory: HostMemory,
        map_gpa: MapGpaHandler,
        tracer: Tracer | None = None,
        record_exits: bool = True,
        implicit_conversion: str = "convert",
        msr: MsrHandler | None = None,
        locate: Callable[[int], Mapping[str, Any] | None] | None = None,
        program: Program | None = None,
        shared_source: SharedSource | None = None,
        inject_event: Callable[[], None] | None = None,
        pending_event_every: int | None = None,
    ) -> None:
        #: maps a guest address to its source (file, line, symbol, offset): host tooling, as a
        #: debugger with the guest's symbols would be; it reads no guest state
        self.locate = locate
        self.memory = memory
        self.map_gpa = map_gpa
        #: the guest program: resolves an abort's call-site id to its file:line and text (H10)
        self.program = program
        self.tracer = tracer if tracer is not None else Tracer.disabled()
        self.record_exits = record_exits
        self.implicit_conversion = implicit_conversion
        self.msr = msr if msr is not None else MsrHandler()
        #: QEMU's answers to KVM_EXIT_TDX (vmm/tdx.py)
        self.tdx = TdxUserspace(memory)
        #: where the final shared ranges come from: the VMM's tracker, unless KVM keeps them
        #: (the seed-era page-enc-status protocol: vmm/page_enc.py reads KVM's bitmap)
        self.shared_source: SharedSource = shared_source if shared_source is not None else map_gpa.tracker
        #: VMM-side control (testbed): after every `pending_event_every`-th MAP_GPA_RANGE exit it
        #: answers, the VMM makes an event pending on the vCPU (`inject_event`, as QEMU injecting
        #: an interrupt would), so KVM's TDX MapGPA completion answers RETRY (kvm/tdx.py)
        self.inject_event = inject_event
        self.pending_event_every = pending_event_every
        self._map_gpa_exits = 0
        #: the pin accounting (vmm/pinning.py) on the confidential VM types: sampled at each
        #: user exit, the report's `memory`
        self.pinning: PinAccounting | None = None
        #: the donation hypercall's handler (vmm/donate.py) when the VM runs the donated tracker
        self.donate: DonateHandler | None = None
        self.report = RunReport()
        self._reason_counts: dict[str, int] = {}  # per exit reason; into the report at the end
        self._end: VmEnd | None = None

    @property
    def ended(self) -> VmEnd | None:
        """How the run ended once the guest finished or failed; None while it can run on."""
        return self._end

    def finish(self, end: VmEnd) -> VmEnd:
        """Record the end of the run (the first end stands) and return the one that stands."""
        if self._end is None:
            self._end = end
            self.report.outcome, self.report.detail = end.outcome, end.detail
            for key, value in end.info.items():
                if key == "termination":
                    self.report.termination = value
                elif key == "exception":
                    self.report.exception = value
                elif key == "errno":
                    self.report.errno = value
                elif key != "ucall":
                    self.report.extra[key] = value
        return self._end

    def handle(self, exit: KvmExit) -> Ucall | VmEnd | None:
        """Answer one exit (its reply slot filled in place), record it, and say what it meant:
        the ucall it carried, the end of the run, or None (KVM_RUN may simply be called again)."""
        reason = exit.reason
        counts = self._reason_counts
        counts[reason] = counts.get(reason, 0) + 1
        result = handle_exit(self, exit)
        if self.pinning is not None:
            self.pinning.sample()
        if self.record_exits or self.tracer.enabled:
            entry = exit.to_json()
            if self.record_exits:
                self.report.user_exits.append(entry)
            if self.tracer.enabled:
                self.tracer.emit("vmm", "exit", **entry)
        if isinstance(result, VmEnd):
            result = self.finish(result)
        return result

    def finalize(self, wall_s: float) -> RunReport:
        """The report of the run as it stands: exit counts, final shared ranges, wall time."""
        report = self.report
        report.wall_s = wall_s
        report.exit_counts.clear()
        report.exit_counts.update(self._reason_counts)
        report.shared_ranges = [[gfn, n] for gfn, n in self.shared_source.shared_ranges()]
        if self.shared_source.poisoned:
            report.extra["tracker_poisoned"] = True
        if self.pinning is not None:
            report.extra["memory"] = self.pinning.to_json()
        self.tracer.emit("vmm", "end", outcome=report.outcome, detail=report.detail)
        return report

    # ------------------------------------------------------------------- ucalls
    def read_ucall(self, gpa: int) -> Ucall | VmEnd:
        """The ucall at `gpa`, or the end of the run for a message the VMM cannot take."""
        try:
            return read_ucall(self.memory, gpa)
        except UcallError as exc:
            # The guest's message is malformed: the guest's failure, not the host's.
            return VmEnd("bad_ucall", str(exc), {"bad_ucall": {"gpa": gpa, "reason": str(exc)}})

    def handle_ucall(self, ucall: Ucall) -> Ucall | VmEnd:
        """Record a ucall; sync and done go back to the caller, the others end the run."""
        name = _ucall_name(ucall)
        entry: dict[str, Any] = {"cmd": name, "args": list(ucall.args)}
        if self.tracer.enabled:
            self.tracer.emit("guest", "ucall", cmd=name, args=list(ucall.args))
        if name == "sync":
            self.report.ucalls.append(entry)
            return ucall
        if name == "done":
            self.report.ucalls.append(entry)
            self.finish(VmEnd("done"))
            return ucall
        if name == "abort":
            # The call-site id resolved against the program's assert table (ucall.py).
            failure = resolve_failure(ucall.args, self.program)
            ucall = Ucall(cmd=ucall.cmd, args=ucall.args, gpa=ucall.gpa, failure=failure, number=ucall.number)
            entry = {"cmd": "abort", "args": list(failure.values)}
            if failure.line:
                entry["file"], entry["line"] = failure.file, failure.line
                entry["message"] = failure.message  # GUEST_FAIL's text, or the assert's (H10)
            if failure.caller is not None:  # the assert failed in a helper called from here
                entry["caller"] = {"file": failure.caller[0], "line": failure.caller[1]}
            self.report.ucalls.append(entry)
            return VmEnd("guest_assert", str(failure), {"ucall": ucall})
        if name == "unhandled":
            vector, error, rip, cr2 = [*ucall.args, 0, 0, 0, 0][:4]
            # The runtime passes the error code in the second argument, 0 for a vector that
            # pushes none, and a #VE's exit reason (TDG.VP.VEINFO.GET) there: each is reported
            # as what it is, never as an error code the CPU did not push.
            exception: dict[str, Any] = {"vector": vector, "error_code": None, "rip": rip}
            code = ""
            if vector in ERROR_CODE_VECTORS:
                exception["error_code"] = error
                code = f" (error code 0x{error:x})"
            elif vector == Vector.VE:
                exception["exit_reason"] = error
                code = f" (exit reason {error})"
            detail = f"unexpected {vector_name(vector)}{code} at rip 0x{rip:x}"
            if vector == 14:  # the runtime passes CR2 as the 4th argument
                exception["cr2"] = cr2
                detail += f", cr2 0x{cr2:x}"
            source = self.locate(rip) if self.locate is not None else None
            if source:
                exception.update(source)
                symbol = f" ({source['symbol']}+0x{source['offset']:x})" if source.get("symbol") else ""
                detail = f"{source['file']}:{source['line']}{symbol}: {detail}"
            return VmEnd("unhandled_exception", detail, {"exception": exception})
        self.report.ucalls.append(entry)
        if name == "printf":
            reason = "UCALL_PRINTF is not supported: the testbed's struct ucall carries no string buffer"
            return VmEnd("bad_ucall", f"ucall at 0x{ucall.gpa:x}: {reason}",
                         {"bad_ucall": {"gpa": ucall.gpa, "reason": reason}})
        return VmEnd("bad_ucall", f"ucall at 0x{ucall.gpa:x}: unknown command {name.removeprefix('cmd_')} "
                     "(known: 1-5)", {"bad_ucall": {"gpa": ucall.gpa, "reason": f"unknown command {ucall.number}"}})

    def map_gpa_answered(self) -> None:
        """Count a MAP_GPA_RANGE exit answered; every `pending_event_every`-th makes an event
        pending (see __init__)."""
        self._map_gpa_exits += 1
        every = self.pending_event_every
        if every and self.inject_event is not None and self._map_gpa_exits % every == 0:
            self.inject_event()

    def _tdx_fatal(self, exit: SystemEventExit) -> VmEnd:
        """KVM_SYSTEM_EVENT_TDX_FATAL, as QEMU's tdx_handle_report_fatal_error() reads it: the
        error code in R12 (bits 15:0 must be 0), the message in the registers RCX's bitmap
        exposed (R14, R15, RBX, RDI, RSI, R8, R9, RDX, in that order, up to the first NUL), a GPA
        in R13 when R12 bit 63 says it is valid - recorded, never read (it is the guest's)."""
        data = list(exit.data) + [0] * (16 - len(exit.data))
        error_code, reg_mask = data[12], data[1]
        words = [data[i] for i in FATAL_MESSAGE_REGS if reg_mask & (1 << i)]
        raw = b"".join((w & ((1 << 64) - 1)).to_bytes(8, "little") for w in words).split(b"\0", 1)[0]
        message = raw.decode("utf-8", errors="backslashreplace")
        info: dict[str, Any] = {"error_code": error_code, "message": message,
                                "gpa": data[13] if error_code >> 63 else None}
        detail = f"TD reported a fatal error (error code 0x{error_code:x}): {message!r}"
        if error_code & 0xFFFF:
            detail += " - invalid error code (bits 15:0 must be 0)"
        return VmEnd("terminated", detail, {"tdx_fatal": info}, exit)

    def _termination(self, exit: SystemEventExit) -> VmEnd:
        if exit.type == KVM_SYSTEM_EVENT_TDX_FATAL:
            return self._tdx_fatal(exit)
        if exit.type != KVM_SYSTEM_EVENT_SEV_TERM or not exit.data:
            return VmEnd("terminated", f"system event {exit.type}", exit=exit)
        value = exit.data[0]
        if value & 0xFFF == GHCB_MSR_TERM_REQ:
            # MSR protocol: data[0] is the MSR value, reason in bits 15:12 and 23:16.
            term = {"reason_set": (value >> 12) & 0xF, "reason_code": (value >> 16) & 0xFF}
            how = f"GHCB MSR 0x{value:x}"
        else:
            # GHCB page protocol: data[0] is the GHCB's GPA; the reason is in its SW_EXITINFO1
            # (bits 3:0 set, 11:4 code), readable because the GHCB is shared.
            try:
                info1 = int.from_bytes(self.memory.read(value + GHCB_SW_EXITINFO1_OFFSET, 8), "little")
            except TestbedError:
                info1 = 0
            term = {"reason_set": info1 & 0xF, "reason_code": (info1 >> 4) & 0xFF}
            how = f"GHCB at 0x{value:x}"
        return VmEnd("terminated", f"guest requested termination ({how})", {"termination": term}, exit)

    def _memory_fault(self, exit: MemoryFaultExit) -> VmEnd | None:
        # QEMU's kvm_convert_memory(): an implicit conversion, then KVM_RUN retries.
        if exit.flags & ~KVM_MEMORY_EXIT_FLAG_PRIVATE:
            # kvm_cpu_exec(): "KVM_EXIT_MEMORY_FAULT: Unknown flag" stops the VM.
            return VmEnd("internal_error", f"KVM_EXIT_MEMORY_FAULT: unknown flag 0x{exit.flags:x}", exit=exit)
        private = exit.private
        if self.implicit_conversion == "convert" and self.map_gpa.convert(
            exit.gpa >> 12, max(1, exit.size >> 12), private
        ) == 0:
            return None
        kind = "private" if private else "shared"
        if exit.gpa >= self.memory.size:
            # kvm_convert_memory(): no memory region there - a private conversion fails.
            return VmEnd("memory_fault", f"guest made a {kind} access to gpa 0x{exit.gpa:x}, outside guest memory "
                         "(no memslot): there is no memory to convert", exit=exit)
        why = ("the VMM refused to convert it" if self.implicit_conversion == "convert"
               else "implicit conversions are refused")
        return VmEnd("memory_fault", f"guest made a {kind} access to gpa 0x{exit.gpa:x}, which the host holds as "
                     f"{'shared' if private else 'private'}; {why}", exit=exit)


def handle_exit(vmm: Vmm, exit: KvmExit) -> Ucall | VmEnd | None:
    """The default VMM's answer to one exit, as QEMU's kvm_cpu_exec() would give it: writes the
    reply slot in place and returns the ucall the exit carried, the end of the run, or None."""
    match exit:
        case HypercallExit(nr=nr, args=args):
            if nr == KVM_HC_MAP_GPA_RANGE:
                exit.ret = vmm.map_gpa.handle(args[0], args[1], args[2])
                vmm.map_gpa_answered()
            elif nr == KVM_HC_TESTBED_DONATE_ENC_STATUS and vmm.donate is not None:
                exit.ret = vmm.donate.handle(args[0], args[1], args[2])
            return None
        case TdxExit():
            # KVM_EXIT_TDX (GetQuote, GetTdVmCallInfo leaf 1, SetupEventNotifyInterrupt): QEMU
            # master's answers, with no quote-generation service (vmm/tdx.py).
            vmm.tdx.handle(exit)
            return None
        case IoOutExit(port=port):
            if port != UCALL_PORT:
                return None  # no device: writes are dropped
            ucall = vmm.read_ucall(exit.value)
            return ucall if isinstance(ucall, VmEnd) else vmm.handle_ucall(ucall)
        case IoInExit(size=size, count=count):
            exit.data = b"\xff" * (size * count)  # no device: reads float high
            return None
        case MemoryFaultExit():
            return vmm._memory_fault(exit)
        case RdmsrExit() | WrmsrExit():
            # KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: userspace answers, KVM completes.
            vmm.msr.handle(exit)
            return None
        case HltExit():
            return VmEnd("timeout", "vCPU halted with nothing to wake it (no interrupts are modelled)", exit=exit)
        case ApResetHoldExit():
            # KVM_EXIT_AP_RESET_HOLD: the AP waits for a SIPI that nothing in the testbed sends.
            return VmEnd("timeout", "vCPU parked in AP reset hold with nothing to wake it (no SIPI is modelled)",
                         exit=exit)
        case ShutdownExit():
            return VmEnd("shutdown", "triple fault", exit=exit)
        case SystemEventExit():
            return vmm._termination(exit)
        case InternalErrorExit(suberror=suberror, detail=detail, data=data):
            # run->internal as userspace reads it: the suberror says which KVM path gave up.
            return VmEnd("internal_error", detail, {"internal": {"suberror": suberror, "data": list(data)}}, exit)
        case _:
            assert_never(exit)
