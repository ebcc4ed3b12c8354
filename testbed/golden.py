"""Golden traces: a normalised, deterministic record of what the host saw in one run, and a
readable event-by-event diff against a recorded one.

A golden trace is a JSON Lines file, one per scenario (guest, defines, the options that differ
from the defaults) and VM type: a header line, then one event per line, from `guest_main` to
the end of the run (the runtime's boot is the same for every guest of a configuration and is
not recorded, so a golden can be checked on a machine restored from its boot snapshot,
`reuse=True`):

Events (what the host saw):

- `hypercall`: a hypercall KVM handled itself: `nr`, the arguments it reads (`args`), `ret`;
- `ud`, `fix_hypercall`: KVM's #UD intercept (what it decoded) and its rewrite of a foreign
  hypercall instruction (`old`, `new` bytes); `inject`: an exception KVM injected;
- `msr`: an MSR access KVM emulated (`index`, `write`, `value`, `ret`);
- `ghcb`, `ghcb_answer`: an SEV-ES/SNP VMGEXIT through the GHCB (`exit_code`, `info1`,
  `info2`, the `valid` bitmap) and KVM's answer in it: `info1`, `info2` and the registers the
  GHCB protocol defines as that exit's outputs (`rax`..`rdx`: CPUID's four, RDMSR's and
  RDTSC's RAX and RDX, an IN's and VMMCALL's RAX, ...); `ghcb_msr` (the GHCB MSR protocol's
  request) and the other GHCB-protocol events of testbed/kvm/sev.py as traced;
- `tdvmcall`, `tdvmcall_answer`: a TD's TDG.VP.VMCALL (R10, R11 and the argument registers
  the call reads) and KVM's answer: R10 and the registers the leaf returns (R11 of an I/O or
  MMIO read, RDMSR, MapGPA; R12-R15 of CPUID; R11-R14 of GetTdVmCallInfo);
- `user_exit`: a KVM_RUN exit to userspace with its arguments and, when the default VMM
  answered it, the answer (`ret`, `data`, ...); ucall port I/O is left to `ucall`;
- `ucall` (`cmd`, `args`; an abort's values, an unhandled exception's vector, error code and
  CR2 - no code addresses), `kvm_run_error`, `end` (`outcome`, `detail`), and last
  `shared_ranges`: the VMM's final shared set as merged `[gfn, npages]` ranges.

Normalisation: no times, sequence numbers or host addresses; a hypercall's unused argument
registers (whatever the guest left there) are dropped for the hypercalls whose arity KVM
defines; a guest code address the testbed reports (a RIP, an assert's address) never enters
the comparison (a value the guest itself sends in a ucall is compared as sent). An event with a
guest source line behind it carries it as `at` (file name:line), shown in diffs but not
compared: the line of the guest instruction that exited, or, for an exit the runtime
made on the guest's behalf (set_memory_shared, a ucall, a #VC/#VE handler's), the guest line
that called into the runtime (found from the return addresses on the guest's stack). The end
of a failed run keeps its source location (an assert's file:line, a fault's file:line and
symbol) in `at` too, and its `detail` names source files by file name alone. So editing a
guest's comments, inserting code, or recording from another directory does not change what is
compared. The memory-encryption key is fixed (seed 1 unless the options give one). A run that
ends in a timeout is recorded, but the events before a timeout depend on the host's speed:
record scenarios that end.

Not recorded: KVM's answer to a CPUID on a VM type whose registers KVM writes itself (default,
sw-protected, sev), and the GHCB MSR protocol's response: no trace event carries them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.errors import UsageError
from testbed.hw.exits import SVM_IOIO_STR, SVM_IOIO_TYPE_IN, Vendor
from testbed.kvm.uapi import (
    KVM_HC_CLOCK_PAIRING,
    KVM_HC_KICK_CPU,
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_SCHED_YIELD,
    KVM_HC_SEND_IPI,
    KVM_HC_VAPIC_POLL_IRQ,
)
from testbed.layout import ISTSTACK_TOP, KSTACK_TOP, TRAPSTACK_TOP, UCALL_PORT, USTACK_TOP
from testbed.x86 import Reg

if TYPE_CHECKING:
    from testbed.asm import Program
    from testbed.machine import Machine, VmOptions
    from testbed.vmm.ucall import GuestFailure

__all__ = ["FORMAT", "Golden", "GoldenDiff", "check", "compare", "golden_path", "read", "record", "update", "write"]

#: the file format's version (the header's "golden"); 2: the answers' output registers, `at`
#: on runtime-made exits and on the end, no code addresses, options in the file name
FORMAT = 2
#: the memory-encryption seed of a golden run when the options name none
DEFAULT_SEED = 1
#: lines of the event-by-event diff shown (the first divergence is always among them)
DIFF_LINES = 40
#: the header fields a check compares (the guest's file name is not: the path already matched)
_HEADER_KEYS = ("vm_type", "vendor", "defines")
#: options left out of the file name: memory (nearly every golden sets it; a mismatch fails the
#: check by the header) and the seed when it is the golden default
_UNNAMED_OPTIONS = frozenset({"memory"})
#: the longest option value written into a file name as it is (longer ones: a short hash)
_NAME_VALUE_MAX = 24

#: arguments KVM reads per hypercall (x86.c __kvm_emulate_hypercall); others: all four
_HYPERCALL_ARITY = {
    KVM_HC_VAPIC_POLL_IRQ: 0,
    KVM_HC_KICK_CPU: 2,
    KVM_HC_CLOCK_PAIRING: 2,
    KVM_HC_SEND_IPI: 4,
    KVM_HC_SCHED_YIELD: 1,
    KVM_HC_MAP_GPA_RANGE: 3,
}
#: kvm-layer events of the GHCB protocol recorded as they are traced (testbed/kvm/sev.py)
_SEV_EVENTS = frozenset({"vmgexit_no_ghcb", "vmgexit_unmappable_ghcb", "vmgexit_bad_input", "sev_term",
                         "ap_creation_rejected", "psc_done"})
_DROP = frozenset({"seq", "t", "layer", "event", "rip", "gpa_ghcb"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]")
#: the fields of an event that are shown in a diff but never compared
_NOT_COMPARED = frozenset({"at"})


@dataclasses.dataclass
class Golden:
    """One golden trace: the header (guest, VM type, vendor, defines, options) and the events."""

    header: dict[str, Any]
    events: list[dict[str, Any]]

    def lines(self) -> list[str]:
        """The file's lines, header first."""
        return [_dump(self.header)] + [_dump(e) for e in self.events]


@dataclasses.dataclass
class GoldenDiff:
    """The result of comparing a run with its golden trace; `text` is empty when they match.

    A run matches when every event matches and it ran with the golden's VM type, vendor,
    defines and options (`header`: what differs there, empty when nothing does)."""

    path: Path
    first: int | None  # index (0-based) of the first divergent event, None if the events are equal
    text: str
    header: str = ""

    @property
    def equal(self) -> bool:
        """True when every event and the header's VM type, vendor, defines and options match."""
        return self.first is None and not self.header


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=True)


def _natural_vendor(vm_type: str) -> Vendor:
    return Vendor.INTEL if vm_type == "tdx" else Vendor.AMD


def golden_path(guest: str | Path, options: VmOptions, golden_dir: str | Path | None = None) -> Path:
    """Where the golden trace of `guest` under `options` lives: `DIR/<stem>[.<NAME=VALUE>...]
    [.<option=value>...].<vm-type>[.<vendor>].jsonl`, DIR defaulting to `golden/` beside the
    guest: the defines, then the options that differ from the defaults (but memory, and the
    seed when it is the golden default), each `name=value` or, for a long value, `name=` and a
    short hash of it; the vendor is named only when it is not the VM type's own (amd; intel for
    tdx). With default options the name is `<stem>.<vm-type>.jsonl`."""
    guest = Path(guest)
    directory = Path(golden_dir) if golden_dir is not None else guest.parent / "golden"
    parts = [guest.stem]
    parts += [f"{k}={v}" for k, v in sorted(options.defines.items())]
    named = _changed_options(golden_options(options))
    parts += [_name_part(k, v) for k, v in sorted(named.items()) if k not in _UNNAMED_OPTIONS]
    parts.append(options.vm_type)
    if options.vendor is not _natural_vendor(options.vm_type):
        parts.append(options.vendor.value)
    return directory / (".".join(_UNSAFE.sub("_", p) for p in parts) + ".jsonl")


def _name_part(name: str, value: Any) -> str:
    """`name=value` for a file name: readable when the value is short and needs no escaping,
    else `name=` and 8 hex digits of the value's hash (stable across runs and machines)."""
    text = _name_value(value)
    if len(text) > _NAME_VALUE_MAX or _UNSAFE.search(text):
        text = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}={text}"


def _name_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, int):
        return f"0x{value:x}" if value >= 0x10000 else str(value)
    if isinstance(value, list):
        return "+".join("-".join(_name_value(v) for v in item) if isinstance(item, list) else _name_value(item)
                        for item in value)
    return str(value)


def _changed_options(options: VmOptions) -> dict[str, Any]:
    """The options (other than the VM type, vendor, defines and the run's plumbing) that differ
    from VmOptions' defaults, as plain JSON values."""
    from testbed.machine import VmOptions

    default = VmOptions()
    changed: dict[str, Any] = {}
    for f in dataclasses.fields(VmOptions):
        if f.name in ("vendor", "vm_type", "defines", "trace", "timeout", "record_exits"):
            continue
        value = getattr(options, f.name)
        if value != getattr(default, f.name):
            changed[f.name] = _plain(value)
    if changed.get("seed") == DEFAULT_SEED:
        del changed["seed"]  # every golden runs with it; the header still records it
    return changed


def _header(guest: str | Path, options: VmOptions) -> dict[str, Any]:
    changed = _changed_options(options)
    if options.seed is not None:
        changed["seed"] = options.seed
    return {"golden": FORMAT, "guest": Path(guest).name, "vm_type": options.vm_type,
            "vendor": options.vendor.value, "defines": {k: _plain(v) for k, v in sorted(options.defines.items())},
            "options": dict(sorted(changed.items()))}


def _plain(value: Any) -> Any:
    if hasattr(value, "value") and not isinstance(value, bool | int | float):
        return _plain(value.value)  # an enum (Vendor, KvmVersion)
    if isinstance(value, bool | int | str | float) or value is None:
        return value if not isinstance(value, str) else str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def golden_options(options: VmOptions) -> VmOptions:
    """The options of a golden run: the seed fixed (DEFAULT_SEED unless given), no trace stream."""
    seed = options.seed if options.seed is not None else DEFAULT_SEED
    return dataclasses.replace(options, seed=seed, trace=None, defines=dict(options.defines))


# ----------------------------------------------------------------------------- recording
#: the GHCB save-area registers (testbed/kvm/ghcb.py GhcbSave offsets) KVM answers in
_GHCB_REGS = {"rax": 0x1F8, "rbx": 0x318, "rcx": 0x308, "rdx": 0x310}
#: SW_EXITCODE -> the registers the GHCB protocol defines as the hypervisor's outputs
#: (GHCB specification, "Hypervisor outputs"); IOIO and MSR depend on the direction
_GHCB_OUTPUTS: dict[int, tuple[str, ...]] = {
    0x027: ("rax",),                       # READ_DR7
    0x06E: ("rax", "rdx"),                 # RDTSC
    0x06F: ("rax", "rdx"),                 # RDPMC
    0x072: ("rax", "rbx", "rcx", "rdx"),   # CPUID
    0x081: ("rax",),                       # VMMCALL
    0x087: ("rax", "rcx", "rdx"),          # RDTSCP
    0x80000012: ("rbx",),                  # SNP extended guest request: the certificate pages
}
_SVM_EXIT_IOIO, _SVM_EXIT_MSR = 0x07B, 0x07C


def _ghcb_outputs(exit_code: int, info1: int) -> tuple[str, ...]:
    if exit_code == _SVM_EXIT_IOIO:  # an IN (not a string IN, whose data is in the scratch area)
        return ("rax",) if info1 & SVM_IOIO_TYPE_IN and not info1 & SVM_IOIO_STR else ()
    if exit_code == _SVM_EXIT_MSR:  # RDMSR (SW_EXITINFO1 0); WRMSR returns nothing
        return ("rax", "rdx") if info1 == 0 else ()
    return _GHCB_OUTPUTS.get(exit_code, ())


#: GHCI leaf (R11) -> how many of R12..R14 it reads (tdx.c handle_tdvmcall and the instruction leaves)
_TDVMCALL_ARITY = {10: 1, 12: 0, 30: 3, 31: 1, 32: 2, 48: 3, 0x10000: 1, 0x10001: 2, 0x10002: 2, 0x10003: 1, 0x10004: 1}


def _tdvmcall_outputs(call: dict[str, Any] | None) -> tuple[str, ...]:
    """The registers a TDVMCALL returns besides R10 (the status; a KVM hypercall's return
    value): GHCI 1.5 / tdx.c, by leaf and direction."""
    if call is None:
        return ("r11",)  # not seen (cannot happen in a traced run): R11 as format 1 did
    if call.get("r10", 0) != 0:
        return ()  # a KVM hypercall: R10 alone
    leaf, write = call.get("r11", 0), call.get("r13", 0) & 0xFFFFFFFF
    if leaf == 10:  # CPUID: EAX..EDX
        return ("r12", "r13", "r14", "r15")
    if leaf in (30, 48):  # I/O, MMIO: a read's value
        return ("r11",) if write == 0 else ()
    if leaf in (31, 0x10001):  # RDMSR's value; MapGPA's next GPA on RETRY or an error
        return ("r11",)
    if leaf == 0x10000:  # GetTdVmCallInfo
        return ("r11", "r12", "r13", "r14")
    return ()


def _tdvmcall_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A TDVMCALL's registers without those the call does not read (the guest's leftovers)."""
    regs = [fields.get(r, 0) for r in ("r10", "r11", "r12", "r13", "r14")]
    if regs[0] != 0:  # a KVM hypercall: nr = R10, a0..a3 = R11..R14
        return {"r10": regs[0], "args": regs[1:1 + _HYPERCALL_ARITY.get(regs[0], 4)]}
    return {"r10": 0, "r11": regs[1], "args": regs[2:2 + _TDVMCALL_ARITY.get(regs[1], 3)]}


def _is_ucall(fields: dict[str, Any]) -> bool:
    return fields.get("reason") == "io" and fields.get("port") == UCALL_PORT and fields.get("direction") == "out"


class _Peek:
    """What the normaliser reads of the machine besides the trace, as a debugger would: guest
    registers, the guest's stack, KVM's view of a GHCB. Read-only; None where a read fails."""

    def __init__(self, machine: Machine | None) -> None:
        self.machine = machine

    def reg(self, reg: Reg) -> int | None:
        if self.machine is None:
            return None
        try:
            return self.machine.cpu.read_reg(reg)
        except Exception:  # a closed or half-built machine: no value, never a failed record
            return None

    def guest_rsp(self) -> int | None:
        """The guest's RSP at a VM exit: during a TDG.VP.VMCALL exit the TDX module shows KVM a
        zero in each GPR the TD did not expose and keeps the TD's own value (hw/tdx_module.py)."""
        module = self.machine.cpu.tdx_module if self.machine is not None else None
        hidden = module.hidden_gpr(Reg.RSP) if module is not None else None
        return hidden if hidden is not None else self.reg(Reg.RSP)

    def virtual(self, va: int, length: int) -> bytes | None:
        """`length` bytes of guest-virtual memory as the guest reads them (plaintext)."""
        if self.machine is None:
            return None
        from testbed.x86.addr import Gva

        try:
            return self.machine.cpu.read_virtual(Gva(va), length)
        except Exception:  # unmapped, outside memory, refused by the RMP: the scan stops there
            return None

    def kvm_u64(self, gpa: int) -> int | None:
        """A u64 of guest memory as KVM reads it (the memslot's userspace mapping)."""
        if self.machine is None:
            return None
        try:
            return int.from_bytes(self.machine.memory.userspace_read(gpa, 8), "little")
        except Exception:
            return None


#: how far up the guest's stack a runtime exit looks for the guest's call into the runtime
_STACK_SCAN = 4096
#: the tops of the runtime's stacks (testbed/layout.py): a scan stops at the one it is below
_STACK_TOPS = (KSTACK_TOP, TRAPSTACK_TOP, ISTSTACK_TOP, USTACK_TOP)
_STACK_CHUNK = 256
_U64 = (1 << 64) - 1


class _Normaliser:
    """Turns the tracer's events (testbed/trace.py) into golden events, in order."""

    def __init__(self, program: Program, machine: Machine | None = None) -> None:
        from testbed.machine import LIB_DIR

        self.program = program
        self._peek = _Peek(machine)
        lib = LIB_DIR.resolve()
        files = {loc.file for _a, loc in program.lines} | {site.file for site in program.asserts.values()}
        self._runtime_files = {f for f in files if Path(f).resolve().is_relative_to(lib)}
        # Every spelling of a source file's path -> its file name, longest first (a path that
        # is the end of another is replaced after it).
        names: dict[str, str] = {}
        for f in files:
            for spelling in (f, str(Path(f).resolve())):
                if os.sep in spelling or "/" in spelling:
                    names[spelling] = Path(f).name
        self._paths = sorted(names.items(), key=lambda item: -len(item[0]))
        self.events: list[dict[str, Any]] = []
        self._origin_at: str | None = None  # the guest line behind the exit being handled
        self._forwarding = False  # a #VC/#VE was delivered: its handler's next exit forwards it
        self._forwarded: str | None = None  # ... for the guest line behind that exception
        self._pending_exit: dict[str, Any] | None = None  # a kvm user_exit, until the VMM answers it
        self._ghcb_call: dict[str, Any] | None = None  # the VMGEXIT KVM is handling
        self._tdvmcall: dict[str, Any] | None = None  # the TDVMCALL KVM is handling
        self._failure: GuestFailure | None = None  # the abort ucall's failure, for the end
        self._fault_at: str | None = None  # the unhandled exception's location, for the end
        self._fault_rip: int | None = None

    # ------------------------------------------------------------------ where in the guest
    def _where(self, rip: int | None, *, any_file: bool = False, symbol: bool = False) -> str | None:
        """`file:line` of `rip` (file name only) if a line of the guest's own sources emitted it
        (`any_file`: the runtime's too), with `(symbol+0xoff)` if asked."""
        if rip is None:
            return None
        where = self.program.location(rip)
        if where is None or (where.file in self._runtime_files and not any_file):
            return None
        text = f"{Path(where.file).name}:{where.line}"
        if symbol:
            loc = self.program.locate(rip)
            if loc is not None and loc.symbol:
                text += f" ({loc.symbol}+0x{loc.offset:x})"
        return text

    def _call_site(self, ret: int) -> int | None:
        """The address of the call instruction `ret` returns past, if the bytes before it are
        one (call rel32 into the program, call reg, call [rip+disp32])."""
        program = self.program
        off = ret - program.base
        code = program.code
        if not 2 <= off <= len(code):
            return None
        if off >= 5 and code[off - 5] == 0xE8:
            target = (ret + int.from_bytes(code[off - 4:off], "little", signed=True)) & _U64
            if program.base <= target < program.end:
                return ret - 5
        if off >= 6 and code[off - 6] == 0xFF and code[off - 5] == 0x15:
            return ret - 6
        if code[off - 2] == 0xFF and code[off - 1] & 0xF8 == 0xD0:
            return ret - 3 if off >= 3 and code[off - 3] == 0x41 else ret - 2
        return None

    def _guest_caller(self, rsp: int | None) -> str | None:
        """The guest line whose call the runtime is running for: the first return address on
        the stack at `rsp` (upwards, to the top of the runtime's stack it is on) that returns
        into the guest's own code after a call."""
        if rsp is None:
            return None
        base, end = self.program.base, self.program.end
        va = rsp & ~7
        top = min([t for t in _STACK_TOPS if t > va] or [va + _STACK_SCAN])
        top = min(top, va + _STACK_SCAN)
        while va < top:
            n = min(_STACK_CHUNK, 0x1000 - (va & 0xFFF), top - va)
            data = self._peek.virtual(va, n)
            if data is None:
                return None
            for i in range(0, n - 7, 8):
                value = int.from_bytes(data[i:i + 8], "little")
                if base < value <= end:
                    site = self._call_site(value)
                    at = self._where(site) if site is not None else None
                    if at is not None:
                        return at
            va += n
        return None

    def _attribute(self, rip: int | None, rsp: int | None) -> str | None:
        at = self._where(rip)
        return at if at is not None else self._guest_caller(rsp)

    # ---------------------------------------------------------------------------- events
    def _add(self, event: str, fields: dict[str, Any], at: str | None = None) -> None:
        entry: dict[str, Any] = {"event": event}
        entry.update({k: _plain(v) if not isinstance(v, bytes | bytearray) else v.hex() for k, v in fields.items()})
        at = at if at is not None else self._origin_at
        if at is not None:
            entry["at"] = at
        self.events.append(entry)

    def _flush_exit(self) -> None:
        if self._pending_exit is not None:
            exit, self._pending_exit = self._pending_exit, None
            self._add("user_exit", exit)

    def feed(self, rec: dict[str, Any]) -> None:
        """One traced event."""
        layer, event = rec.get("layer"), rec.get("event")
        fields = {k: v for k, v in rec.items() if k not in _DROP}
        if layer == "hw":
            self._feed_hw(event, rec, fields)
        elif layer == "kvm":
            self._feed_kvm(event, rec, fields)
        elif layer == "vmm" and event == "exit":
            if _is_ucall(fields):
                return
            self._pending_exit = None
            self._add("user_exit", fields)
        elif layer == "guest" and event == "ucall":
            self._flush_exit()
            self._ucall(fields)

    def _feed_hw(self, event: Any, rec: dict[str, Any], fields: dict[str, Any]) -> None:
        if event == "vmexit":
            self._flush_exit()
            # The exit's guest line: the exiting instruction's if it is the guest's own; else,
            # for the first exit of a #VC/#VE handler, that of the instruction it forwards; else
            # (the runtime's own exit) the guest's call into the runtime.
            at = self._where(rec.get("rip"))
            if at is None:
                at = self._forwarded if self._forwarding else self._guest_caller(self._peek.guest_rsp())
            self._origin_at = at
            self._forwarding, self._forwarded = False, None
        elif event == "deliver" and rec.get("vector") in (20, 29):
            # #VE / #VC delivered: the interrupted RSP is in the frame the CPU pushed
            # ([error code,] RIP, CS, RFLAGS, RSP, SS); the handler's first exit forwards it.
            frame = self._peek.reg(Reg.RSP)
            slot = 24 if rec.get("error_code") is None else 32
            raw = self._peek.virtual(frame + slot, 8) if frame is not None else None
            self._forwarding = True
            self._forwarded = self._attribute(rec.get("rip"), int.from_bytes(raw, "little") if raw else None)
        elif event == "inject":
            self._add("inject", fields)

    def _feed_kvm(self, event: Any, rec: dict[str, Any], fields: dict[str, Any]) -> None:
        if event == "handle_exit":
            return
        if event == "user_exit":
            self._flush_exit()
            if not _is_ucall(fields):
                self._pending_exit = fields
        elif event == "hypercall":
            if fields.get("user_exit"):
                return  # the user exit records it, with the VMM's answer
            nr = fields.get("nr", -1)
            args = list(fields.get("args", []))[: _HYPERCALL_ARITY.get(nr, 4)]
            self._add("hypercall", {"nr": nr, "args": args, "ret": fields.get("ret")})
        elif event == "emulate_ud":
            self._add("ud", {"decode": fields.get("decode")}, self._where(rec.get("rip")))
        elif event == "fix_hypercall":
            self._add("fix_hypercall", {"old": fields.get("old"), "new": fields.get("new")},
                      self._where(rec.get("rip")))
        elif event == "msr":
            self._add("msr", fields)
        elif event == "vmgexit":
            self._ghcb_call = fields
            self._add("ghcb", {"exit_code": fields.get("exit_code"), "info1": fields.get("info1"),
                               "info2": fields.get("info2"), "valid": f"{fields.get('valid_bitmap', 0):x}"})
        elif event == "vmgexit_done":
            self._flush_exit()
            self._add("ghcb_answer", self._ghcb_answer(fields))
        elif event == "vmgexit_msr":
            self._add("ghcb_msr", {"value": f"{fields.get('ghcb_msr', 0):x}"})
        elif event == "tdvmcall":
            self._tdvmcall = fields
            self._add("tdvmcall", _tdvmcall_fields(fields))
        elif event == "tdvmcall_done":
            self._flush_exit()
            self._add("tdvmcall_answer", self._tdvmcall_answer(fields))
        elif event == "inject_pf":
            self._add("inject", {"vector": 14, "error_code": fields.get("error_code"), "cr2": fields.get("gva")})
        elif event == "kvm_run_error":
            self._flush_exit()
            self._add("kvm_run_error", {**fields, "detail": self._text(str(fields.get("detail", "")))})
        elif event in _SEV_EVENTS:
            fields.pop("gpa", None)
            self._add(event, fields)

    def _ghcb_answer(self, fields: dict[str, Any]) -> dict[str, Any]:
        """KVM's answer in the GHCB: SW_EXITINFO1/2 and the exit's output registers, read from
        the page as the guest will (KVM has written them back: sev_es_sync_to_ghcb)."""
        answer: dict[str, Any] = {"info1": fields.get("info1"), "info2": fields.get("info2")}
        call, gpa = self._ghcb_call, fields.get("gpa")
        self._ghcb_call = None
        if call is None or gpa is None:
            return answer
        for reg in _ghcb_outputs(int(call.get("exit_code", 0)), int(call.get("info1", 0))):
            answer[reg] = self._peek.kvm_u64(gpa + _GHCB_REGS[reg])
        return answer

    def _tdvmcall_answer(self, fields: dict[str, Any]) -> dict[str, Any]:
        """KVM's answer to a TDVMCALL: R10 and the registers the leaf returns, as KVM left them
        for the TD (read before the TDCALL completes)."""
        answer: dict[str, Any] = {"r10": fields.get("r10")}
        call, self._tdvmcall = self._tdvmcall, None
        for reg in _tdvmcall_outputs(call):
            answer[reg] = fields.get(reg) if reg in fields else self._peek.reg(Reg[reg.upper()])
        return answer

    def _ucall(self, fields: dict[str, Any]) -> None:
        from testbed.vmm.ucall import ABORT_VALUES, resolve_failure

        cmd, args = fields.get("cmd"), list(fields.get("args", []))
        at = None
        if cmd == "abort":
            # [site id, the assert's address, the caller's return address, values...]: the
            # first three are where the assert is, kept in `at` (and the end's), not compared.
            self._failure = failure = resolve_failure(args, self.program)
            if failure.line:
                at = f"{Path(failure.file).name}:{failure.line}"
            args = args[ABORT_VALUES:]
        elif cmd == "unhandled":
            # [vector, error code, RIP, CR2]: the RIP is where the fault is, kept in `at`.
            rip = args[2] if len(args) > 2 else None
            self._fault_rip = rip
            self._fault_at = self._where(rip, any_file=True, symbol=True)
            at = self._where(rip)
            args = args[:2] + args[3:]
        self._add("ucall", {"cmd": cmd, "args": args}, at)

    # ------------------------------------------------------------------------ the end
    def _text(self, text: str) -> str:
        """A message as compared: source files by file name, no code addresses (a RIP)."""
        for spelling, name in self._paths:
            text = text.replace(spelling, name)

        def code_address(m: re.Match[str]) -> str:
            value = int(m.group(2), 16)
            return m.group(0) if not self.program.base <= value < self.program.end else f"{m.group(1)}<code>"

        text = _RIP.sub(lambda m: f"{m.group(1)}<code>", text)
        return _AT_ADDRESS.sub(code_address, text)

    def _end(self, outcome: str, detail: str) -> tuple[str, str | None]:
        """The end's compared detail and its location (`at`)."""
        from testbed.vmm.ucall import GuestFailure

        failure = self._failure
        if outcome == "guest_assert" and isinstance(failure, GuestFailure) and detail == str(failure):
            plain = str(dataclasses.replace(failure, caller=None))
            prefix = f"{failure.file}:{failure.line}: "
            at = f"{Path(failure.file).name}:{failure.line}" if failure.line else None
            if at is not None and failure.caller is not None:
                at += f" (in a helper called from {Path(failure.caller[0]).name}:{failure.caller[1]})"
            return self._text(plain.removeprefix(prefix)), at
        if outcome == "unhandled_exception":
            # "file:line (symbol+0xoff): unexpected #UD (error code 0x0) at rip 0x100009"
            # (vmm.py handle_ucall): the location goes to `at`, the RIP nowhere.
            loc = self.program.locate(self._fault_rip) if self._fault_rip is not None else None
            if loc is not None:
                symbol = f" ({loc.symbol}+0x{loc.offset:x})" if loc.symbol else ""
                detail = detail.removeprefix(f"{loc.file}:{loc.line}{symbol}: ")
            return self._text(_AT_RIP.sub("", detail)), self._fault_at
        return self._text(detail), None

    def finish(self, outcome: str, detail: str, shared: Iterable[Sequence[int]]) -> list[dict[str, Any]]:
        """The run ended: its outcome and the final shared ranges close the record."""
        self._flush_exit()
        self._origin_at = None
        text, at = self._end(outcome, detail)
        self._add("end", {"outcome": outcome, "detail": text}, at)
        self._origin_at = None
        self._add("shared_ranges", {"ranges": [[int(g), int(n)] for g, n in shared]})
        return self.events


_AT_RIP = re.compile(r" at rip 0x[0-9a-f]+")
_RIP = re.compile(r"\b(rip )0x[0-9a-f]+")
_AT_ADDRESS = re.compile(r"\b(at )0x([0-9a-f]+)\b")


def record(guest: str | Path, options: VmOptions, *, text: str | None = None, reuse: bool = True) -> Golden:
    """Run `guest` under `options` (the seed fixed by `golden_options`) with the default VMM and
    return its golden trace. `reuse=True` takes a booted machine from the process's pool
    (testbed/snapshot.py): the record starts at guest_main either way."""
    from testbed.api import Vm, VmExitError, VmTimeoutError, run_report
    from testbed.vmm.vmm import VmEnd

    opts = golden_options(options)
    header = _header(guest, opts)
    with Vm(opts) as vm:
        try:
            vcpu = vm.load(guest, text=text, reuse=reuse)
        except (VmExitError, VmTimeoutError) as exc:
            # The boot ended the run: nothing of the scenario ran.
            if isinstance(exc, VmTimeoutError):
                vm.machine.vmm.finish(VmEnd("timeout", "the boot did not finish"))
            report = vm.machine.vmm.finalize(0.0)
            norm = _Normaliser(vm.machine.program)
            return Golden(header, norm.finish(report.outcome, report.detail, report.shared_ranges))
        norm = _Normaliser(vm.machine.program, vm.machine)
        tracer = vm.machine.tracer
        tracer.set_sink(norm.feed)
        try:
            report = run_report(vm, vcpu, opts.timeout)
        finally:
            tracer.set_sink(None)
    return Golden(header, norm.finish(report.outcome, report.detail, report.shared_ranges))


# ------------------------------------------------------------------------------ files
def write(path: Path, golden: Golden) -> None:
    """Write a golden trace (its directory created), atomically: a temporary file of its own in
    the same directory (so writers of one path in parallel never share one), then renamed over
    `path`; the temporary file is removed if anything fails."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n".join(golden.lines()) + "\n")
            os.fchmod(out.fileno(), 0o666 & ~_umask())  # mkstemp's 0600: as a plain open() would
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise UsageError(f"cannot write golden trace {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read(path: Path) -> Golden:
    """Read a golden trace; UsageError naming the file and line for anything malformed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no golden trace (record it with `testbed golden update` "
                         f"or pytest --testbed-update-golden)") from None
    except OSError as exc:
        raise UsageError(f"cannot read golden trace {path}: {exc.strerror or exc}") from None
    objs: list[dict[str, Any]] = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                             f"{exc.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{path}:{n}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path}:{n}: expected a JSON object")
        objs.append(obj)
    found = objs[0].get("golden") if objs else None
    if isinstance(found, int) and not isinstance(found, bool) and 1 <= found < FORMAT:
        raise UsageError(f"{path}:1: a golden trace of format {found}, which this testbed no longer reads "
                         f"(format {FORMAT}); re-record it with `testbed golden update` or pytest "
                         "--testbed-update-golden")
    if found != FORMAT or isinstance(found, bool):
        raise UsageError(f"{path}:1: not a golden trace of format {FORMAT} (header 'golden': {found!r})")
    for n, obj in enumerate(objs[1:], 2):
        if not isinstance(obj.get("event"), str):
            raise UsageError(f"{path}:{n}: an event without a name ('event')")
    return Golden(objs[0], objs[1:])


# ----------------------------------------------------------------------------- the diff
def _key(event: dict[str, Any]) -> str:
    return _dump({k: v for k, v in event.items() if k not in _NOT_COMPARED})


def _show(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return json.dumps(value)
    return f"{value} (0x{value & ((1 << 64) - 1):x})" if value < 0 else f"0x{value:x}"


def _fields_differ(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    skip = _NOT_COMPARED | {"event"}
    for k in [k for k in old if k not in skip] + [k for k in new if k not in old and k not in skip]:
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            out.append(f"    {k}: expected {_show(a)}, got {_show(b)}")
    return out


def _describe(event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k not in _NOT_COMPARED}
    at = f"   [{event['at']}]" if "at" in event else ""
    return _dump(body) + at


def compare(path: Path, expected: Golden, actual: Golden) -> GoldenDiff:
    """The diff of `actual` against `expected`: the header's VM type, vendor, defines and options
    (a run with others does not match, whatever its events), then event by event (`at` is
    shown, not compared)."""
    old = [_key(e) for e in expected.events]
    new = [_key(e) for e in actual.events]
    header = header_differences(expected.header, actual.header)
    if old == new:
        if not header:
            return GoldenDiff(path, None, "")
        return GoldenDiff(path, None, f"{path}: the run's options differ from the golden trace's "
                                      f"(the {len(old)} events match)\n  recorded with {header}", header)
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    opcodes = matcher.get_opcodes()
    first = next(i1 for tag, i1, _i2, _j1, _j2 in opcodes if tag != "equal")
    j_first = next(j1 for tag, _i1, _i2, j1, _j2 in opcodes if tag != "equal")
    lines = [f"{path}: the run differs from the golden trace ({len(old)} events recorded, {len(new)} now)"]
    if header:
        lines.append("  recorded with " + header)
    exp = expected.events[first] if first < len(expected.events) else None
    got = actual.events[j_first] if j_first < len(actual.events) else None
    where = (got or {}).get("at") or (exp or {}).get("at")
    lines.append(f"first divergence at event {first + 1}" + (f" (guest line {where})" if where else "") + ":")
    lines.append("  expected: " + (_describe(exp) if exp is not None else "<no more events>"))
    lines.append("  got:      " + (_describe(got) if got is not None else "<no more events>"))
    if exp is not None and got is not None and exp.get("event") == got.get("event"):
        lines += _fields_differ(exp, got)
    lines.append("events (' ' same, '-' golden only, '+' this run only):")
    body: list[str] = []
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            span = list(range(i1, i2))
            if i1 == 0 and len(span) > 3:
                body.append("    ...")
                span = span[-3:]
            elif len(span) > 6:
                body += [f"  {i + 1:4}  {_describe(expected.events[i])}" for i in span[:3]] + ["    ..."]
                span = span[-3:]
            body += [f"  {i + 1:4}  {_describe(expected.events[i])}" for i in span]
            continue
        body += [f"- {i + 1:4}  {_describe(expected.events[i])}" for i in range(i1, i2)]
        body += [f"+ {j + 1:4}  {_describe(actual.events[j])}" for j in range(j1, j2)]
    if len(body) > DIFF_LINES:
        body = [*body[:DIFF_LINES], f"    ... {len(body) - DIFF_LINES} more lines"]
    lines += body
    return GoldenDiff(path, first, "\n".join(lines), header)


def header_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What of the header (VM type, vendor, defines, options) the run has otherwise, or ''."""
    notes = []
    for key in _HEADER_KEYS:
        if old.get(key) != new.get(key):
            notes.append(f"{key} {json.dumps(old.get(key))} (this run: {json.dumps(new.get(key))})")
    a, b = old.get("options", {}), new.get("options", {})
    if not isinstance(a, dict) or not isinstance(b, dict):
        if a != b:
            notes.append(f"options {json.dumps(a)} (this run: {json.dumps(b)})")
        return ", ".join(notes)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            was = json.dumps(a[key]) if key in a else "the default"
            now = json.dumps(b[key]) if key in b else "the default"
            notes.append(f"{key} {was} (this run: {now})")
    return ", ".join(notes)


# ----------------------------------------------------------------------- update / check
def update(guest: str | Path, options: VmOptions, golden_dir: str | Path | None = None, *,
           reuse: bool = True) -> tuple[Path, Golden]:
    """Record `guest` and write its golden trace; returns the path and the record."""
    path = golden_path(guest, options, golden_dir)
    golden = record(guest, options, reuse=reuse)
    write(path, golden)
    return path, golden


def check(guest: str | Path, options: VmOptions, golden_dir: str | Path | None = None, *,
          reuse: bool = True) -> GoldenDiff:
    """Run `guest` and compare it with its golden trace (UsageError when there is none)."""
    path = golden_path(guest, options, golden_dir)
    expected = read(path)
    return compare(path, expected, record(guest, options, reuse=reuse))


def missing_message(path: Path) -> str:
    """The message for a golden trace that is not there, naming the goldens of the same guest
    that are (recorded with other defines, options or VM types)."""
    stem = path.name.split(".", 1)[0]
    try:
        others = sorted(p.name for p in path.parent.glob(f"{_glob_escape(stem)}.*.jsonl") if p != path)
    except OSError:
        others = []
    text = f"{path}: no golden trace"
    if others:
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        text += f" for these options (this guest has: {shown})"
    return text


def _glob_escape(text: str) -> str:
    """`text` with glob's special characters matched literally."""
    return re.sub(r"([*?\[])", r"[\1]", text)


# ------------------------------------------------------------------------------- CLI
VM_TYPES = ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx")


def add_golden_subparser(sub: Any) -> None:
    """`testbed golden update|check GUEST.s... [--golden-dir DIR] [run options]`."""
    from testbed.cli import _add_vm_options, add_run_options

    golden = sub.add_parser("golden", help="record or check golden traces of what the host saw")
    golden.add_argument("action", choices=("update", "check"),
                        help="update: record the golden traces; check: exit 1 with a diff unless every run matches")
    golden.add_argument("guests", type=Path, nargs="+", metavar="GUEST.s", help="guest sources")
    golden.add_argument("--golden-dir", type=Path, default=None,
                        help="where the traces live (default: golden/ beside each guest)")
    _add_vm_options(golden, vm_type_help="a VM type (default, sw-protected, sev, sev-es, sev-snp, tdx), a "
                                          "comma-separated list, or all")
    add_run_options(golden)
    golden.set_defaults(func=cmd_golden)


def vm_types_from(text: str) -> list[str]:
    """--vm-type for golden: one type, a comma-separated list, or `all`."""
    from testbed.options import parse_vm_type

    names = list(VM_TYPES) if text.strip() == "all" else [t.strip() for t in text.split(",")]
    if not names or not all(names):
        raise UsageError(f"--vm-type {text!r}: expected a VM type, a comma-separated list or 'all'")
    return [parse_vm_type(n) for n in names]


def cmd_golden(args: Any) -> int:
    """`testbed golden`: 0 when every trace was written / matches, 1 when one differs or is
    missing. Every guest is read and assembled and every (guest, VM type) checked before the
    first run: a usage or assembly error (status 2) writes nothing and is never masked by a
    missing golden."""
    import sys

    from testbed.cli import run_options_from_args
    from testbed.machine import build_program
    from testbed.options import read_source_file

    per_type: list[VmOptions] = []
    for vm_type in vm_types_from(args.vm_type):
        args.vm_type = vm_type
        options = run_options_from_args(args)
        if vm_type == "tdx":
            options.vendor = Vendor.INTEL  # the only vendor a TD has
        options.validate()
        per_type.append(options)
    for guest in args.guests:
        read_source_file(guest)  # a missing or unreadable guest is a usage error (status 2), for check too
    runs = [(guest, options) for guest in args.guests for options in per_type]
    for guest, options in runs:
        build_program(guest, options)  # an assembly error is status 2 (cached: the run reuses it)
    failures = 0
    for guest, options in runs:
        if args.action == "update":
            path, golden = update(guest, options, args.golden_dir, reuse=False)
            end = golden.events[-2] if len(golden.events) >= 2 else {}
            sys.stdout.write(f"wrote {path} ({len(golden.events)} events, outcome {end.get('outcome')})\n")
            continue
        path = golden_path(guest, options, args.golden_dir)
        if not path.exists():
            failures += 1
            sys.stdout.write(missing_message(path) + "; record it with `testbed golden update`\n")
            continue
        diff = check(guest, options, args.golden_dir, reuse=False)
        if diff.equal:
            sys.stdout.write(f"ok {path}\n")
        else:
            failures += 1
            sys.stdout.write(diff.text + "\n")
    return 1 if failures else 0
