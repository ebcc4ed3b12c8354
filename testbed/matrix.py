"""The conformance matrix: each guest under every applicable VM type x vendor, compared.

What the host saw is normalised so that equal intent compares equal (`observe`):
- the conversion stream: the guest's KVM_HC_MAP_GPA_RANGE exits (whatever carried them: a
  hypercall, an SEV-ES GHCB call, an SNP Page State Change, a TDX MapGPA) and its implicit
  conversions (KVM_EXIT_MEMORY_FAULT), in order, as (direction, gfn, npages) with contiguous
  same-direction, same-kind requests merged into one range;
- the final shared set, less what the runtime shared while booting (the ucall page and the
  GHCB exist only on the encrypted VM types);
- the ucalls (command, arguments, the file name and line of an assert) and the outcome (with
  the exception vector and error code);
- how the run ended beyond its outcome (`end`, see `end_record`): the system event (an SEV
  termination's GHCB MSR value or reason, a TD's fatal error), the memory fault, the internal
  error, KVM_RUN's errno, a bad ucall's reason, where an unhandled exception was raised.
Only what the guest did after the boot (after guest_main is reached) is in the stream.

Each cell is compared with the reference column (the first combination, default/amd unless
`--reference`); the first difference is named. Differences that are real are shown as such,
never normalised away silently:
- a cell whose conversions reached the host as a different number of exits than the
  reference's (SNP splitting a Page State Change into several exits, TDX chunking MapGPA at
  2 MiB) is equal after merging but carries a note with both counts;
- a VM type without memory attributes (`default`, `sev-es`: KVM keeps none for them) has no
  implicit conversions: a cell that differs from the reference only by those is a
  *known* difference, named, and not an unexpected divergence.
Every other difference is a divergence: `testbed matrix` exits 1 when there is one, or when
a cell does not end with the outcome `--expect` names. A cell that could not run (its options
do not fit its VM type or the host) has no observation: it is never equal to anything, its
error is shown, and `testbed matrix` exits 2, as `testbed run` does for those options.

The runs go through `testbed.runner` (a local process pool, or Dask with `--scheduler`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from testbed.control_plane import ControlPlaneError
from testbed.errors import TestbedError, UsageError
from testbed.runner import Executor, Result, Task, make_executor, run_task

if TYPE_CHECKING:
    from testbed.machine import VmOptions
    from testbed.vmm.vmm import RunReport, VmEnd

#: every VM type x vendor the model can run, in column order (the first is the reference)
COMBINATIONS: tuple[tuple[str, str], ...] = (
    ("default", "amd"), ("default", "intel"), ("sw-protected", "amd"), ("sw-protected", "intel"),
    ("sev", "amd"), ("sev-es", "amd"), ("sev-snp", "amd"), ("tdx", "intel"),
)
#: VM types for which KVM keeps no memory attributes, so no KVM_EXIT_MEMORY_FAULT conversion
#: exists (KVM_X86_DEFAULT_VM and SEV-ES; the testbed's `sev` keeps them, see README)
NO_ATTRIBUTES = ("default", "sev-es")
#: the fixed key seed every cell runs with (a task is deterministic)
MATRIX_SEED = 1
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
PAGE_SHIFT = 12


# ---------------------------------------------------------------------------- one cell
def observe(task: Task) -> Result:
    """Run one task (`{"guest", "source", "options"}`) and return its normalised observation."""
    from testbed.machine import VmOptions

    opts = task["options"]
    try:
        options = VmOptions(**opts)
        options.validate()
    except TestbedError as exc:
        return {"error": str(exc)}
    try:
        return _observe(task, options)
    except MemoryError as exc:  # the host could not back the guest (`testbed run` exits 2 for it too)
        return {"error": f"out of host memory: {str(exc) or 'an allocation failed'}"}


def _observe(task: Task, options: VmOptions) -> Result:
    from testbed.api import Vm, VmExitError, VmTimeoutError, _final, run_report
    from testbed.vmm.vmm import VmEnd

    opts = task["options"]
    start = time.perf_counter()
    with Vm(options) as vm:
        boot_exits, boot_shared = 0, []
        try:
            vcpu = vm.load(task["guest"], text=task["source"])
        except ControlPlaneError as exc:
            # The control plane refuses the image before launch (a legacy image on a UPM type):
            # a real difference from the reference column, shown as the outcome `refused`.
            return {"guest": task["guest"], "vm_type": opts["vm_type"], "vendor": opts["vendor"],
                    "outcome": "refused", "detail": str(exc), "exception": None, "end": {}, "ucalls": [],
                    "conversions": [], "conversion_exits": 0, "truncated": False, "shared_ranges": [],
                    "guest_shared": [], "runtime_unshared": []}
        except VmTimeoutError:
            vm.machine.vmm.finish(VmEnd("timeout", f"guest did not finish within {options.timeout:g} s"))
            report = _final(vm, start)
        except VmExitError:
            report = _final(vm, start)
        else:
            boot_exits = len(vm.machine.vmm.report.user_exits)
            boot_shared = vm.shared_ranges()
            report = run_report(vm, vcpu, options.timeout, start, options.timeout)
        end = end_record(report, vm.machine.vmm.ended)
    exits = report.user_exits[boot_exits:]
    raw = [c for c in (_conversion(e) for e in exits) if c is not None]
    exception = report.exception
    return {
        "guest": task["guest"], "vm_type": opts["vm_type"], "vendor": opts["vendor"],
        "outcome": report.outcome,
        "detail": report.detail,
        "exception": None if exception is None else {"vector": exception["vector"],
                                                      "error_code": exception.get("error_code"),
                                                      "exit_reason": exception.get("exit_reason")},
        "end": end,
        "ucalls": [ucall_identity(u) for u in report.ucalls],
        "conversions": merge(raw),
        "conversion_exits": sum(c[1] == "hypercall" for c in raw),
        "truncated": bool(report.user_exits_dropped or report.ucalls_dropped),
        "shared_ranges": [list(r) for r in report.shared_ranges],
        "guest_shared": _ranges(_pages(report.shared_ranges) - _pages(boot_shared)),
        "runtime_unshared": _ranges(_pages(boot_shared) - _pages(report.shared_ranges)),
    }


def _conversion(e: dict[str, Any]) -> list[Any] | None:
    """A user exit as [direction, kind, gfn, npages], or None if it converts nothing."""
    if e.get("reason") == "hypercall" and e.get("nr") == KVM_HC_MAP_GPA_RANGE:
        gpa, npages, attrs = e["args"][:3]
        to = "private" if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED else "shared"
        return [to, "hypercall", gpa >> PAGE_SHIFT, npages]
    if e.get("reason") == "memory_fault":
        to = "private" if e["flags"] & KVM_MEMORY_EXIT_FLAG_PRIVATE else "shared"
        return [to, "memory_fault", e["gpa"] >> PAGE_SHIFT, max(1, e["size"] >> PAGE_SHIFT)]
    return None


def merge(stream: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Merge each request into the previous one when it continues it: same direction and
    kind, and its first GFN is the previous range's end."""
    out: list[list[Any]] = []
    for to, kind, gfn, n in stream:
        if out and out[-1][0] == to and out[-1][1] == kind and out[-1][2] + out[-1][3] == gfn:
            out[-1][3] += n
        else:
            out.append([to, kind, gfn, n])
    return out


def ucall_identity(u: dict[str, Any]) -> dict[str, Any]:
    """A ucall's identity: command, arguments and, for an assert, where it failed (file name and
    line, and the caller's when it failed in a helper). The file's name only: its directory is
    the checkout's, which differs between the machines of a cluster."""
    keep: dict[str, Any] = {"cmd": u["cmd"], "args": list(u.get("args", []))}
    if "line" in u:
        keep["line"] = u["line"]
        if u.get("file"):
            keep["file"] = Path(u["file"]).name
    caller = u.get("caller")
    if caller:
        keep["caller"] = f"{Path(caller['file']).name}:{caller['line']}"
    return keep


def end_record(report: RunReport, end: VmEnd | None) -> dict[str, Any]:
    """How the run ended, beyond its outcome, as a KVM developer compares it across VM types:
    the system event (its type; an SEV termination's GHCB MSR value, or the reason set and code
    of a GHCB-page request; a TD's fatal-error code, message and GPA), the memory fault (GPA,
    flags, size), the internal error (suberror and data), KVM_RUN's errno, a bad ucall's reason,
    where an unhandled exception was raised (source file name and line; CR2 for a #PF).
    Left out, as representation rather than behaviour: the GHCB's own GPA, a TD's other GPRs,
    the RIP (the runtimes differ), and what a timeout waited on (a TD's HLT blocks in KVM where
    another VM's exits to userspace)."""
    from testbed.kvm.uapi import (
        KVM_SYSTEM_EVENT_SEV_TERM,
        KVM_SYSTEM_EVENT_TDX_FATAL,
        InternalErrorExit,
        MemoryFaultExit,
        SystemEventExit,
    )
    from testbed.vmm.vmm import GHCB_MSR_TERM_REQ

    rec: dict[str, Any] = {}
    exit = None if end is None else end.exit
    if isinstance(exit, SystemEventExit):
        rec["system_event"] = exit.type
        if exit.type == KVM_SYSTEM_EVENT_SEV_TERM and exit.data and report.termination is not None:
            term = {"reason_set": report.termination["reason_set"], "reason_code": report.termination["reason_code"]}
            if exit.data[0] & 0xFFF == GHCB_MSR_TERM_REQ:
                rec["termination"] = {"via": "msr", "msr": exit.data[0], **term}
            else:  # data[0] is the GHCB's GPA: where the runtime put it, not what the guest asked
                rec["termination"] = {"via": "ghcb", **term}
        elif exit.type == KVM_SYSTEM_EVENT_TDX_FATAL and "tdx_fatal" in report.extra:
            rec["tdx_fatal"] = dict(report.extra["tdx_fatal"])
        else:
            rec["data"] = list(exit.data)
    elif isinstance(exit, MemoryFaultExit):
        rec["memory_fault"] = {"gpa": exit.gpa, "flags": exit.flags, "size": exit.size}
    elif isinstance(exit, InternalErrorExit):
        rec["internal"] = {"suberror": exit.suberror, "data": list(exit.data)}
    if report.errno is not None:
        rec["errno"] = report.errno
    bad = report.extra.get("bad_ucall")
    if bad is not None:
        rec["bad_ucall"] = bad["reason"]
    exc = report.exception
    if report.outcome == "unhandled_exception" and exc is not None:
        if exc.get("line"):
            rec["at"] = f"{Path(exc['file']).name}:{exc['line']}"
        if "cr2" in exc:
            rec["cr2"] = exc["cr2"]
    return rec


def _pages(ranges: Sequence[Sequence[int]]) -> set[int]:
    return {g for gfn, n in ranges for g in range(gfn, gfn + n)}


def _ranges(pages: set[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for g in sorted(pages):
        if out and out[-1][0] + out[-1][1] == g:
            out[-1][1] += 1
        else:
            out.append([g, 1])
    return out


# ---------------------------------------------------------------------------- comparing
@dataclass
class Cell:
    """One guest under one VM type x vendor, compared with the reference."""

    vm_type: str
    vendor: str
    observation: Result
    equal: bool = True
    difference: str | None = None
    #: a real difference the model explains (e.g. SEV-ES has no memory attributes); not a divergence
    known: str | None = None
    notes: list[str] = field(default_factory=list)
    #: `--expect OUTCOME`: the outcome every cell must end with (None: not asked)
    expect: str | None = None
    #: False when the cell or its reference could not run: nothing was compared (and it is not equal)
    compared: bool = True

    @property
    def error(self) -> str | None:
        """Why the cell could not run (its options do not fit this VM type or the host), or None."""
        error = self.observation.get("error")
        return None if error is None else str(error)

    @property
    def outcome(self) -> str:
        """The cell's outcome; `error` for a cell that could not run."""
        return "error" if self.error is not None else str(self.observation["outcome"])

    @property
    def divergent(self) -> bool:
        """An unexpected divergence: both sides ran, they differ, and not by a known real difference."""
        return self.compared and not self.equal and self.known is None

    @property
    def unexpected(self) -> bool:
        """`--expect` was given and the cell did not end with that outcome (an error included)."""
        return self.expect is not None and self.outcome != self.expect

    def to_json(self) -> dict[str, Any]:
        """The cell as `--json` gives it."""
        o = self.observation
        return {"vm_type": self.vm_type, "vendor": self.vendor, "outcome": self.outcome, "error": self.error,
                "detail": o.get("detail"), "exception": o.get("exception"), "end": o.get("end"),
                "expected": None if self.expect is None else not self.unexpected,
                "shared_ranges": o.get("shared_ranges", []), "equal": self.equal, "difference": self.difference,
                "known": self.known, "notes": self.notes, "conversions": o.get("conversions", []),
                "conversion_exits": o.get("conversion_exits", 0)}


def _fmt_conv(c: Sequence[Any] | None) -> str:
    if c is None:
        return "nothing"
    to, kind, gfn, n = c
    via = "" if kind == "hypercall" else " (memory fault)"
    return f"to {to} gfn 0x{gfn:x}+{n}{via}"


def _fmt_outcome(o: Result) -> str:
    text = str(o["outcome"])
    if o.get("exception"):
        e = o["exception"]
        text += f" (vector {e['vector']}"
        if e.get("error_code") is not None:
            text += f", error 0x{e['error_code']:x}"
        if e.get("exit_reason") is not None:
            text += f", exit reason {e['exit_reason']}"
        text += ")"
    return text


def end_key(o: Result, other: Result) -> dict[str, Any]:
    """`o`'s end record as it is compared with `other`'s: an internal error's data is laid out
    by the vendor (SVM exit codes and EXITINFO vs VMX exit reasons and qualifications), so it
    is compared only between cells of one vendor; a KVM_INTERNAL_ERROR_DELIVERY_EV compares
    its GPA only (its other words carry the NPF error code or the VMX vectoring information)."""
    end = dict(o.get("end") or {})
    internal = end.get("internal")
    if internal is not None:
        data = list(internal.get("data", []))
        key: dict[str, Any] = {"suberror": internal["suberror"]}
        if internal["suberror"] == KVM_INTERNAL_ERROR_DELIVERY_EV:
            key["gpa"] = data[3] if len(data) > 3 else None
        elif o.get("vendor") == other.get("vendor"):
            key["data"] = data
        end["internal"] = key
    return end


def _fmt_end(end: dict[str, Any]) -> str:
    parts: list[str] = []
    term = end.get("termination")
    if term is not None:
        why = f"reason set {term['reason_set']}, code {term['reason_code']}"
        parts.append(f"GHCB MSR 0x{term['msr']:x} ({why})" if term["via"] == "msr"
                     else f"GHCB termination request ({why})")
    fatal = end.get("tdx_fatal")
    if fatal is not None:
        gpa = "" if fatal.get("gpa") is None else f", gpa 0x{fatal['gpa']:x}"
        parts.append(f"TD fatal error 0x{fatal['error_code']:x} {fatal['message']!r}{gpa}")
    if "data" in end:
        parts.append(f"system event {end['system_event']} data [{', '.join(f'0x{d:x}' for d in end['data'])}]")
    elif "system_event" in end and term is None and fatal is None:
        parts.append(f"system event {end['system_event']}")
    fault = end.get("memory_fault")
    if fault is not None:
        parts.append(f"memory fault gpa 0x{fault['gpa']:x} flags 0x{fault['flags']:x} size 0x{fault['size']:x}")
    internal = end.get("internal")
    if internal is not None:
        text = f"internal error suberror {internal['suberror']}"
        if internal.get("gpa") is not None:
            text += f" gpa 0x{internal['gpa']:x}"
        if internal.get("data"):
            text += f" data [{', '.join(f'0x{d:x}' for d in internal['data'])}]"
        parts.append(text)
    if "errno" in end:
        parts.append(f"errno {end['errno']}")
    if "bad_ucall" in end:
        parts.append(f"bad ucall: {end['bad_ucall']}")
    if "at" in end:
        parts.append(f"at {end['at']}")
    if "cr2" in end:
        parts.append(f"cr2 0x{end['cr2']:x}")
    return ", ".join(parts) or "nothing more"


def first_difference(o: Result, ref: Result, *, kinds: tuple[str, ...] = ("hypercall", "memory_fault")) -> str | None:
    """The first way `o` differs from `ref` (outcome, how the run ended, ucalls, conversions,
    shared set), or None."""
    if (o["outcome"], o["exception"]) != (ref["outcome"], ref["exception"]):
        return f"outcome {_fmt_outcome(o)} vs {_fmt_outcome(ref)}"
    mine_end, their_end = end_key(o, ref), end_key(ref, o)
    if mine_end != their_end:
        return f"end: {_fmt_end(mine_end)} vs {_fmt_end(their_end)}"
    for i in range(max(len(o["ucalls"]), len(ref["ucalls"]))):
        a = o["ucalls"][i] if i < len(o["ucalls"]) else None
        b = ref["ucalls"][i] if i < len(ref["ucalls"]) else None
        if a != b:
            return f"ucall {i}: {_fmt_ucall(a)} vs {_fmt_ucall(b)}"
    mine = [c for c in o["conversions"] if c[1] in kinds]
    theirs = [c for c in ref["conversions"] if c[1] in kinds]
    for i in range(max(len(mine), len(theirs))):
        a = mine[i] if i < len(mine) else None
        b = theirs[i] if i < len(theirs) else None
        if a != b:
            return f"conversion {i}: {_fmt_conv(a)} vs {_fmt_conv(b)}"
    if len(kinds) == 2 and o["guest_shared"] != ref["guest_shared"]:
        return f"final shared set {_fmt_ranges(o['guest_shared'])} vs {_fmt_ranges(ref['guest_shared'])}"
    return None


def _fmt_ucall(u: dict[str, Any] | None) -> str:
    if u is None:
        return "none"
    text = f"{u['cmd']}(" + ", ".join(f"0x{a:x}" for a in u["args"]) + ")"
    if "line" in u:
        text += f" at {u['file']}:{u['line']}" if u.get("file") else f" at line {u['line']}"
    return text + (f" called from {u['caller']}" if u.get("caller") else "")


def _fmt_ranges(ranges: Sequence[Sequence[int]]) -> str:
    return "{" + ", ".join(f"0x{g:x}+{n}" for g, n in ranges) + "}" if ranges else "{}"


def compare(cell: Cell, ref: Cell) -> None:
    """Fill in `cell`'s equal / difference / known / notes against the reference cell."""
    o, r = cell.observation, ref.observation
    if cell.error is not None:  # never equal to anything, not even another error
        cell.equal, cell.compared, cell.difference = False, False, f"could not run: {cell.error}"
        return
    if ref.error is not None:
        cell.equal, cell.compared, cell.difference = False, False, "not compared: the reference could not run"
        return
    if o["truncated"] or r["truncated"]:
        cell.notes.append("exits or ucalls left out of the report (a looping guest): compared as far as recorded")
    diff = first_difference(o, r)
    if diff is not None:
        cell.equal, cell.difference = False, diff
        no_attrs = {cell.vm_type, ref.vm_type} & set(NO_ATTRIBUTES)
        faults = [c for c in o["conversions"] + r["conversions"] if c[1] == "memory_fault"]
        if no_attrs and faults and first_difference(o, r, kinds=("hypercall",)) is None:
            which = cell.vm_type if cell.vm_type in NO_ATTRIBUTES else ref.vm_type
            cell.known = (f"{which} has no memory attributes: no implicit conversion (KVM_EXIT_MEMORY_FAULT); "
                          f"{len(faults)} in the stream of the other")
    if cell is ref:
        return
    n, m = o["conversion_exits"], r["conversion_exits"]
    if n != m and first_difference(o, r, kinds=("hypercall",)) is None:
        why = {"sev-snp": "SNP splits a Page State Change into several exits",
               "tdx": "TDX chunks MapGPA at 2 MiB"}.get(cell.vm_type, "")
        if not why:
            why = {"sev-snp": "the reference (SNP) split its Page State Changes",
                   "tdx": "the reference (TDX) chunked MapGPA at 2 MiB"}.get(ref.vm_type, "a different exit count")
        ranges = sum(c[1] == "hypercall" for c in o["conversions"])
        cell.notes.append(f"{why}: {n} conversion exits vs {m}, the same {ranges} merged ranges")


@dataclass
class GuestRow:
    """One guest's cells, reference first."""

    guest: str
    cells: list[Cell]

    def to_json(self) -> dict[str, Any]:
        """The row as `--json` gives it."""
        return {"guest": self.guest, "reference": f"{self.cells[0].vm_type}/{self.cells[0].vendor}",
                "cells": [c.to_json() for c in self.cells]}


# ---------------------------------------------------------------------------- the matrix
def cell_outcomes() -> tuple[str, ...]:
    """Every outcome a cell can have but `error` (which `--expect` cannot ask for)."""
    from testbed.vmm.vmm import OUTCOMES

    return (*OUTCOMES, "refused")


def check_expect(expect: str | None) -> str | None:
    """`expect` if it is an outcome a cell can end with (or None); else a UsageError."""
    if expect is None or expect in cell_outcomes():
        return expect
    raise UsageError(f"--expect {expect!r}: not an outcome; expected one of {', '.join(cell_outcomes())}")


def combinations(vm_types: Sequence[str] | None = None, vendors: Sequence[str] | None = None,
                 reference: str | None = None) -> list[tuple[str, str]]:
    """The combinations to run, in column order, `reference` ("vm_type" or "vm_type/vendor") first."""
    from testbed.options import VM_TYPES, parse_vendor, parse_vm_type

    types = [parse_vm_type(t) for t in vm_types] if vm_types else list(VM_TYPES)
    vends = [parse_vendor(v).value for v in vendors] if vendors else ["amd", "intel"]
    combos = [c for c in COMBINATIONS if c[0] in types and c[1] in vends]
    if not combos:
        raise UsageError(f"no VM type x vendor the model runs in --vm-types {','.join(types)} "
                         f"--vendors {','.join(vends)} (sev, sev-es, sev-snp are AMD only; tdx is Intel only)")
    if reference is not None:
        vt, _, vendor = reference.partition("/")
        vt = parse_vm_type(vt)
        match = [c for c in combos if c[0] == vt and (not vendor or c[1] == parse_vendor(vendor).value)]
        if not match:
            raise UsageError(f"--reference {reference}: not one of the combinations run "
                             f"({', '.join(f'{t}/{v}' for t, v in combos)})")
        combos.remove(match[0])
        combos.insert(0, match[0])
    return combos


def make_tasks(guests: Sequence[str | Path], combos: Sequence[tuple[str, str]],
               options: dict[str, Any] | None = None) -> list[Task]:
    """One task per guest x combination. Each guest is read and assembled here first, so a
    bad guest is a UsageError before anything runs, and workers find it in the assembly cache."""
    from testbed.machine import VmOptions, build_program
    from testbed.options import read_source_file

    base = {"memory": 64 << 20, "timeout": 10.0, "seed": MATRIX_SEED, **(options or {})}
    tasks: list[Task] = []
    for guest in guests:
        name = str(guest)
        source = read_source_file(guest)
        build_program(name, VmOptions(**base), text=source)
        tasks.extend({"guest": name, "source": source, "options": {**base, "vm_type": vt, "vendor": vendor}}
                     for vt, vendor in combos)
    return tasks


def run_matrix(guests: Sequence[str | Path], *, combos: Sequence[tuple[str, str]] | None = None,
               options: dict[str, Any] | None = None, executor: Executor | None = None,
               expect: str | None = None) -> list[GuestRow]:
    """Run every guest under every combination on `executor` (default: a local pool) and compare;
    `expect`: the outcome every cell must end with (a cell that does not is `unexpected`)."""
    expect = check_expect(expect)
    combos = list(combos or combinations())
    tasks = make_tasks(guests, combos, options)
    own = executor is None
    ex = make_executor() if executor is None else executor
    try:
        results = ex.map(run_task, tasks)
    finally:
        if own:
            ex.close()
    rows: list[GuestRow] = []
    for i, guest in enumerate(guests):
        chunk = results[i * len(combos):(i + 1) * len(combos)]
        cells = [Cell(vt, vendor, obs, expect=expect) for (vt, vendor), obs in zip(combos, chunk, strict=True)]
        for cell in cells:
            compare(cell, cells[0])
        rows.append(GuestRow(str(guest), cells))
    return rows


def print_table(rows: Sequence[GuestRow], out: IO[str], caption: str | None = None) -> None:
    """The matrix as a rich table: a row per cell, grouped by guest, the reference first."""
    from testbed.textout import plain_console, plain_table, styled

    table = plain_table("conformance matrix", "guest", "vm type", "outcome", "conversions",
                        "compared with the guest's first row", caption=caption)
    for row in rows:
        for i, cell in enumerate(row.cells):
            o = cell.observation
            text = "error" if cell.error is not None else _fmt_outcome(o)
            conv = "" if cell.error is not None else f"{len(o['conversions'])} ranges / {o['conversion_exits']} exits"
            if cell.unexpected:
                text += f" ✗ expected {cell.expect}"
            outcome = styled(text, "red") if cell.unexpected or cell.error is not None else text
            if cell.error is not None:
                verdict = styled(f"✗ {cell.difference}", "red")
            elif i == 0:
                verdict = styled("reference", "bold")
            elif not cell.compared:
                verdict = styled(f"? {cell.difference}", "red")
            elif cell.equal:
                verdict = styled("; ".join(["= same", *cell.notes]), "yellow" if cell.notes else "green")
            elif cell.known:
                verdict = styled(f"≠ known: {cell.known}; {cell.difference}", "yellow")
            else:
                verdict = styled(f"≠ {cell.difference}", "red")
            table.add_row(row.guest if i == 0 else "", f"{cell.vm_type}/{cell.vendor}", outcome, conv, verdict)
        table.add_section()
    plain_console(out).print(table)


# ---------------------------------------------------------------------------- the CLI
def add_matrix_subparser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `testbed matrix`."""
    p = sub.add_parser("matrix", help="run guests under every VM type x vendor and compare what the host saw")
    p.add_argument("guests", nargs="+", type=Path, metavar="GUEST.s")
    p.add_argument("--vm-types", default=None, help="comma-separated VM types (default: all)")
    p.add_argument("--vendors", default=None, help="comma-separated vendors (default: amd,intel)")
    p.add_argument("--reference", default=None, metavar="VM_TYPE[/VENDOR]",
                   help="the column the others are compared with (default: the first)")
    p.add_argument("--memory", default="64M", help="guest memory (default 64M)")
    p.add_argument("--timeout", default="10", help="seconds per cell (default 10)")
    p.add_argument("--define", "-D", action="append", default=[], metavar="NAME=VALUE", help="assembler define")
    p.add_argument("--kvm-version", default="kvm-x86", choices=("kvm-x86", "7.1"))
    p.add_argument("--workers", default=None, help="local worker processes (default: one per core; 1: in-process)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the cells on this Dask distributed scheduler (needs testbed[dask])")
    p.add_argument("--expect", default=None, metavar="OUTCOME",
                   help="every cell must end with this outcome (done, guest_assert, terminated, ...; see README): "
                        "a cell that does not fails the matrix (exit 1) even where all cells agree")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_matrix)


def cmd_matrix(args: argparse.Namespace) -> int:
    """`testbed matrix`: exit 2 when a cell could not run (as `testbed run` for options that do not
    fit: the matrix is incomplete), else 1 when a cell diverges unexpectedly or, with `--expect`,
    ends with another outcome, else 0."""
    from testbed.asm import parse_define
    from testbed.options import parse_int, parse_size, parse_timeout

    def split(text: str | None, flag: str) -> list[str] | None:
        if text is None:
            return None
        names = [t.strip() for t in text.split(",")]
        if not all(names):
            raise UsageError(f"{flag} {text!r}: an empty name in the list")
        return names

    expect = check_expect(args.expect)
    combos = combinations(split(args.vm_types, "--vm-types"), split(args.vendors, "--vendors"), args.reference)
    options: dict[str, Any] = {"memory": parse_size(args.memory, "memory size"),
                               "timeout": parse_timeout(args.timeout), "kvm_version": args.kvm_version,
                               "defines": dict(parse_define(d) for d in args.define)}
    workers = None if args.workers is None else parse_int(args.workers, "--workers", range(1, 1025))
    if args.scheduler is not None and workers is not None:
        raise UsageError("--workers and --scheduler exclude each other (the cluster has its own workers)")
    start = time.perf_counter()
    executor = make_executor(workers, args.scheduler)
    try:
        rows = run_matrix(args.guests, combos=combos, options=options, executor=executor, expect=expect)
    finally:
        executor.close()
    wall = time.perf_counter() - start
    cells = [c for r in rows for c in r.cells]
    divergent = sum(c.divergent for c in cells)
    errors = sum(c.error is not None for c in cells)
    unexpected = sum(c.unexpected for c in cells)
    if args.json:
        doc = {"guests": [r.to_json() for r in rows], "divergent": divergent, "errors": errors,
               "expect": expect, "unexpected": unexpected,
               "executor": executor.name, "workers": executor.workers, "wall_s": round(wall, 3)}
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        caption = (f"{len(cells)} cells on {executor.workers} {executor.name} worker(s) in {wall:.2f} s; "
                   f"{divergent} unexpected divergence(s)")
        if expect is not None:
            caption += f"; {unexpected} cell(s) not ending {expect}"
        if errors:
            caption += f"; {errors} cell(s) could not run"
        print_table(rows, sys.stdout, caption=caption)
    if errors:
        guest, first = next((r.guest, c) for r in rows for c in r.cells if c.error is not None)
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in first.error or "")  # one line
        print(f"testbed: {errors} of {len(cells)} matrix cell(s) could not run; the first, {guest} under "
              f"{first.vm_type}/{first.vendor}: {text}", file=sys.stderr)
        return 2
    return 1 if divergent or unexpected else 0
