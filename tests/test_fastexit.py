"""The exit path exists twice (C fast path, ctypes fallback); both must behave the same."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from testbed.hw import cpu
from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program

ROOT = Path(__file__).resolve().parent.parent


def test_fast_path_is_used_when_built() -> None:
    """With the extension importable, the vCPU registers its invalid-instruction hook in C."""
    options = VmOptions(memory=16 << 20)
    machine = Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options)
    assert (machine.cpu._fastexit is not None) == (cpu._fastexit is not None and not os.environ.get(
        "TESTBED_NO_FASTEXIT"))


@pytest.mark.parametrize("vm", [[], ["--vm-type", "sev-snp"], ["--vm-type", "tdx", "--vendor", "intel"]],
                         ids=["default", "sev-snp", "tdx"])
def test_ctypes_fallback_gives_the_same_results(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], vm: list[str]) -> None:
    """A run forced onto the ctypes path (TESTBED_NO_FASTEXIT=1) reports what the default path
    does: the native hypercall's, and an SNP boot's PVALIDATEs and a TD's TDCALLs (their own
    fast paths), down to the exit counts."""
    from testbed.cli import main

    args = ["run", str(GUESTS_DIR / "hypercall_abi_call.s"), "--json", "-D", "HC_NR=0x999", "--memory", "16M", *vm]
    results = []
    for disable in ("", "1"):
        monkeypatch.setenv("TESTBED_NO_FASTEXIT", disable)  # read when a vCPU installs its hooks
        assert main(args) == 0
        report = json.loads(capsys.readouterr().out)
        results.append((report["outcome"], report["ucalls"], report["stats"]["exits"], report.get("memory")))
    assert results[0] == results[1]
    assert results[0][1][0]["args"] == [(-1000) & (2**64 - 1)]


NATIVE_HYPERCALL = """
guest_main:
    mov rax, 0x999
    KVM_HYPERCALL
    GUEST_ASSERT_EQ rax, -1000
    ret
"""


def _trace_of_native_hypercall(vendor: Vendor, tmp_path: Path) -> list[dict[str, object]]:
    trace = tmp_path / f"{vendor}.jsonl"
    with trace.open("w") as sink:
        options = VmOptions(memory=8 << 20, vendor=vendor, trace=sink)
        with Machine(build_program("<hc>", options, text=NATIVE_HYPERCALL), options) as machine:
            assert machine.run().outcome == "done"
    return [json.loads(line) for line in trace.read_text().splitlines()]


def test_native_hypercall_is_a_traced_hardware_exit(tmp_path: Path) -> None:
    """The native hypercall leaves the guest as every exit does: `--trace` records the hardware's
    vmexit (SVM_EXIT_VMMCALL 0x81 / EXIT_REASON_VMCALL 18), then KVM's handle_exit and hypercall
    (svm.c vmmcall_interception / vmx.c handle_vmcall -> x86.c kvm_emulate_hypercall)."""
    for vendor, code in ((Vendor.AMD, 0x81), (Vendor.INTEL, 18)):
        events = _trace_of_native_hypercall(vendor, tmp_path)
        hc = next(i for i, e in enumerate(events) if e["event"] == "hypercall" and e.get("nr") == 0x999)
        hw = [e for e in events[:hc] if e["layer"] == "hw" and e["event"] == "vmexit"]
        assert hw and hw[-1]["code"] == code, (vendor, hw[-1:])
        kvm = [e for e in events[:hc] if e["layer"] == "kvm" and e["event"] == "handle_exit"]
        assert kvm and kvm[-1]["code"] == code


HYPERCALLS = """
guest_main:
    mov rax, 0x999
    KVM_HYPERCALL
    GUEST_SYNC rax
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, GUEST_FREE_GPA
    mov rcx, 1
    mov rdx, KVM_MAP_GPA_RANGE_DECRYPTED
    KVM_HYPERCALL
    GUEST_SYNC rax
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, GUEST_FREE_GPA + 1
    mov rcx, 1
    xor edx, edx
    KVM_HYPERCALL
    GUEST_SYNC rax
    mov rax, KVM_HC_SEND_IPI
    mov rbx, 1
    xor ecx, ecx
    mov rdx, 0
    mov rsi, 0x800
    KVM_HYPERCALL
    GUEST_SYNC rax
    GUEST_RUN_USER user_hypercall      # its RAX (port I/O, a ucall too, is #GP at CPL 3)
    GUEST_SYNC rax
    GUEST_DONE
user_hypercall:
    mov rax, KVM_HC_VAPIC_POLL_IRQ
    KVM_HYPERCALL
    ret
"""


@pytest.mark.parametrize("vendor", ["amd", "intel"])
def test_hypercall_fastpath_answers_as_the_vmexit_path(vendor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM's native-hypercall fastpath (the hardware hands the registers to
    KvmVcpu.native_hypercall) gives the guest and the VMM what the vmexit path gives (taken
    when a tracer records): in-kernel answers, a MAP_GPA_RANGE user exit and its EINVAL, the
    CPL-3 EPERM; and it is taken only without a tracer."""
    import io

    from testbed.kvm.vcpu import KvmVcpu

    taken = [0]
    real = KvmVcpu.native_hypercall

    def counted(self: KvmVcpu, *args: Any) -> int | None:
        taken[0] += 1
        return real(self, *args)

    monkeypatch.setattr(KvmVcpu, "native_hypercall", counted)
    results = []
    for trace in (None, io.StringIO()):
        options = VmOptions(vendor=vendor, memory=16 << 20, trace=trace)
        with Machine(build_program("<hc>", options, text=HYPERCALLS), options) as machine:
            assert machine.cpu._hypercall_fastpath is not None
            machine.cpu._hypercall_fastpath = machine.kvm_vcpu.native_hypercall  # the counted one
            taken[0] = 0
            report = machine.run()
            results.append((report.outcome, report.syncs(), report.shared_ranges, taken[0]))
    fast, traced = results
    assert fast[:3] == traced[:3] and fast[0] == "done"
    # -KVM_ENOSYS; 0; -KVM_EINVAL (unaligned GPA); -KVM_EINVAL (ICR dest-mode bit 11); -KVM_EPERM
    assert fast[1] == [(-1000) & (2**64 - 1), 0, (-22) & (2**64 - 1), (-22) & (2**64 - 1), (-1) & (2**64 - 1)]
    assert fast[3] == 5  # every hypercall took the fastpath
    assert traced[3] == 5  # through vmexit -> handle_hypercall -> native_hypercall
