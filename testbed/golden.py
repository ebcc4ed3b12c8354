"""Golden traces: a normalised, deterministic record of what the host saw in one run, and a
readable event-by-event diff against a recorded one.

A golden trace is a JSON Lines file, one per scenario (guest, defines) and VM type: a header
line, then one event per line, from `guest_main` to the end of the run (the runtime's boot is
the same for every guest of a configuration and is not recorded, so a golden can be checked on
a machine restored from its boot snapshot, `reuse=True`):

Events (what the host saw):

- `hypercall`: a hypercall KVM handled itself: `nr`, the arguments it reads (`args`), `ret`;
- `ud`, `fix_hypercall`: KVM's #UD intercept (what it decoded) and its rewrite of a foreign
  hypercall instruction (`old`, `new` bytes); `inject`: an exception KVM injected;
- `msr`: an MSR access KVM emulated (`index`, `write`, `value`, `ret`);
- `ghcb`, `ghcb_answer`: an SEV-ES/SNP VMGEXIT through the GHCB (`exit_code`, `info1`,
  `info2`, the `valid` bitmap) and KVM's answer in it; `ghcb_msr` (the GHCB MSR protocol) and
  the other GHCB-protocol events of testbed/kvm/sev.py as traced;
- `tdvmcall`, `tdvmcall_answer`: a TD's TDG.VP.VMCALL (R10, R11 and the argument registers
  the call reads) and KVM's answer (R10, R11);
- `user_exit`: a KVM_RUN exit to userspace with its arguments and, when the default VMM
  answered it, the answer (`ret`, `data`, ...); ucall port I/O is left to `ucall`;
- `ucall` (`cmd`, `args`), `kvm_run_error`, `end` (`outcome`, `detail`), and last
  `shared_ranges`: the VMM's final shared set as merged `[gfn, npages]` ranges.

Normalisation: no times, sequence numbers or host addresses; a hypercall's unused argument
registers (whatever the guest left there) are dropped for the hypercalls whose arity KVM
defines; a guest RIP never enters the comparison: each event carries `at`, the guest source
line (file name:line) that caused it, which is shown in diffs but not compared, so editing
a guest's comments does not break its golden. The memory-encryption key is fixed (seed 1
unless the options give one). A run that ends in a timeout is recorded, but the events before
a timeout depend on the host's speed: record scenarios that end.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.errors import UsageError
from testbed.hw.exits import Vendor
from testbed.kvm.uapi import (
    KVM_HC_CLOCK_PAIRING,
    KVM_HC_KICK_CPU,
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_SCHED_YIELD,
    KVM_HC_SEND_IPI,
    KVM_HC_VAPIC_POLL_IRQ,
)
from testbed.layout import UCALL_PORT

if TYPE_CHECKING:
    from testbed.asm import Program
    from testbed.machine import VmOptions

__all__ = ["FORMAT", "Golden", "GoldenDiff", "check", "compare", "golden_path", "read", "record", "update", "write"]

#: the file format's version (the header's "golden")
FORMAT = 1
#: the memory-encryption seed of a golden run when the options name none
DEFAULT_SEED = 1
#: lines of the event-by-event diff shown (the first divergence is always among them)
DIFF_LINES = 40

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
    """The result of comparing a run with its golden trace; `text` is empty when they match."""

    path: Path
    first: int | None  # index (0-based) of the first divergent event, None if equal
    text: str

    @property
    def equal(self) -> bool:
        """True when every event matches."""
        return self.first is None


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=True)


def _natural_vendor(vm_type: str) -> Vendor:
    return Vendor.INTEL if vm_type == "tdx" else Vendor.AMD


def golden_path(guest: str | Path, options: VmOptions, golden_dir: str | Path | None = None) -> Path:
    """Where the golden trace of `guest` under `options` lives: `DIR/<stem>[.<NAME=VALUE>...]
    .<vm-type>[.<vendor>].jsonl`, DIR defaulting to `golden/` beside the guest; the vendor is
    named only when it is not the VM type's own (amd; intel for tdx)."""
    guest = Path(guest)
    directory = Path(golden_dir) if golden_dir is not None else guest.parent / "golden"
    parts = [guest.stem]
    parts += [f"{k}={v}" for k, v in sorted(options.defines.items())]
    parts.append(options.vm_type)
    if options.vendor is not _natural_vendor(options.vm_type):
        parts.append(options.vendor.value)
    return directory / (".".join(_UNSAFE.sub("_", p) for p in parts) + ".jsonl")


def _header(guest: str | Path, options: VmOptions) -> dict[str, Any]:
    from testbed.machine import VmOptions

    default = VmOptions()
    changed: dict[str, Any] = {}
    for f in dataclasses.fields(VmOptions):
        if f.name in ("vendor", "vm_type", "defines", "trace", "timeout", "record_exits"):
            continue
        value = getattr(options, f.name)
        if value != getattr(default, f.name):
            changed[f.name] = _plain(value)
    return {"golden": FORMAT, "guest": Path(guest).name, "vm_type": options.vm_type,
            "vendor": options.vendor.value, "defines": {k: _plain(v) for k, v in sorted(options.defines.items())},
            "options": changed}


def _plain(value: Any) -> Any:
    if isinstance(value, bool | int | str | float) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "value"):
        return _plain(value.value)
    return str(value)


def golden_options(options: VmOptions) -> VmOptions:
    """The options of a golden run: the seed fixed (DEFAULT_SEED unless given), no trace stream."""
    seed = options.seed if options.seed is not None else DEFAULT_SEED
    return dataclasses.replace(options, seed=seed, trace=None, defines=dict(options.defines))


# ----------------------------------------------------------------------------- recording
class _Normaliser:
    """Turns the tracer's events (testbed/trace.py) into golden events, in order."""

    def __init__(self, program: Program) -> None:
        from testbed.machine import LIB_DIR

        self.program = program
        lib = LIB_DIR.resolve()
        files = {loc.file for _a, loc in program.lines}
        self._runtime_files = {f for f in files if Path(f).resolve().is_relative_to(lib)}
        self.events: list[dict[str, Any]] = []
        self._origin: int | None = None   # RIP of the guest instruction behind the exit being handled
        self._forwarded: int | None = None  # RIP a #VC/#VE handler is about to forward to the host
        self._pending_exit: dict[str, Any] | None = None  # a kvm user_exit, until the VMM answers it

    def _at(self, rip: int | None) -> str | None:
        if rip is None:
            return None
        where = self.program.location(rip)
        if where is None or where.file in self._runtime_files:
            return None  # only the guest's own lines: the runtime's ucall or #VC code says nothing
        return f"{Path(where.file).name}:{where.line}"

    def _add(self, event: str, fields: dict[str, Any], rip: int | None = None) -> None:
        entry: dict[str, Any] = {"event": event}
        entry.update({k: _plain(v) if not isinstance(v, bytes | bytearray) else v.hex() for k, v in fields.items()})
        at = self._at(rip if rip is not None else self._origin)
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
            if event == "vmexit":
                self._flush_exit()
                # The exit's guest instruction: the one a #VC/#VE handler is forwarding, if the
                # exit is the handler's first since that exception, else the exiting one.
                self._origin = self._forwarded if self._forwarded is not None else rec.get("rip")
                self._forwarded = None
            elif event == "vc" or (event == "deliver" and rec.get("vector") == 20):
                self._forwarded = rec.get("rip")
            elif event == "inject":
                self._add("inject", fields)
            return
        if layer == "kvm":
            if event == "handle_exit":
                return
            if event == "user_exit":
                self._flush_exit()
                if _is_ucall(fields):
                    return
                self._pending_exit = fields
                return
            if event == "hypercall":
                if fields.get("user_exit"):
                    return  # the user exit records it, with the VMM's answer
                nr = fields.get("nr", -1)
                args = list(fields.get("args", []))[: _HYPERCALL_ARITY.get(nr, 4)]
                self._add("hypercall", {"nr": nr, "args": args, "ret": fields.get("ret")})
            elif event == "emulate_ud":
                self._add("ud", {"decode": fields.get("decode")}, rec.get("rip"))
            elif event == "fix_hypercall":
                self._add("fix_hypercall", {"old": fields.get("old"), "new": fields.get("new")}, rec.get("rip"))
            elif event == "msr":
                self._add("msr", fields)
            elif event == "vmgexit":
                self._add("ghcb", {"exit_code": fields.get("exit_code"), "info1": fields.get("info1"),
                                   "info2": fields.get("info2"), "valid": f"{fields.get('valid_bitmap', 0):x}"})
            elif event == "vmgexit_done":
                self._flush_exit()
                self._add("ghcb_answer", {"info1": fields.get("info1"), "info2": fields.get("info2")})
            elif event == "vmgexit_msr":
                self._add("ghcb_msr", {"value": f"{fields.get('ghcb_msr', 0):x}"})
            elif event == "tdvmcall":
                self._add("tdvmcall", _tdvmcall_fields(fields))
            elif event == "tdvmcall_done":
                self._flush_exit()
                self._add("tdvmcall_answer", fields)
            elif event == "inject_pf":
                self._add("inject", {"vector": 14, "error_code": fields.get("error_code"), "cr2": fields.get("gva")})
            elif event == "kvm_run_error":
                self._flush_exit()
                self._add("kvm_run_error", fields)
            elif event in _SEV_EVENTS:
                fields.pop("gpa", None)
                self._add(event, fields)
            return
        if layer == "vmm" and event == "exit":
            if _is_ucall(fields):
                return
            self._pending_exit = None
            self._add("user_exit", fields)
        elif layer == "guest" and event == "ucall":
            self._flush_exit()
            args = fields.get("args", [])
            self._add("ucall", {"cmd": fields.get("cmd"), "args": args})

    def finish(self, outcome: str, detail: str, shared: Iterable[Sequence[int]]) -> list[dict[str, Any]]:
        """The run ended: its outcome and the final shared ranges close the record."""
        self._flush_exit()
        self._origin = None
        # A detail names source files by path (file:line); where the checkout lives is not part of
        # what the host saw, so a path is recorded by its file name alone.
        self._add("end", {"outcome": outcome, "detail": _ABS_SOURCE.sub(r"\1", detail)})
        self._add("shared_ranges", {"ranges": [[int(g), int(n)] for g, n in shared]})
        return self.events


_ABS_SOURCE = re.compile(r"(?<![\w.])/(?:[^\s:/]+/)+([^\s:/]+\.s)\b")

#: GHCI leaf (R11) -> how many of R12..R14 it reads (tdx.c handle_tdvmcall and the instruction leaves)
_TDVMCALL_ARITY = {10: 1, 12: 0, 30: 3, 31: 1, 32: 2, 48: 3, 0x10000: 1, 0x10001: 2, 0x10002: 2, 0x10003: 1, 0x10004: 1}


def _tdvmcall_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A TDVMCALL's registers without those the call does not read (the guest's leftovers)."""
    regs = [fields.get(r, 0) for r in ("r10", "r11", "r12", "r13", "r14")]
    if regs[0] != 0:  # a KVM hypercall: nr = R10, a0..a3 = R11..R14
        return {"r10": regs[0], "args": regs[1:1 + _HYPERCALL_ARITY.get(regs[0], 4)]}
    return {"r10": 0, "r11": regs[1], "args": regs[2:2 + _TDVMCALL_ARITY.get(regs[1], 3)]}


def _is_ucall(fields: dict[str, Any]) -> bool:
    return fields.get("reason") == "io" and fields.get("port") == UCALL_PORT and fields.get("direction") == "out"


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
        norm = _Normaliser(vm.machine.program)
        tracer = vm.machine.tracer
        tracer.set_sink(norm.feed)
        try:
            report = run_report(vm, vcpu, opts.timeout)
        finally:
            tracer.set_sink(None)
    return Golden(header, norm.finish(report.outcome, report.detail, report.shared_ranges))


# ------------------------------------------------------------------------------ files
def write(path: Path, golden: Golden) -> None:
    """Write a golden trace (its directory created), atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(golden.lines()) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise UsageError(f"cannot write golden trace {path}: {exc.strerror or exc}") from None


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
    if not objs or objs[0].get("golden") != FORMAT:
        found = objs[0].get("golden") if objs else None
        raise UsageError(f"{path}:1: not a golden trace of format {FORMAT} (header 'golden': {found!r})")
    for n, obj in enumerate(objs[1:], 2):
        if not isinstance(obj.get("event"), str):
            raise UsageError(f"{path}:{n}: an event without a name ('event')")
    return Golden(objs[0], objs[1:])


# ----------------------------------------------------------------------------- the diff
def _key(event: dict[str, Any]) -> str:
    return _dump({k: v for k, v in event.items() if k != "at"})


def _show(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int):
        return json.dumps(value)
    return f"{value} (0x{value & ((1 << 64) - 1):x})" if value < 0 else f"0x{value:x}"


def _fields_differ(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for k in [k for k in old if k not in ("event", "at")] + [k for k in new if k not in old and k != "at"]:
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a != b:
            out.append(f"    {k}: expected {_show(a)}, got {_show(b)}")
    return out


def _describe(event: dict[str, Any]) -> str:
    body = {k: v for k, v in event.items() if k != "at"}
    at = f"   [{event['at']}]" if "at" in event else ""
    return _dump(body) + at


def compare(path: Path, expected: Golden, actual: Golden) -> GoldenDiff:
    """The event-by-event diff of `actual` against `expected` (the `at` lines are not compared)."""
    old = [_key(e) for e in expected.events]
    new = [_key(e) for e in actual.events]
    if old == new:
        return GoldenDiff(path, None, "")
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    opcodes = matcher.get_opcodes()
    first = next(i1 for tag, i1, _i2, _j1, _j2 in opcodes if tag != "equal")
    j_first = next(j1 for tag, _i1, _i2, j1, _j2 in opcodes if tag != "equal")
    lines = [f"{path}: the run differs from the golden trace ({len(old)} events recorded, {len(new)} now)"]
    notes = _header_notes(expected.header, actual.header)
    if notes:
        lines.append("  recorded with " + notes)
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
    return GoldenDiff(path, first, "\n".join(lines))


def _header_notes(old: dict[str, Any], new: dict[str, Any]) -> str:
    notes = []
    for key in ("guest", "vm_type", "vendor", "defines"):
        if old.get(key) != new.get(key):
            notes.append(f"{key} {json.dumps(old.get(key))} (this run: {json.dumps(new.get(key))})")
    a, b = old.get("options", {}), new.get("options", {})
    if isinstance(a, dict) and isinstance(b, dict):
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
    """`testbed golden`: 0 when every trace was written / matches, 1 when one differs or is missing."""
    import sys

    from testbed.cli import run_options_from_args
    from testbed.options import read_source_file

    vm_types = vm_types_from(args.vm_type)
    failures = 0
    for guest in args.guests:
        read_source_file(guest)  # a missing or unreadable guest is a usage error (status 2), for check too
        for vm_type in vm_types:
            args.vm_type = vm_type
            options = run_options_from_args(args)
            if vm_type == "tdx":
                options.vendor = Vendor.INTEL  # the only vendor a TD has
            options.validate()
            if args.action == "update":
                path, golden = update(guest, options, args.golden_dir, reuse=False)
                end = golden.events[-2] if len(golden.events) >= 2 else {}
                sys.stdout.write(f"wrote {path} ({len(golden.events)} events, outcome {end.get('outcome')})\n")
                continue
            path = golden_path(guest, options, args.golden_dir)
            if not path.exists():
                failures += 1
                sys.stdout.write(f"{path}: no golden trace (record it with `testbed golden update`)\n")
                continue
            diff = check(guest, options, args.golden_dir, reuse=False)
            if diff.equal:
                sys.stdout.write(f"ok {path}\n")
            else:
                failures += 1
                sys.stdout.write(diff.text + "\n")
    return 1 if failures else 0
