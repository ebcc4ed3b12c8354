"""`testbed demo`'s TDX row (testbed/demo.py TDX_CELLS): the TD's answer to the hypercall instructions.

Scenarios:
1. In a TD, VMCALL is a #VE with exit reason 18 raised by the TDX module (its
   td_generic_ve_exit), which KVM never sees; the guest reports it unhandled. The host view of
   the code page is nothing: the page is private in guest_memfd, which the host cannot map.
2. VMMCALL is #UD on an Intel TD; the runtime's KVM_HYPERCALL (TDCALL TDG.VP.VMCALL,
   arch/x86/coco/tdx/tdx.c tdx_kvm_hypercall; arch/x86/kvm/vmx/tdx.c tdx_emulate_vmcall)
   answers KVM_HC_VAPIC_POLL_IRQ's 0.
3. `testbed demo --json` and the human tables carry the row; the verdict turns false when the
   TD's VMCALL does not end in that #VE.
"""

from __future__ import annotations

import io
import json

import pytest

from testbed import demo
from testbed.cli import main
from testbed.demo import INSNS, TDX_CELLS, DemoCell, as_expected, print_demo, run_cell
from testbed.hw.exits import Vendor

VE, UD = 20, 6
EXIT_REASON_VMCALL = 18


def test_tdx_row_is_intel_tdx() -> None:
    """The demo's TDX row runs an Intel vCPU under the tdx VM type."""
    assert TDX_CELLS == ((Vendor.INTEL, "tdx"),)


def test_td_vmcall_is_a_ve_the_host_never_sees() -> None:
    """VMCALL in a TD: #VE (vector 20) with exit reason 18 in the guest, delivered by the TDX
    module (td_generic_ve_exit) - KVM takes no part; the host cannot read the code page (guest_memfd)."""
    cell = run_cell(Vendor.INTEL, "tdx", 0)
    assert cell.outcome == "unhandled_exception", f"{cell.outcome}: {cell.detail}"
    assert cell.exception is not None
    assert (cell.exception["vector"], cell.exception["exit_reason"]) == (VE, EXIT_REASON_VMCALL)
    assert cell.result is None
    assert cell.kvm_action.startswith("none:") and "#VE" in cell.kvm_action, cell.kvm_action
    hv = cell.host_view
    assert hv is not None
    assert (hv["guest_bytes"], hv["guest_decode"]) == ("0f01c1", "vmcall")
    assert (hv["host_view"], hv["host_bytes"], hv["host_decode"]) == ("unmappable", None, "not mappable by the host")
    assert hv["rip"] == cell.exception["rip"]


def test_td_vmmcall_is_ud() -> None:
    """VMMCALL on an Intel TD is #UD in the guest; nothing patches it to VMCALL (which a TD could
    not use anyway)."""
    cell = run_cell(Vendor.INTEL, "tdx", 1)
    assert cell.outcome == "unhandled_exception", f"{cell.outcome}: {cell.detail}"
    assert cell.exception is not None and cell.exception["vector"] == UD
    assert "patched" not in cell.kvm_action
    # KVM cannot intercept a TD's exceptions (tdx_handle_exception_nmi): the module delivers #UD.
    assert cell.kvm_action.startswith("none"), cell.kvm_action


def test_td_kvm_hypercall_is_answered() -> None:
    """KVM_HYPERCALL in a TD goes through TDCALL TDG.VP.VMCALL and KVM answers
    KVM_HC_VAPIC_POLL_IRQ with 0 (kvm/vmx/tdx.c tdx_emulate_vmcall, x86.c __kvm_emulate_hypercall)."""
    cell = run_cell(Vendor.INTEL, "tdx", 2)
    assert (cell.outcome, cell.result, cell.host_view) == ("done", 0, None), cell.detail
    assert "TDG.VP.VMCALL" in cell.kvm_action


def test_demo_json_carries_the_tdx_row(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`testbed demo --json` has the TD's three cells with their exceptions and host view, and
    says as_expected (the other rows left out here to keep the test short)."""
    monkeypatch.setattr(demo, "CELLS", ())
    assert main(["demo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["as_expected"] is True
    cells = {c["insn"]: c for c in doc["cells"]}
    assert [(c["vendor"], c["vm_type"]) for c in doc["cells"]] == [("intel", "tdx")] * len(INSNS)
    vmcall = cells["VMCALL"]
    assert (vmcall["outcome"], vmcall["exception"]["vector"], vmcall["exception"]["exit_reason"]) == \
        ("unhandled_exception", VE, EXIT_REASON_VMCALL)
    assert vmcall["host_view"]["host_view"] == "unmappable" and vmcall["host_view"]["host_bytes"] is None
    assert cells["VMMCALL"]["exception"]["vector"] == UD
    assert (cells["KVM_HYPERCALL"]["outcome"], cells["KVM_HYPERCALL"]["result"]) == ("done", 0)


def test_demo_human_output_shows_the_unreadable_host_view(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The human tables show the TD's VMCALL as a #VE KVM never sees, and the host's view of the
    code page as unreadable guest_memfd beside the guest's `vmcall`."""
    monkeypatch.setattr(demo, "CELLS", ())
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for text in ("intel/tdx VMCALL at rip", "#VE (exit reason 18)", "KVM never sees it",
                 "host (guest_memfd: unreadable)", "not mappable by the host", "vmcall", "td_generic_ve_exit",
                 "intel/tdx VMMCALL at rip", "intercepts only #MC (td_vmcs_init.c)"):
        assert text in out, f"{text!r} missing from:\n{out}"


@pytest.mark.parametrize(("outcome", "exception"), [
    ("done", None),
    ("unhandled_exception", {"vector": UD, "error_code": None}),
    ("unhandled_exception", {"vector": VE, "error_code": None, "exit_reason": 30}),
], ids=["finished", "ud", "ve-other-reason"])
def test_verdict_fails_when_td_vmcall_is_not_the_reason_18_ve(outcome: str, exception: dict[str, int] | None) -> None:
    """The demo's verdict holds only for the #VE with exit reason 18 at a TD's VMCALL."""
    good = DemoCell("intel", "tdx", "VMCALL", "unhandled_exception", None, "", None,
                    exception={"vector": VE, "error_code": None, "exit_reason": EXIT_REASON_VMCALL})
    bad = DemoCell("intel", "tdx", "VMCALL", outcome, 0 if exception is None else None, "", None, exception=exception)
    assert as_expected([good]) and not as_expected([bad])


def test_print_demo_keeps_td_text_literal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TD host view without bytes prints `-` for them, and the cell's text is kept whole."""
    monkeypatch.setenv("COLUMNS", "250")
    hv = {"rip": 0x100007, "gpa": 0x100007, "guest_bytes": "0f01c1", "guest_decode": "vmcall",
          "host_view": "unmappable", "host_bytes": None, "host_decode": "not mappable by the host"}
    out = io.StringIO()
    print_demo(out, [DemoCell("intel", "tdx", "VMCALL", "unhandled_exception", None, "none: [#VE]", hv,
                              exception={"vector": VE, "error_code": None, "exit_reason": EXIT_REASON_VMCALL})])
    text = out.getvalue()
    assert "none: [#VE]" in text and "None" not in text, text
