"""Wrong-vendor hypercall instructions: KVM_X86_QUIRK_FIX_HYPERCALL_INSN on and off.

The four cases of tools/testing/selftests/kvm/x86/fix_hypercall_test.c, on both vendors:
1. the guest (guests/fix_hypercall.s) installs a #UD handler that counts its runs, sets
   RAX = -EFAULT and skips the 3-byte instruction, then makes KVM_HC_SCHED_YIELD with the
   native or the foreign instruction at `hypercall_site`;
2. it syncs RAX, the #UD count and the 3 bytes now at `hypercall_site`;
3. quirk on (the default): a foreign instruction is patched in guest memory to the native one
   and re-executed (emulator_fix_hypercall() in arch/x86/kvm/x86.c), so RAX = 0, no #UD;
   quirk off (KVM_CAP_DISABLE_QUIRKS2): the guest's #UD handler runs and the bytes stay;
   the native instruction is never touched, quirk or not.
The CLI's --no-fix-hypercall is the same switch, checked end to end.
"""

from __future__ import annotations

import json

import pytest
from guest_compat import far_return_to_64, far_return_to_compat, load_compat_segment

from testbed.cli import main
from testbed.hw.exits import Vendor
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program

GUEST = GUESTS_DIR / "fix_hypercall.s"
MEMORY = 16 << 20

VMCALL = b"\x0f\x01\xc1"
VMMCALL = b"\x0f\x01\xd9"
INSN_DEFINE = {VMCALL: 0, VMMCALL: 1}
EFAULT_RET = 0xFFFF_FFFF_FFFF_FFF2  # the selftest's guest_ud_handler sets RAX = -EFAULT

NATIVE = {Vendor.AMD: VMMCALL, Vendor.INTEL: VMCALL}
FOREIGN = {Vendor.AMD: VMCALL, Vendor.INTEL: VMMCALL}


def as_u24(insn: bytes) -> int:
    """The 3 instruction bytes as the guest reads them (little-endian, masked to 24 bits)."""
    return int.from_bytes(insn, "little")


def run_case(vendor: Vendor, insn: bytes, fix_hypercall: bool) -> tuple[int, int, int, bytes]:
    """Run the guest; returns (RAX, #UD count, bytes as the guest saw them, bytes as the host sees them)."""
    options = VmOptions(vendor=vendor, memory=MEMORY, timeout=5.0, fix_hypercall=fix_hypercall,
                        defines={"INSN": INSN_DEFINE[insn]})
    program = build_program(GUEST, options)
    machine = Machine(program, options)
    report = machine.run()
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    syncs = report.syncs()
    assert len(syncs) == 3, f"expected RAX, #UD count and bytes; got {[hex(s) for s in syncs]}"
    host_bytes = machine.memory.host_read(program.symbols["hypercall_site"], 3)
    return syncs[0], syncs[1], syncs[2], host_bytes


VENDORS = pytest.mark.parametrize("vendor", list(Vendor), ids=[v.value for v in Vendor])


@VENDORS
def test_quirk_on_patches_foreign_instruction(vendor: Vendor) -> None:
    """Quirk on: the foreign instruction is rewritten to the native bytes and the hypercall completes."""
    rax, uds, guest_view, host_view = run_case(vendor, FOREIGN[vendor], fix_hypercall=True)
    native = as_u24(NATIVE[vendor])
    assert uds == 0, f"#UD handler ran {uds} times; KVM should have fixed the instruction up"
    assert rax == 0, f"RAX = 0x{rax:x}, expected KVM_HC_SCHED_YIELD's 0"
    assert guest_view == native, f"bytes at hypercall_site 0x{guest_view:06x}, expected native 0x{native:06x}"
    assert host_view == NATIVE[vendor], f"guest memory holds {host_view.hex()}, expected {NATIVE[vendor].hex()}"


@VENDORS
def test_quirk_off_injects_ud_and_leaves_bytes(vendor: Vendor) -> None:
    """Quirk off: the guest's #UD handler runs once and the foreign bytes stay as written."""
    rax, uds, guest_view, host_view = run_case(vendor, FOREIGN[vendor], fix_hypercall=False)
    foreign = as_u24(FOREIGN[vendor])
    assert uds == 1, f"#UD handler ran {uds} times, expected once"
    assert rax == EFAULT_RET, f"RAX = 0x{rax:x}, expected the handler's -EFAULT 0x{EFAULT_RET:x}"
    assert guest_view == foreign, f"bytes at hypercall_site 0x{guest_view:06x}, expected unchanged 0x{foreign:06x}"
    assert host_view == FOREIGN[vendor]


@VENDORS
@pytest.mark.parametrize("fix_hypercall", [True, False], ids=["quirk_on", "quirk_off"])
def test_native_instruction_is_never_patched(vendor: Vendor, fix_hypercall: bool) -> None:
    """The native instruction makes the hypercall directly: no #UD, no rewrite, quirk on or off."""
    rax, uds, guest_view, host_view = run_case(vendor, NATIVE[vendor], fix_hypercall=fix_hypercall)
    native = as_u24(NATIVE[vendor])
    assert uds == 0, f"#UD handler ran {uds} times for the native instruction"
    assert rax == 0, f"RAX = 0x{rax:x}, expected 0"
    assert guest_view == native, f"bytes at hypercall_site 0x{guest_view:06x}, expected 0x{native:06x}"
    assert host_view == NATIVE[vendor]


@pytest.mark.parametrize("flag", [False, True], ids=["default", "no_fix_hypercall"])
def test_cli_no_fix_hypercall_flag(flag: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed run --no-fix-hypercall` disables the quirk: VMCALL on AMD then takes the guest's #UD."""
    argv = ["run", str(GUEST), "--vendor", "amd", "-D", "INSN=0", "--memory", "16M", "--timeout", "5", "--json"]
    if flag:
        argv.append("--no-fix-hypercall")
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, f"status {status}; stderr: {err}"
    assert "Traceback" not in err
    report = json.loads(out)
    syncs = [u["args"][0] for u in report["ucalls"] if u["cmd"] == "sync"]
    if flag:
        assert syncs == [EFAULT_RET, 1, as_u24(VMCALL)], f"syncs {[hex(s) for s in syncs]}"
    else:
        assert syncs == [0, 0, as_u24(VMMCALL)], f"syncs {[hex(s) for s in syncs]}"


# ------------------------------------------------------------ the foreign instruction at CPL 3

CPL3_GUEST = """
guest_main:
    push rbx
    mov rax, GUEST_FREE_GPA
    mov qword ptr [rax], 0
    mov qword ptr [rax + 8], 0
    mov qword ptr [rax + 16], 0xff
    GUEST_SET_HANDLER GP_VECTOR, guest_gp
    GUEST_SET_HANDLER UD_VECTOR, guest_ud
    GUEST_RUN_USER guest_user
    GUEST_SYNC rax
    mov rax, GUEST_FREE_GPA
    mov rbx, qword ptr [rax]
    GUEST_SYNC rbx
    mov rbx, qword ptr [rax + 8]
    GUEST_SYNC rbx
    mov rbx, qword ptr [rax + 16]
    GUEST_SYNC rbx
    lea rbx, [rip + hypercall_site]
    mov eax, dword ptr [rbx]
    and eax, 0xffffff
    GUEST_SYNC rax
    pop rbx
    ret

guest_user:
    mov rax, KVM_HC_VAPIC_POLL_IRQ
hypercall_site:
    INSN_MACRO
    ret

guest_gp:
    mov rax, GUEST_FREE_GPA
    inc qword ptr [rax]
    mov rcx, qword ptr [rdi + EX_ERROR_CODE]
    mov qword ptr [rax + 16], rcx
    mov qword ptr [rdi + EX_RAX], 0x777
    add qword ptr [rdi + EX_RIP], 3
    ret

guest_ud:
    mov rax, GUEST_FREE_GPA
    inc qword ptr [rax + 8]
    mov qword ptr [rdi + EX_RAX], 0x666
    add qword ptr [rdi + EX_RIP], 3
    ret
"""
EPERM_RET = 0xFFFF_FFFF_FFFF_FFFF


def run_cpl3(vendor: Vendor, insn: bytes, fix_hypercall: bool) -> tuple[list[int], bytes]:
    """Run CPL3_GUEST: syncs (RAX, #GP count, #UD count, #GP error code, bytes) and the host's bytes."""
    text = CPL3_GUEST.replace("INSN_MACRO", "VMCALL" if insn == VMCALL else "VMMCALL")
    options = VmOptions(vendor=vendor, memory=8 << 20, timeout=5.0, fix_hypercall=fix_hypercall)
    program = build_program("fix_hypercall_cpl3.s", options, text=text)
    machine = Machine(program, options)
    report = machine.run()
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    return report.syncs(), machine.memory.host_read(program.symbols["hypercall_site"], 3)


@pytest.mark.parametrize("fix_hypercall", [True, False], ids=["quirk_on", "quirk_off"])
def test_vmcall_at_cpl3_on_amd_is_gp(fix_hypercall: bool) -> None:
    """AMD, VMCALL at CPL 3: #GP(0) and nothing patched, quirk on or off — VMCALL is `Priv` in
    emulate.c's group7_rm0 and x86_emulate_insn() checks privilege before em_hypercall()."""
    syncs, host_bytes = run_cpl3(Vendor.AMD, VMCALL, fix_hypercall)
    assert syncs == [0x777, 1, 0, 0, as_u24(VMCALL)], f"syncs {[hex(s) for s in syncs]}"
    assert host_bytes == VMCALL


def test_vmmcall_at_cpl3_on_intel_is_patched_and_eperm() -> None:
    """Intel, VMMCALL at CPL 3: only `Prot` in group7_rm3, so it is patched to VMCALL and the
    re-executed hypercall returns -KVM_EPERM (the CPL check of ____kvm_emulate_hypercall())."""
    syncs, host_bytes = run_cpl3(Vendor.INTEL, VMMCALL, True)
    assert syncs == [EPERM_RET, 0, 0, 0xFF, as_u24(VMCALL)], f"syncs {[hex(s) for s in syncs]}"
    assert host_bytes == VMCALL


# ---------------------------------------------------------------- a fix-up write that faults

RO_SITE_GUEST = """
guest_main:
    push rbx
    mov rax, GUEST_FREE_GPA
    mov qword ptr [rax], 0
    mov qword ptr [rax + 8], 0
    GUEST_SET_HANDLER PF_VECTOR, guest_pf
    # Clear R/W in the PTE of hypercall_site's page (the runtime's 4 KiB identity tables).
    lea rdi, [rip + hypercall_site]
    call guest_pte_of
    and qword ptr [rax], -3
    lea rdi, [rip + hypercall_site]
    invlpg [rdi]
    mov rax, KVM_HC_VAPIC_POLL_IRQ
hypercall_site:
    VMCALL
    GUEST_SYNC rax
    mov rax, GUEST_FREE_GPA
    mov rbx, qword ptr [rax]
    GUEST_SYNC rbx
    mov rbx, qword ptr [rax + 8]
    GUEST_SYNC rbx
    lea rbx, [rip + hypercall_site]
    mov rax, GUEST_FREE_GPA
    mov rcx, qword ptr [rax + 16]
    sub rcx, rbx
    GUEST_SYNC rcx
    pop rbx
    ret

# rax = address of the PTE mapping rdi (walks CR3's 4-level tables; identity-mapped). Clobbers
# rcx, rdx, r8.
guest_pte_of:
    mov rax, cr3
    mov rcx, 39
    movabs r8, 0x000ffffffffff000
guest_pte_loop:
    and rax, r8
    mov rdx, rdi
    shr rdx, cl
    and rdx, 0x1ff
    lea rax, [rax + rdx * 8]
    cmp rcx, 12
    je guest_pte_done
    mov rax, qword ptr [rax]
    sub rcx, 9
    jmp guest_pte_loop
guest_pte_done:
    ret

# #PF: count it, record the error code and CR2, and skip the instruction (its bytes stay).
guest_pf:
    mov rax, GUEST_FREE_GPA
    inc qword ptr [rax]
    mov rcx, qword ptr [rdi + EX_ERROR_CODE]
    mov qword ptr [rax + 8], rcx
    mov rcx, cr2
    mov qword ptr [rax + 16], rcx
    mov qword ptr [rdi + EX_RAX], 0x555
    add qword ptr [rdi + EX_RIP], 3
    ret
"""


def test_fix_up_write_to_read_only_page_injects_pf() -> None:
    """AMD, quirk on, VMCALL on a read-only page: emulator_fix_hypercall()'s
    emulator_write_emulated() faults, so the guest gets #PF (error code P|W = 3, CR2 = the
    instruction) and the bytes stay VMCALL."""
    options = VmOptions(vendor=Vendor.AMD, memory=8 << 20, timeout=5.0)
    program = build_program("fix_hypercall_ro.s", options, text=RO_SITE_GUEST)
    machine = Machine(program, options)
    report = machine.run()
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    assert report.syncs() == [0x555, 1, 3, 0], f"syncs {[hex(s) for s in report.syncs()]}"
    assert machine.memory.host_read(program.symbols["hypercall_site"], 3) == VMCALL


def test_fix_up_decodes_at_cs_base_plus_rip_and_patches_at_rip() -> None:
    """In a 32-bit code segment with a non-zero base the emulator decodes the VMCALL at CS.base +
    EIP, but emulator_fix_hypercall() writes the native bytes at kvm_rip_read() - EIP itself, not
    the instruction (x86.c): the guest re-executes the unpatched VMCALL, and KVM patches EIP
    again, never returning from KVM_RUN (here: until the timeout)."""
    base = 0x1000
    text = ("guest_main:\n    push rbx\n" + load_compat_segment(base) + "    mov eax, KVM_HC_VAPIC_POLL_IRQ\n"
            + far_return_to_compat("compat", base) + "compat:\n    .byte 0x0f, 0x01, 0xc1\n"
            + far_return_to_64("back64") + "back64:\n    GUEST_SYNC rax\n    pop rbx\n    ret\n")
    options = VmOptions(vendor=Vendor.AMD, memory=8 << 20, timeout=0.1)
    program = build_program("compat_fix.s", options, text=text)
    site = program.symbols["compat"]
    with Machine(program, options) as machine:
        report = machine.run()
        assert report.outcome == "timeout", report.detail
        assert machine.memory.host_read(site, 3) == b"\x0f\x01\xc1"  # the VMCALL itself: unpatched
        assert machine.memory.host_read(site - base, 3) == b"\x0f\x01\xd9"  # EIP as a linear address
