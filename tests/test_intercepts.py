"""Tests for the instruction intercepts (testbed/hw/intercepts.py): the sites found by scanning
code pages, and an instruction whose bytes straddle a page boundary."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from testbed.hw import unicorn_binding
from testbed.machine import VmOptions, run_guest

# RDMSR of SEV_STATUS and CPUID 0x40000000 (KVM's signature leaf), each starting on the last
# byte of a page: 0F there, the rest of the instruction on the next page.
STRADDLE = """
guest_main:
    mov ecx, 0xC0010131
    lea rax, [rip + straddle_rdmsr]
    jmp rax
.balign 4096
.skip 4095, 0xcc
straddle_rdmsr:
    rdmsr
    GUEST_SYNC rax
    mov eax, 0x40000000
    xor ecx, ecx
    lea rdx, [rip + straddle_cpuid]
    jmp rdx
.balign 4096
.skip 4095, 0xcc
straddle_cpuid:
    cpuid
    GUEST_SYNC rbx
    ret
"""

KVM_SIGNATURE_EBX = 0x4B4D564B  # "KVMK"


@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-es", 0x3), ("sev-snp", 0x7)])
def test_a_site_straddling_a_page_boundary_is_intercepted(vm_type: str, sev_status: int) -> None:
    """An RDMSR whose 0F ends a page still reads the hardware's SEV_STATUS (Unicorn alone
    reads 0), and on SEV-ES/SNP a CPUID so placed raises #VC (SVM_EXIT_CPUID) at its first
    byte before it runs, answered through the GHCB with KVM's signature."""
    trace = io.StringIO()
    report = run_guest("<straddle>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1, trace=trace),
                       text=STRADDLE)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status, KVM_SIGNATURE_EBX]
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    cpuid_vcs = [e for e in events if e["event"] == "vc" and e["error_code"] == 0x72 and e["rip"] & 0xFFF == 0xFFF]
    assert len(cpuid_vcs) == (1 if vm_type != "sev" else 0)


def test_a_cpuid_straddling_a_page_boundary_in_a_td_is_the_modules() -> None:
    """In a TD a CPUID whose 0F ends a page is still the TDX module's: leaf 0x40000000 raises
    #VE and reaches KVM as a TDVMCALL, never as a CPUID exit (KVM never sees one from a TD)."""
    text = STRADDLE[STRADDLE.index("    mov eax, 0x40000000"):]
    trace = io.StringIO()
    report = run_guest("<straddle>", VmOptions(vm_type="tdx", vendor="intel", memory=16 << 20, seed=1, trace=trace),
                       text="guest_main:\n" + text)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [KVM_SIGNATURE_EBX]
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    ves = [e for e in events if e["event"] == "deliver" and e["name"] == "#VE" and e["rip"] & 0xFFF == 0xFFF]
    assert len(ves) == 1
    assert not [e for e in events if e["event"] == "handle_exit" and e["name"] == "EXIT_REASON_CPUID"]


# IN AL, 0x80 with an operand-size prefix: in the middle of a page, then with its 66 ending one.
PREFIXED_IN = """
guest_main:
    .byte 0x66, 0xe4, 0x80
    lea rax, [rip + straddle_in]
    jmp rax
.balign 4096
.skip 4095, 0xcc
straddle_in:
    .byte 0x66, 0xe4, 0x80
    GUEST_SYNC 1
    ret
"""


def test_a_prefixed_in_raises_vc_mid_page_and_straddling() -> None:
    """On SEV-ES an IN with a 66 prefix raises #VC (SVM_EXIT_IOIO) at its prefix before it runs,
    in the middle of a page and with the prefix ending one, and the guest gets the VMM's
    answer through the GHCB (port 0x80 reads 0xff)."""
    trace = io.StringIO()
    report = run_guest("<in>", VmOptions(vm_type="sev-es", memory=16 << 20, seed=1, trace=trace), text=PREFIXED_IN)
    assert report.outcome == "done", report.detail
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    ioio = [e["rip"] for e in events if e["event"] == "vc" and e["error_code"] == 0x7B]
    assert len(ioio) == 2 and ioio[1] & 0xFFF == 0xFFF
    assert [e["value"] for e in events if e["event"] == "exit" and e.get("port") == 0x80] == [0xFF, 0xFF]


# The page of `site` run through the identity map, then through an alias: PML4[1] = PML4[0], so
# 0x8000000000 + x maps x. The frame is scanned (and hooked) at the first address.
ALIASED = """
guest_main:
    mov rdi, RT_PT_BASE
    mov rax, qword ptr [rdi]
    mov qword ptr [rdi + 8], rax
    mov rax, cr3
    mov cr3, rax
    lea rbx, [rip + site]
    call rbx
    GUEST_SYNC rax
    mov r12, 0x8000000000
    add rbx, r12
    call rbx
    GUEST_SYNC rax
    sub rbx, r12
    call rbx
    GUEST_SYNC rax
    ret
.balign 4096
site:
    mov ecx, 0xC0010131
    rdmsr
    ret
"""


class _WithoutScanVas:
    """A C fill as an extension older than set_scan_vas shows it (everything else delegated)."""

    def __init__(self, native: Any) -> None:
        self._native = native

    def __getattr__(self, name: str) -> Any:
        if name == "set_scan_vas":
            raise AttributeError(name)
        return getattr(self._native, name)


@pytest.mark.parametrize("fill", ["c", "python", "c-without-scan-vas"])
@pytest.mark.parametrize(("vm_type", "sev_status"), [("sev", 0x1), ("sev-snp", 0x7)])
def test_a_site_run_through_a_second_address_is_intercepted_there_too(vm_type: str, sev_status: int, fill: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A code frame fetched through a second guest-virtual page has its sites hooked there as
    well (hooks are per address; the frame was scanned at the first): the RDMSR of SEV_STATUS
    reads the hardware's value through the identity map, the alias, and the identity map again
    (Unicorn alone reads 0) - with the C fill, the Python fill (TESTBED_NO_NATIVE_MMU), and a C
    fill without set_scan_vas, whose fills all go to Python."""
    if fill == "python":
        monkeypatch.setenv("TESTBED_NO_NATIVE_MMU", "1")
    elif fill == "c-without-scan-vas":
        if unicorn_binding._nativemmu is None:
            pytest.fail("the C extension is part of the install")
        real = unicorn_binding._nativemmu.NativeMmu
        monkeypatch.setattr(unicorn_binding._nativemmu, "NativeMmu", lambda *a: _WithoutScanVas(real(*a)))
    report = run_guest("<alias>", VmOptions(vm_type=vm_type, memory=16 << 20, seed=1), text=ALIASED)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [sev_status] * 3
