"""Hostile guests end as KVM ends them: page tables outside memory, 32-bit code with a CS base,
malformed ucalls. Each is checked through the Python API and `testbed run --json`."""

from __future__ import annotations

import ctypes
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import unicorn
from guest_compat import far_return_to_compat, load_compat_segment
from unicorn import unicorn_const as ucc
from unicorn import x86_const as ux

from testbed.api import Vm, run_report
from testbed.cli import main
from testbed.hw.cpu import _CAL_GDT, cs_base_offset, hflags_offset
from testbed.hw.exits import EPT_QUAL_GLA_VALID, EPT_QUAL_READ, NPF_GUEST_PAGE, SvmExitCode, VmxExitReason
from testbed.kvm.uapi import KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION
from testbed.machine import VmOptions, build_program, run_guest
from testbed.vmm.vmm import RunReport
from testbed.x86 import Reg

ALL_TYPES = ["default", "sw-protected", "sev", "sev-es", "sev-snp"]
PLAIN = ["default", "sw-protected"]
SEV_TYPES = ["sev", "sev-es", "sev-snp"]
MEMORY = 8 << 20
OUTSIDE = 0x40000000  # 1 GiB: far beyond the 8 MiB of guest memory

CR3_OUTSIDE = f"""
guest_main:
    mov rax, {OUTSIDE:#x}
    mov cr3, rax
stuck:
    nop
    ret
"""

# PML4[1] (VAs 512 GiB..1 TiB) points at a PDPT outside guest memory; then a read through it.
TABLE_OUTSIDE = """
guest_main:
    mov rax, cr3
    mov rcx, 0xfffff000
    and rax, rcx
    mov rbx, qword ptr [rax]
    and rbx, 0xfff
    movabs rcx, 0x7ffffff000
    or rbx, rcx
    mov qword ptr [rax + 8], rbx
    movabs rdx, 0x8000000010
stuck:
    mov rdx, qword ptr [rdx]
    ret
"""

COMPAT_BASE = 0x10000


def compat_guest(code: str) -> str:
    """Far-return into a 32-bit code segment with base COMPAT_BASE, then run `code` there."""
    return ("guest_main:\n" + load_compat_segment(COMPAT_BASE) + far_return_to_compat("compat_code", COMPAT_BASE)
            + f"compat_code:\n    {code}\n    ret\n")


def ucall_guest(cmd: int, nargs: int, address: str = "UCALL_GPA") -> str:
    """A hand-made ucall: the message at UCALL_GPA, signalled with `address`."""
    return f"""
guest_main:
    mov rdi, UCALL_GPA
    movabs rax, {cmd:#x}
    mov qword ptr [rdi], rax
    movabs rax, {nargs:#x}
    mov qword ptr [rdi + 8], rax
    mov eax, {address}
    mov dx, UCALL_PORT
    out dx, eax
    ret
"""


def run(text: str, vm_type: str, timeout: float = 5.0) -> RunReport:
    return run_guest("<hostile>", VmOptions(vm_type=vm_type, memory=MEMORY, timeout=timeout, seed=1), text=text)


def cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, vm_type: str,
             timeout: str = "5") -> tuple[int, dict[str, object]]:
    path = tmp_path / "hostile.s"
    path.write_text(text, encoding="utf-8")
    status = main(["run", str(path), "--vm-type", vm_type, "--memory", "8M", "--timeout", timeout, "--json"])
    return status, json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ page tables outside memory
@pytest.mark.parametrize("vm_type", PLAIN)
def test_cr3_outside_memory_ends_as_an_event_delivery_error(vm_type: str) -> None:
    """CR3 outside RAM: the fetch's walk NPFs, KVM's emulator injects #PF (paging_tmpl.h
    FNAME(walk_addr_generic), no memslot -> error), delivering it NPFs again and KVM exits with
    KVM_INTERNAL_ERROR_DELIVERY_EV (svm.c svm_check_emulate_instruction, x86.c
    kvm_prepare_event_vectoring_exit)."""
    report = run(CR3_OUTSIDE, vm_type)
    assert report.outcome == "internal_error", report.detail
    assert report.detail == f"delivering vector 14 touched gpa {OUTSIDE:#x} outside guest memory"
    internal = report.extra["internal"]
    assert internal["suberror"] == KVM_INTERNAL_ERROR_DELIVERY_EV
    info2, reason, info1, gpa, cpu = internal["data"]
    assert (info2, reason, gpa, cpu) == (OUTSIDE, SvmExitCode.SVM_EXIT_NPF, OUTSIDE, 0)
    assert info1 & NPF_GUEST_PAGE
    assert report.user_exits[-1]["reason"] == "internal_error"


@pytest.mark.parametrize("vm_type", PLAIN)
def test_cr3_outside_memory_on_intel_reports_the_vmx_exit_info(vm_type: str) -> None:
    """On VMX, kvm_prepare_event_vectoring_exit() fills the data from vmx_get_exit_info(): info2
    is the IDT-vectoring information (the #PF being delivered, with its error code), the reason
    EXIT_REASON_EPT_VIOLATION and info1 the exit qualification (a read of a paging-structure
    entry: the linear address valid, not the translated one), not SVM's EXITINFO layout."""
    report = run_guest("<hostile>", VmOptions(vm_type=vm_type, vendor="intel", memory=MEMORY, timeout=5, seed=1),
                       text=CR3_OUTSIDE)
    assert report.outcome == "internal_error", report.detail
    internal = report.extra["internal"]
    assert internal["suberror"] == KVM_INTERNAL_ERROR_DELIVERY_EV
    info2, reason, info1, gpa, cpu = internal["data"]
    # valid | error code valid | hardware exception | vector 14
    assert (info2, reason, gpa, cpu) == (0x80000B0E, VmxExitReason.EXIT_REASON_EPT_VIOLATION, OUTSIDE, 0)
    assert info1 == EPT_QUAL_READ | EPT_QUAL_GLA_VALID  # bit 8 clear: a paging-structure access


@pytest.mark.parametrize("vm_type", PLAIN)
def test_page_table_outside_memory_injects_not_present_pf(vm_type: str) -> None:
    """A PDPT outside RAM: KVM's emulator walk fails there and injects #PF with the access bits
    only (error code 0 for a supervisor read), which the guest's handler reports
    (paging_tmpl.h FNAME(walk_addr_generic); x86.c x86_emulate_instruction)."""
    trace = io.StringIO()
    report = run_guest("<hostile>", VmOptions(vm_type=vm_type, memory=MEMORY, timeout=5, trace=trace),
                       text=TABLE_OUTSIDE)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (14, 0)
    injected = [e for e in map(json.loads, trace.getvalue().splitlines()) if e["event"] == "inject_pf"]
    assert [(e["gva"], e["error_code"]) for e in injected] == [(0x8000000010, 0)]  # CR2 = the address read


@pytest.mark.parametrize("text", [CR3_OUTSIDE, TABLE_OUTSIDE], ids=["cr3", "table"])
@pytest.mark.parametrize("vm_type", SEV_TYPES)
def test_page_table_outside_memory_livelocks_an_sev_guest(vm_type: str, text: str) -> None:
    """SEV guests: KVM cannot emulate, svm_check_emulate_instruction() returns
    X86EMUL_RETRY_INSTR for a #NPF on a guest page-table access, so KVM_RUN never returns and
    the run ends at its timeout, with no exit to userspace after the guest's last one: the
    vCPU still stands at the access that faults (`stuck`)."""
    with Vm(VmOptions(vm_type=vm_type, memory=MEMORY, timeout=5, seed=1)) as vm:
        vcpu = vm.load("<hostile>", text=text)  # booted to guest_main, outside the run's timeout
        exits_at_main = list(vm.machine.vmm.report.user_exits)
        report = run_report(vm, vcpu, 0.1)
        assert report.outcome == "timeout", report.detail
        assert report.detail == "guest did not finish within 0.1 s"
        assert report.user_exits == exits_at_main
        assert all(e["reason"] != "internal_error" for e in report.user_exits)
        assert report.exception is None
        assert vm.machine.cpu.read_reg(Reg.RIP) == vm.machine.program.symbols["stuck"]


@pytest.mark.parametrize("vm_type", ALL_TYPES)
def test_page_tables_outside_memory_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   vm_type: str) -> None:
    """`testbed run --json` prints the same outcome for CR3 outside RAM and exits 1 (3 on timeout)."""
    status, out = cli_json(tmp_path, capsys, CR3_OUTSIDE, vm_type, timeout="0.1")
    if vm_type in PLAIN:
        assert (status, out["outcome"]) == (1, "internal_error")
        assert out["internal"] == {"suberror": KVM_INTERNAL_ERROR_DELIVERY_EV,
                                   "data": [OUTSIDE, 0x400, out["internal"]["data"][2], OUTSIDE, 0]}  # type: ignore[index]
    else:
        assert (status, out["outcome"]) == (3, "timeout")


# ------------------------------------------------------------------ 32-bit code with a CS base
@pytest.mark.parametrize("vm_type", ALL_TYPES)
def test_ud_in_32bit_code_with_a_cs_base(vm_type: str) -> None:
    """UD2 in a 32-bit segment based at 64 KiB: #UD at the segment-relative RIP, delivered to the
    64-bit handler (SDM vol. 3 6.14: the frame holds RIP, not the linear address)."""
    text = compat_guest(".byte 0x0f, 0x0b")
    report = run(text, vm_type)
    program = build_program("<hostile>", VmOptions(vm_type=vm_type, memory=MEMORY, seed=1), text=text)
    ud2 = program.symbols["compat_code"]
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception == {"vector": 6, "error_code": None, "rip": ud2 - COMPAT_BASE}  # segment-relative


@pytest.mark.parametrize("vm_type", SEV_TYPES)
def test_ud_explanation_in_32bit_code_reads_at_the_linear_address(vm_type: str) -> None:
    """The #UD explanation (what the host would read at the instruction) of UD2 in a 32-bit
    segment based at 64 KiB translates CS.base + RIP: the GPA is the instruction's own page, the
    RIP the segment-relative one the guest sees."""
    text = compat_guest(".byte 0x0f, 0x0b")
    report = run(text, vm_type)
    program = build_program("<hostile>", VmOptions(vm_type=vm_type, memory=MEMORY, seed=1), text=text)
    ud2 = program.symbols["compat_code"]
    (explanation,) = report.extra["ud_host_view"]
    assert (explanation["rip"], explanation["gpa"]) == (ud2 - COMPAT_BASE, ud2)  # identity map: GPA = linear
    assert explanation["guest_bytes"][:4] == "0f0b"


@pytest.mark.parametrize("vm_type", ALL_TYPES)
def test_hypercall_from_32bit_code_with_a_cs_base(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 vm_type: str) -> None:
    """VMMCALL at CS.base + RIP runs as a hypercall (the bytes are read at the linear address),
    then UD2 three bytes later is the guest's #UD; the CLI reports the same."""
    text = compat_guest(".byte 0x0f, 0x01, 0xd9, 0x0f, 0x0b")
    report = run(text, vm_type)
    plain_ud = run(compat_guest(".byte 0x0f, 0x0b"), vm_type)
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None and plain_ud.exception is not None
    assert (report.exception["vector"], report.exception["rip"]) == (6, plain_ud.exception["rip"] + 3)
    status, out = cli_json(tmp_path, capsys, text, vm_type)
    assert (status, out["outcome"], out["exception"]["vector"]) == (1, "unhandled_exception", 6)  # type: ignore[index]


@pytest.mark.parametrize("vm_type", ALL_TYPES)
def test_hlt_in_32bit_code_with_a_cs_base(vm_type: str) -> None:
    """HLT in a 32-bit segment based at 64 KiB is the HLT exit 64-bit code gets (Unicorn ends the
    run after it; the byte before RIP is read at CS.base + RIP - 1), not an emulator error."""
    compat = run(compat_guest(".byte 0xf4"), vm_type)
    flat = run("guest_main:\n    hlt\n    GUEST_DONE\n", vm_type)
    assert (compat.outcome, compat.detail) == (flat.outcome, flat.detail), compat.detail
    assert compat.outcome == "timeout" and "halted" in compat.detail


def _compat_context(base: int) -> tuple[Any, int]:
    uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
    uc.mem_map(0, 0x20000)
    gdt = (*_CAL_GDT, 0x00CF9B000000FFFF | (base << 16))
    uc.mem_write(0x1000, struct.pack(f"<{len(gdt)}Q", *gdt))
    uc.reg_write(ux.UC_X86_REG_GDTR, (0, 0x1000, 8 * len(gdt) - 1, 0))
    uc.reg_write(ux.UC_X86_REG_CS, 0x08)
    uc.mem_write(0x8000 - 16, struct.pack("<2Q", 0x10, 0x28))
    uc.reg_write(ux.UC_X86_REG_RSP, 0x8000 - 16)
    uc.mem_write(0x2000, b"\x48\xcb")  # retfq to 0x28:0x10
    uc.mem_write(base + 0x10, b"\x90\xf4")
    uc.emu_start(0x2000, base + 0x11)
    return uc, int(uc.reg_read(ux.UC_X86_REG_CS))


def test_canary_cs_write_changes_only_the_selector() -> None:
    """Canary: after a far return to 32-bit code based at 64 KiB, a CS write of the 64-bit
    selector leaves QEMU's HF_CS64 clear and CS.base at 64 KiB (why delivery patches both)."""
    uc, cs = _compat_context(0x10000)
    assert cs == 0x28
    uc.reg_write(ux.UC_X86_REG_CS, 0x08)
    ctx = uc.context_save()
    addr = ctypes.cast(ctx._context, ctypes.c_void_p).value
    assert addr is not None
    assert not ctypes.c_uint32.from_address(addr + hflags_offset()).value & (1 << 15)
    assert ctypes.c_uint64.from_address(addr + cs_base_offset()).value == 0x10000


# ------------------------------------------------------------------ malformed ucalls
@pytest.mark.parametrize("vm_type", ALL_TYPES)
@pytest.mark.parametrize(("cmd", "nargs", "address", "detail", "reason"), [
    (99, 0, "UCALL_GPA", "ucall at 0x1000: unknown command 99 (known: 1-5)", "unknown command 99"),
    (1, 7, "UCALL_GPA", "ucall at 0x1000 claims 7 arguments (at most 6); cmd 0x1", None),
    (1, 0, "0x7fffc4", "ucall address 0x7fffc4 is outside guest memory", None),
    (3, 0, "UCALL_GPA", "ucall at 0x1000: UCALL_PRINTF is not supported: the testbed's struct ucall carries no "
     "string buffer", "UCALL_PRINTF is not supported: the testbed's struct ucall carries no string buffer"),
], ids=["unknown-command", "too-many-args", "bad-address", "printf"])
def test_malformed_ucall_is_the_guests_failure(vm_type: str, cmd: int, nargs: int, address: str,
                                               detail: str, reason: str | None) -> None:
    """A ucall the host cannot take ends the run as `bad_ucall` naming what is wrong, never an
    internal error (the VMM's protocol, vmm/ucall.py)."""
    report = run(ucall_guest(cmd, nargs, address), vm_type)
    assert report.outcome == "bad_ucall", report.detail
    assert report.detail == detail
    gpa = 0x1000 if address == "UCALL_GPA" else int(address, 16)
    assert report.extra["bad_ucall"] == {"gpa": gpa, "reason": reason or detail}
    assert all(e["reason"] != "internal_error" for e in report.user_exits)


@pytest.mark.parametrize("vm_type", ["default", "sev-es"])
def test_malformed_ucall_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], vm_type: str) -> None:
    """`testbed run --json`: outcome bad_ucall, exit status 1 (a guest failure)."""
    status, out = cli_json(tmp_path, capsys, ucall_guest(1, 7), vm_type)
    assert (status, out["outcome"]) == (1, "bad_ucall")
    assert "claims 7 arguments" in str(out["detail"])


def test_final_access_outside_memory_is_an_emulation_error() -> None:
    """A data access to a GPA with no memslot (PDPT entry 511: a 1 GiB page at 1 GiB): KVM would exit
    with KVM_EXIT_MMIO; with no MMIO modelled the testbed ends with KVM_EXIT_INTERNAL_ERROR,
    suberror emulation (a deliberate deviation, README)."""
    text = f"""
guest_main:
    mov rax, cr3
    mov rcx, 0xfffff000
    and rax, rcx
    mov rax, qword ptr [rax]
    and rax, rcx
    mov rbx, {OUTSIDE | 0x83:#x}
    mov qword ptr [rax + 8 * 511], rbx
    movabs rdx, 0x7fc0000000
    mov rdx, qword ptr [rdx]
    ret
"""
    report = run(text, "default")
    assert report.outcome == "internal_error", report.detail
    assert report.extra["internal"]["suberror"] == KVM_INTERNAL_ERROR_EMULATION
    assert report.detail == f"guest access to gpa {OUTSIDE:#x} outside guest memory"
