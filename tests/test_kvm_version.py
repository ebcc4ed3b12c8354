"""KVM as of a named kernel, end to end: the kvm-x86 tree and `--kvm-version 7.1`.

Guests speak the GHCB protocol themselves (guests/ghcb_kvm_version.s) and run through the Python
API (Machine, run_guest) and `testbed run --json`:
1. Each modelled difference between the reference tree and 7.1 (testbed/kvm/version.py): an SNP
   VMGEXIT from an unregistered GHCB, SNP-only events from SEV-ES, bad guest-request GPAs, and the
   PSC completion's check of the VMM's ret.
2. Behaviours both versions share that the testbed modelled wrongly before: AP creation requests
   KVM rejects, AP Reset Hold as KVM_EXIT_AP_RESET_HOLD, the PSC header read once per VMGEXIT,
   and VMGEXIT handler errors failing KVM_RUN itself (outcome kvm_run_error, with errno).
3. The option: its spellings, its errors, and DIFFERENCES/README agreeing.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import EXIT_GUEST_FAILURE, EXIT_USAGE, main
from testbed.errors import UsageError
from testbed.kvm.hypercall import neg
from testbed.kvm.version import DIFFERENCES, REFERENCE, KvmVersion
from testbed.layout import RT_GHCB, Layout
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program, run_guest
from testbed.vmm.vmm import OUTCOMES, RunReport

MEM = 8 << 20
FREE = Layout(MEM).free_gpa
GUEST = GUESTS_DIR / "ghcb_kvm_version.s"
KVM = [v.value for v in KvmVersion]
REF, V7_1 = KvmVersion.KVM_X86.value, KvmVersion.RELEASED.value
README = Path(__file__).resolve().parent.parent / "README.md"


def run(vm_type: str, kvm: str, scenario: int, **defines: int) -> RunReport:
    return run_guest(GUEST, VmOptions(vm_type=vm_type, memory=MEM, seed=3, timeout=5, kvm_version=kvm,
                                      defines={"SCENARIO": scenario, **defines}))


def assert_kvm_run_error(report: RunReport, err: int, what: str) -> None:
    """KVM_RUN failed: outcome kvm_run_error with the errno, no exit reason recorded for it."""
    assert report.outcome == "kvm_run_error", f"{report.outcome}: {report.detail}"
    assert report.errno == err and report.to_json()["errno"] == err
    assert what in report.detail, report.detail
    assert report.syncs() == []
    assert not any(e["reason"] == "internal_error" for e in report.user_exits)


# ---------------------------------------------------------------------- 1. the differences
def test_unregistered_ghcb_snp_runs_on_in_the_reference_tree() -> None:
    """kvm-x86: a VMGEXIT from a GPA that is not the registered GHCB is answered 2/1 (GHCB_ERR_NOT_REGISTERED)
    in that page and the guest runs on (sev.c sev_handle_vmgexit; commit 1797e00bf802)."""
    report = run("sev-snp", REF, 0)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [2, 1]


def test_unregistered_ghcb_snp_fails_kvm_run_in_7_1() -> None:
    """7.1: the same VMGEXIT fails KVM_RUN with -EINVAL (sev.c @00b9744a, sev_handle_vmgexit)."""
    assert_kvm_run_error(run("sev-snp", V7_1, 0), errno.EINVAL, "not registered")


@pytest.mark.parametrize(("code", "kvm"), [(0x80000010, REF), (0x80000010, V7_1), (0x80000013, REF),
                                           (0x80000012, V7_1)],
                         ids=["psc-kvm-x86", "psc-7.1", "ap_creation-kvm-x86", "ext_guest_request-7.1"])
def test_snp_only_exit_from_sev_es(code: int, kvm: str) -> None:
    """SNP-only exit codes from SEV-ES: INVALID_EVENT (2, 6) in kvm-x86 (sev.c is_snp_only_vmgexit; commit
    95d8c59cdf6d), MISSING_INPUT (2, 4) in 7.1 (sev_es_validate_vmgexit); the guest runs on."""
    report = run("sev-es", kvm, 1, CODE=code)
    assert report.outcome == "done", report.detail
    assert report.syncs() == ([2, 6] if kvm == REF else [2, 4])


@pytest.mark.parametrize("kvm", KVM)
def test_snp_guest_request_misaligned(kvm: str) -> None:
    """SNP GUEST_REQUEST with a misaligned request GPA: INVALID_INPUT (2, 5) in kvm-x86 (sev.c sev_handle_vmgexit;
    commit 5eb5d5d123a8), MISSING_INPUT (2, 4) in 7.1; the guest runs on."""
    report = run("sev-snp", kvm, 2)
    assert report.outcome == "done", report.detail
    assert report.syncs() == ([2, 5] if kvm == REF else [2, 4])


def _psc_machine(kvm: str) -> Machine:
    """An SNP guest that converts two pages to shared with one PSC request (the runtime's set_memory_shared)."""
    text = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 2
    call set_memory_shared
    GUEST_SYNC rax
    ret
"""
    options = VmOptions(vm_type="sev-snp", memory=MEM, seed=3, timeout=5, kvm_version=kvm)
    return Machine(build_program("<psc>", options, text=text), options)


def test_vmm_ret_outside_what_kvm_accepts_fails_kvm_run() -> None:
    """kvm-x86: a VMM that answers a PSC exit with -EINVAL (not EINVAL) makes KVM_RUN fail with -EINVAL
    (sev.c snp_complete_one_psc, x86.h kvm_is_valid_map_gpa_range_ret; commit 5d40e5b49442)."""
    machine = _psc_machine(REF)
    real = machine.map_gpa.handle
    machine.map_gpa.handle = lambda gpa, n, attrs: neg(errno.EINVAL) if gpa == FREE else real(gpa, n, attrs)  # type: ignore[method-assign]
    report = machine.run()
    assert_kvm_run_error(report, errno.EINVAL, "hypercall.ret")
    assert report.user_exits[-1]["reason"] == "hypercall" and report.user_exits[-1]["args"][0] == FREE


def test_vmm_ret_any_error_is_answered_to_the_guest_in_7_1() -> None:
    """7.1: the same ret is just an error answered to the guest (VMGEXIT_PSC_ERROR_GENERIC), which the runtime
    reports as -EINVAL (sev.c @00b9744a, snp_complete_one_psc)."""
    machine = _psc_machine(V7_1)
    real = machine.map_gpa.handle
    machine.map_gpa.handle = lambda gpa, n, attrs: neg(errno.EINVAL) if gpa == FREE else real(gpa, n, attrs)  # type: ignore[method-assign]
    report = machine.run()
    assert report.outcome == "done", report.detail
    assert report.syncs() == [neg(errno.EINVAL)]


@pytest.mark.parametrize("kvm", KVM)
def test_vmm_refuses_with_a_value_both_versions_accept(kvm: str) -> None:
    """The testbed's VMM refuses a PSC with EINVAL, which both versions take as an error for the guest: the run
    goes on (testbed/vmm/map_gpa.py; sev.c snp_complete_one_psc)."""
    report = run_guest("<refuse>", VmOptions(vm_type="sev-snp", memory=MEM, seed=3, timeout=5, kvm_version=kvm,
                                             refuse_conversions=[(FREE, 1, None)]), text="""
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1
    call set_memory_shared
    GUEST_SYNC rax
    ret
""")
    assert report.outcome == "done", report.detail
    assert report.syncs() == [neg(errno.EINVAL)]
    psc = [e for e in report.user_exits if e["reason"] == "hypercall" and e["args"][0] == FREE]
    assert [e["ret"] for e in psc] == [errno.EINVAL]


# ------------------------------------------------------------ 2. shared by both versions
@pytest.mark.parametrize(("info1", "kvm"), [((5 << 32) | 1, REF), ((1 << 32) | 2, V7_1), (7, REF)],
                         ids=["unknown_apic_id-kvm-x86", "unknown_apic_id_destroy-7.1", "bad_request-kvm-x86"])
def test_ap_creation_rejected_runs_on(info1: int, kvm: str) -> None:
    """AP creation KVM rejects without a second vCPU (unknown APIC ID, bad request type) is INVALID_INPUT (2, 5)
    and the guest runs on (sev.c sev_handle_vmgexit, sev_snp_ap_creation)."""
    report = run("sev-snp", kvm, 3, INFO1=info1)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [2, 5]


@pytest.mark.parametrize(("vm_type", "scenario"), [("sev-es", 4), ("sev-snp", 5)],
                         ids=["msr_protocol_es", "nae_event_snp"])
def test_ap_reset_hold_is_its_own_user_exit(vm_type: str, scenario: int) -> None:
    """AP Reset Hold (MSR protocol and AP_HLT_LOOP) exits KVM_EXIT_AP_RESET_HOLD, named ap_reset_hold, not hlt
    (sev.c sev_handle_vmgexit(_msr_protocol); x86.c kvm_emulate_ap_reset_hold). Nothing sends the SIPI."""
    report = run(vm_type, REF, scenario)
    assert report.outcome == "timeout", report.detail
    assert "AP reset hold" in report.detail
    assert report.user_exits[-1] == {"reason": "ap_reset_hold"}
    assert report.exit_counts["ap_reset_hold"] == 1 and "hlt" not in report.exit_counts
    assert report.syncs() == []


@pytest.mark.parametrize("kvm", KVM)
def test_psc_header_is_read_once_per_vmgexit(kvm: str) -> None:
    """A PSC header rewritten while the VMM handles an exit changes nothing: cur/end were read once per VMGEXIT
    (sev.c snp_begin_psc; commit ce6ea7b33e00, in 7.1 too)."""
    text = """
guest_main:
    mov rsi, RT_GHCB + GHCB_SHARED_BUF
    mov dword ptr [rsi], 1 << 16               # cur_entry 0, end_entry 1
    mov dword ptr [rsi + 4], 0
    mov rax, GUEST_FREE_GPA | (2 << 52)        # two separate 4K entries: two exits
    mov qword ptr [rsi + 8], rax
    mov rax, (GUEST_FREE_GPA + 0x2000) | (2 << 52)
    mov qword ptr [rsi + 16], rax
    GHCB_SET GHCB_SW_SCRATCH, rsi
    mov rdi, SVM_VMGEXIT_PSC
    xor esi, esi
    xor edx, edx
    call rt_ghcb_exit
    mov rax, RT_GHCB
    mov r12, qword ptr [rax + GHCB_SW_EXITINFO2]
    movzx r13, word ptr [rax + GHCB_SHARED_BUF]
    GUEST_SYNC r12
    GUEST_SYNC r13
    ret
"""
    options = VmOptions(vm_type="sev-snp", memory=MEM, seed=3, timeout=5, kvm_version=kvm)
    machine = Machine(build_program("<psc-hdr>", options, text=text), options)
    real = machine.map_gpa.handle
    host = machine.memory.host_view()

    def vmm(gpa: int, npages: int, attrs: int) -> int:
        if gpa == FREE:  # the first of the guest's two entries: shrink end_entry to 0 behind KVM's back
            host.write(RT_GHCB + 0x800 + 2, (0).to_bytes(2, "little"))
        return real(gpa, npages, attrs)

    machine.map_gpa.handle = vmm  # type: ignore[method-assign]
    report = machine.run()
    assert report.outcome == "done", report.detail
    assert report.syncs() == [0, 2]  # success, cur_entry past both entries
    psc = [e["args"][0] for e in report.user_exits if e["reason"] == "hypercall"]
    assert psc[-2:] == [FREE, FREE + 0x2000]


@pytest.mark.parametrize(("vm_type", "scenario", "what", "kvm"), [("sev-es", 6, "unsupported event", REF),
                                                                  ("sev-snp", 6, "unsupported event", V7_1),
                                                                  ("sev-es", 7, "INT_MAX", REF)],
                         ids=["unsupported_event_es", "unsupported_event_snp-7.1", "string_io_count"])
def test_vmgexit_handler_error_fails_kvm_run(vm_type: str, scenario: int, what: str, kvm: str) -> None:
    """A VMGEXIT handler returning -EINVAL makes KVM_RUN fail with EINVAL and no exit reason: outcome
    kvm_run_error, not internal_error (sev.c sev_handle_vmgexit UNSUPPORTED_EVENT, sev_es_string_io)."""
    assert_kvm_run_error(run(vm_type, kvm, scenario), errno.EINVAL, what)


def test_kvm_run_error_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed run --json`: outcome kvm_run_error with errno 22, exit status 1 (a guest-caused failure)."""
    status = main(["run", str(GUEST), "--vm-type", "sev-es", "--memory", "8M", "--timeout", "5",
                   "-D", "SCENARIO=6", "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    report: dict[str, Any] = json.loads(out)
    assert status == EXIT_GUEST_FAILURE == 1
    assert report["outcome"] == "kvm_run_error" and report["errno"] == errno.EINVAL
    assert "kvm_run_error" in OUTCOMES


@pytest.mark.parametrize(("kvm", "outcome", "syncs"), [(REF, "done", [2, 1]), (V7_1, "kvm_run_error", [])])
def test_kvm_version_through_the_cli(capsys: pytest.CaptureFixture[str], kvm: str, outcome: str,
                                     syncs: list[int]) -> None:
    """`testbed run --kvm-version NAME` reaches the KVM model: the unregistered-GHCB VMGEXIT (sev.c,
    sev_handle_vmgexit) runs on under kvm-x86 and fails KVM_RUN under 7.1."""
    status = main(["run", str(GUEST), "--vm-type", "sev-snp", "--memory", "8M", "--timeout", "5",
                   "-D", "SCENARIO=0", "--kvm-version", kvm, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["outcome"] == outcome
    assert [u["args"][0] for u in report["ucalls"] if u["cmd"] == "sync"] == syncs
    assert status == (0 if outcome == "done" else EXIT_GUEST_FAILURE)


# ---------------------------------------------------------------------------- 3. the option
def test_kvm_version_spellings() -> None:
    """VmOptions takes the CLI's names or the enum and rejects anything else naming the value."""
    assert VmOptions().kvm_version is REFERENCE is KvmVersion.KVM_X86
    assert VmOptions(kvm_version="7.1").kvm_version is KvmVersion.RELEASED  # type: ignore[arg-type]
    assert VmOptions(kvm_version=KvmVersion.RELEASED).kvm_version is KvmVersion.RELEASED
    with pytest.raises(UsageError, match=r"'6\.18'.*kvm-x86, 7\.1"):
        VmOptions(kvm_version="6.18")  # type: ignore[arg-type]


def test_unknown_kvm_version_on_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    """`--kvm-version` with an unknown name is a usage error (status 2) naming the choices."""
    status = main(["run", str(GUEST), "--kvm-version", "5.15"])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE and "kvm-x86" in err and "7.1" in err and "Traceback" not in err


def test_readme_lists_every_difference_with_its_commit() -> None:
    """The README names the modelled kernel and lists each DIFFERENCES entry's commit."""
    text = README.read_text(encoding="utf-8")
    assert "1a27afa0" in text and "7.1" in text
    for diff in DIFFERENCES:
        sha = diff.commit.split()[0]
        assert re.fullmatch(r"[0-9a-f]{12}", sha), diff.commit
        assert sha in text, f"README does not list {diff.commit}"
