"""`testbed demo`: the hypercall instruction under each vendor and VM type.

One guest (guests/hypercall_insn.s) makes a hypercall with VMCALL, VMMCALL or the runtime's
KVM_HYPERCALL, on an AMD and an Intel vCPU, on a plain VM and (AMD only) an SEV VM. The
failing cell is the seed thread's point ("KVM: x86: Add AMD SEV specific Hypercall3"): an SEV
guest's VMCALL raises #UD that nobody can fix up, because the host reads only ciphertext where
the instruction is. For that cell the table shows the guest's bytes and disassembly beside
what the host reads and disassembles.

The TDX row (Intel only) gives the TD's answer: VMCALL never leaves the guest - the TDX module
turns it into #VE with exit reason 18 (its td_generic_ve_exit), which KVM never sees - and the
host could not decode the instruction anyway, because the code page is private memory in
guest_memfd, which the host cannot map. VMMCALL is #UD on Intel; KVM_HYPERCALL (TDCALL
TDG.VP.VMCALL, Linux's tdx_kvm_hypercall) works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Any

from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program
from testbed.textout import plain_console, plain_table, styled
from testbed.x86 import Vector
from testbed.x86.addr import Gva

INSNS = {0: "VMCALL", 1: "VMMCALL", 2: "KVM_HYPERCALL"}
CELLS: tuple[tuple[Vendor, str], ...] = ((Vendor.AMD, "default"), (Vendor.INTEL, "default"), (Vendor.AMD, "sev"))
#: The TD's row, run after CELLS.
TDX_CELLS: tuple[tuple[Vendor, str], ...] = ((Vendor.INTEL, "tdx"),)
#: The #VE's exit reason for VMCALL in a TD (uapi/asm/vmx.h EXIT_REASON_VMCALL).
VE_REASON_VMCALL = 18
#: The cells that end in the guest's own exception, by (VM type, instruction): (vector, error
#: code or None for any). Every other cell finishes with RAX = 0.
#: (vector, the #VE's exit reason or None)
EXPECTED_EXCEPTIONS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("sev", "VMCALL"): (int(Vector.UD), None),
    ("tdx", "VMCALL"): (int(Vector.VE), VE_REASON_VMCALL),
    ("tdx", "VMMCALL"): (int(Vector.UD), None),
}


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
    #: the guest's unhandled exception (vector, error_code, rip, ...), None when it finished
    exception: dict[str, Any] | None = None


def _td_host_view(machine: Machine, rip: int) -> dict[str, Any] | None:
    """What the host would read at a TD's #VE site: nothing, the code page is private in
    guest_memfd (the host's view refuses it), beside the guest's plaintext bytes."""
    linear = machine.cpu.linear_rip(rip)
    try:
        guest_bytes = machine.cpu.fetch_bytes(Gva(linear), 3)
    except Exception:  # the walk failed: nothing to show
        return None
    return machine.host_view_at(rip, linear, guest_bytes, "explanation: what the host would read at the #VE's RIP")


def run_cell(vendor: Vendor, vm_type: str, insn: int, seed: int = 1) -> DemoCell:
    """Run the demo guest in one configuration."""
    options = VmOptions(vendor=vendor, vm_type=vm_type, defines={"INSN": insn}, seed=seed, timeout=10.0)
    program = build_program(GUESTS_DIR / "hypercall_insn.s", options)
    with Machine(program, options) as machine:  # sev and ud_explanations stay readable after close
        report = machine.run()
        exception = report.exception or {}
        vector = exception.get("vector")
        ve_view = _td_host_view(machine, int(exception["rip"])) if machine.tdx and vector == Vector.VE else None
    syncs = report.syncs()
    native = "VMMCALL" if vendor is Vendor.AMD else "VMCALL"
    if vector == Vector.VE and machine.tdx:
        action = f"none: the TDX module raises #VE (exit reason {exception.get('exit_reason')}) in the guest; " \
            "KVM never sees it"
    elif vector == Vector.UD:
        # ud_explanations records a #UD KVM did not intercept (the hardware delivered it).
        if machine.ud_explanations:
            why = "KVM does not intercept #UD for SEV" if machine.sev else "KVM does not intercept #UD"
            action = f"none: #UD delivered to the guest ({why})"
        else:
            action = "#UD injected"
    elif INSNS[insn] in (native, "KVM_HYPERCALL"):
        action = "hypercall handled" if not machine.tdx else "hypercall handled (TDCALL TDG.VP.VMCALL)"
    else:
        action = f"decoded, patched to {native}, re-executed"
    host_view = ve_view or (machine.ud_explanations[0] if machine.ud_explanations else None)
    return DemoCell(vendor.value, vm_type, INSNS[insn], report.outcome, syncs[0] if syncs else None, action,
                    host_view, report.detail, dict(report.exit_counts), report.exception)


def run_demo(out: IO[str], as_json: bool = False, seed: int = 1) -> int:
    """Run every cell and print the table (or JSON); 0 when every cell behaved as KVM does."""
    cells = [run_cell(v, t, i, seed) for v, t in CELLS + TDX_CELLS for i in INSNS]
    ok = as_expected(cells)
    if as_json:
        out.write(json.dumps({"cells": [c.__dict__ for c in cells], "as_expected": ok}) + "\n")
    else:
        print_demo(out, cells)
    return 0 if ok else 1


def _expected_failure(c: DemoCell) -> bool:
    return (c.vm_type, c.insn) in EXPECTED_EXCEPTIONS


def cell_as_expected(c: DemoCell) -> bool:
    """The cell ended as KVM (and, for a TD, the TDX module) ends it: the guest's own exception
    named in EXPECTED_EXCEPTIONS (SEV VMCALL: #UD; TD VMCALL: #VE reason 18; TD VMMCALL: #UD), or
    done with KVM_HC_VAPIC_POLL_IRQ's 0 in RAX."""
    expected = EXPECTED_EXCEPTIONS.get((c.vm_type, c.insn))
    if expected is None:
        return c.outcome == "done" and c.result == 0
    if c.outcome != "unhandled_exception":
        return False
    if c.exception is None:  # a cell built without the exception (tests): the outcome says it
        return True
    vector, reason = expected
    return c.exception.get("vector") == vector and reason in (None, c.exception.get("exit_reason"))


def as_expected(cells: list[DemoCell]) -> bool:
    """Every cell ended as KVM ends it (cell_as_expected)."""
    return all(cell_as_expected(c) for c in cells)


def print_demo(out: IO[str], cells: list[DemoCell]) -> None:
    """The demo's tables. Every string is printed literally (textout.py): capstone's text of
    ciphertext holds `[...]` that rich would otherwise take for markup."""
    console = plain_console(out)
    table = plain_table("KVM hypercall instructions by vendor and VM type (KVM_HC_VAPIC_POLL_IRQ, expect RAX=0)",
                        "vendor", "VM type", "instruction", "outcome", "RAX", "what KVM did")
    for c in cells:
        good = cell_as_expected(c)
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
        td = c.vm_type == "tdx"
        unmappable = hv.get("host_view") == "unmappable" or hv.get("host_bytes") is None
        view.add_row("guest (plaintext, private)" if td else "guest (plaintext, C=1)", str(hv["guest_bytes"]),
                     str(hv["guest_decode"]))
        view.add_row("host (guest_memfd: unreadable)" if unmappable else "host (ciphertext)",
                     "-" if hv.get("host_bytes") is None else str(hv["host_bytes"]), str(hv["host_decode"]))
        console.print(view)
        if td and c.insn != "VMCALL":
            console.print(
                f"Explanation: {c.insn} is not an instruction of an Intel CPU: the CPU delivers #UD in the TD "
                "with no VM exit - the TDX module owns a TD's exception bitmap and intercepts only #MC "
                "(td_vmcs_init.c) - so neither the module nor KVM sees it, and KVM could not read the "
                "private code page to fix it up anyway."
            )
            continue
        if td:
            console.print(
                "Explanation: in a TD, VMCALL never reaches KVM: the TDX module turns it into #VE with "
                f"exit reason {VE_REASON_VMCALL} (td_generic_ve_exit), which the guest's #VE handler does "
                "not take. Nor could the host decode it: the code page is private memory in guest_memfd, "
                "which the host cannot map or read. A TD's hypercalls are TDCALL TDG.VP.VMCALL "
                "(tdx_kvm_hypercall), which the runtime's KVM_HYPERCALL uses."
            )
            continue
        console.print(
            "Explanation: today's KVM clears the #UD intercept for SEV guests (sev_init_vmcb), so the guest "
            "takes #UD directly. Even if KVM intercepted it, the bytes it reads are ciphertext: nothing "
            "decodes them as VMCALL, so nothing can patch them. Hence the SEV-specific hypercall that "
            "always uses VMMCALL (kvm_sev_hypercall3)."
        )
