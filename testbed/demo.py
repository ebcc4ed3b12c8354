"""`testbed demo`: the hypercall instruction under each vendor and VM type.

One guest (guests/hypercall_insn.s) makes a hypercall with VMCALL, VMMCALL or the runtime's
KVM_HYPERCALL, on an AMD and an Intel vCPU, on a plain VM and (AMD only) an SEV VM. The
failing cell is the seed thread's point ("KVM: x86: Add AMD SEV specific Hypercall3"): an SEV
guest's VMCALL raises #UD that nobody can fix up, because the host reads only ciphertext where
the instruction is. For that cell the table shows the guest's bytes and disassembly beside
what the host reads and disassembles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Any

from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program
from testbed.textout import plain_console, plain_table, styled

INSNS = {0: "VMCALL", 1: "VMMCALL", 2: "KVM_HYPERCALL"}
CELLS: tuple[tuple[Vendor, str], ...] = ((Vendor.AMD, "default"), (Vendor.INTEL, "default"), (Vendor.AMD, "sev"))


@dataclass
class DemoCell:
    """One run of the demo table."""

    vendor: str
    vm_type: str
    insn: str
    outcome: str
    result: int | None
    kvm_action: str
    host_view: dict[str, Any] | None = None
    detail: str = ""
    exits: dict[str, int] = field(default_factory=dict)


def run_cell(vendor: Vendor, vm_type: str, insn: int, seed: int = 1) -> DemoCell:
    """Run the demo guest in one configuration."""
    options = VmOptions(vendor=vendor, vm_type=vm_type, defines={"INSN": insn}, seed=seed, timeout=10.0)
    program = build_program(GUESTS_DIR / "hypercall_insn.s", options)
    with Machine(program, options) as machine:  # sev and ud_explanations stay readable after close
        report = machine.run()
    syncs = report.syncs()
    native = "VMMCALL" if vendor is Vendor.AMD else "VMCALL"
    if report.exception and report.exception.get("vector") == 6:
        action = "none: #UD delivered to the guest (KVM does not intercept #UD for SEV)" if machine.sev \
            else "#UD injected"
    elif INSNS[insn] in (native, "KVM_HYPERCALL"):
        action = "hypercall handled"
    else:
        action = f"decoded, patched to {native}, re-executed"
    host_view = machine.ud_explanations[0] if machine.ud_explanations else None
    return DemoCell(vendor.value, vm_type, INSNS[insn], report.outcome, syncs[0] if syncs else None, action,
                    host_view, report.detail, dict(report.exit_counts))


def run_demo(out: IO[str], as_json: bool = False, seed: int = 1) -> int:
    """Run every cell and print the table (or JSON); 0 when every cell behaved as KVM does."""
    cells = [run_cell(v, t, i, seed) for v, t in CELLS for i in INSNS]
    ok = as_expected(cells)
    if as_json:
        out.write(json.dumps({"cells": [c.__dict__ for c in cells], "as_expected": ok}) + "\n")
    else:
        print_demo(out, cells)
    return 0 if ok else 1


def _expected_failure(c: DemoCell) -> bool:
    return c.vm_type == "sev" and c.insn == "VMCALL"


def as_expected(cells: list[DemoCell]) -> bool:
    """Every cell passed but SEV's VMCALL, which ends in the guest's unhandled #UD."""
    return all((c.outcome == "unhandled_exception") if _expected_failure(c) else (c.outcome == "done")
               for c in cells)


def print_demo(out: IO[str], cells: list[DemoCell]) -> None:
    """The demo's tables. Every string is printed literally (textout.py): capstone's text of
    ciphertext holds `[...]` that rich would otherwise take for markup."""
    console = plain_console(out)
    table = plain_table("KVM hypercall instructions by vendor and VM type (KVM_HC_VAPIC_POLL_IRQ, expect RAX=0)",
                        "vendor", "VM type", "instruction", "outcome", "RAX", "what KVM did")
    for c in cells:
        good = (c.outcome == "unhandled_exception") if _expected_failure(c) else (c.outcome == "done")
        rax = "-" if c.result is None else f"0x{c.result:x}"
        table.add_row(c.vendor, c.vm_type, c.insn, styled(c.outcome, "green" if good else "red"), rax,
                      c.kvm_action)
    console.print(table)
    for c in cells:
        hv = c.host_view
        if not _expected_failure(c) or hv is None:
            continue
        view = plain_table(f"{c.vendor}/{c.vm_type} {c.insn} at rip 0x{hv['rip']:x} (gpa 0x{hv['gpa']:x})",
                           "view", "bytes", "decodes as")
        view.add_row("guest (plaintext, C=1)", str(hv["guest_bytes"]), str(hv["guest_decode"]))
        view.add_row("host (ciphertext)", str(hv["host_bytes"]), str(hv["host_decode"]))
        console.print(view)
        console.print(
            "Explanation: today's KVM clears the #UD intercept for SEV guests (sev_init_vmcb), so the guest "
            "takes #UD directly. Even if KVM intercepted it, the bytes it reads are ciphertext: nothing "
            "decodes them as VMCALL, so nothing can patch them. Hence the SEV-specific hypercall that "
            "always uses VMMCALL (kvm_sev_hypercall3)."
        )
