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

from rich.console import Console
from rich.table import Table

from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program

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
    machine = Machine(program, options)
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
    expected_failures = [c for c in cells if c.vm_type == "sev" and c.insn == "VMCALL"]
    ok = all(c.outcome == "done" for c in cells if c not in expected_failures) and all(
        c.outcome == "unhandled_exception" for c in expected_failures
    )
    if as_json:
        out.write(json.dumps({"cells": [c.__dict__ for c in cells], "as_expected": ok}) + "\n")
        return 0 if ok else 1
    console = Console(file=out, highlight=False)
    table = Table(title="KVM hypercall instructions by vendor and VM type (KVM_HC_VAPIC_POLL_IRQ, expect RAX=0)")
    for col in ("vendor", "VM type", "instruction", "outcome", "RAX", "what KVM did"):
        table.add_column(col)
    for c in cells:
        style = "green" if c.outcome == "done" else "red"
        rax = "-" if c.result is None else f"0x{c.result:x}"
        table.add_row(c.vendor, c.vm_type, c.insn, f"[{style}]{c.outcome}[/]", rax, c.kvm_action)
    console.print(table)
    for c in expected_failures:
        hv = c.host_view
        if hv is None:
            continue
        view = Table(title=f"{c.vendor}/{c.vm_type} {c.insn} at rip 0x{hv['rip']:x} (gpa 0x{hv['gpa']:x})")
        view.add_column("view")
        view.add_column("bytes")
        view.add_column("decodes as")
        view.add_row("guest (plaintext, C=1)", str(hv["guest_bytes"]), str(hv["guest_decode"]))
        view.add_row("host (ciphertext)", str(hv["host_bytes"]), str(hv["host_decode"]))
        console.print(view)
        console.print(
            "Explanation: today's KVM clears the #UD intercept for SEV guests (sev_init_vmcb), so the guest "
            "takes #UD directly. Even if KVM intercepted it, the bytes it reads are ciphertext: nothing "
            "decodes them as VMCALL, so nothing can patch them. Hence the SEV-specific hypercall that "
            "always uses VMMCALL (kvm_sev_hypercall3)."
        )
    return 0 if ok else 1
