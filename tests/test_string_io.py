"""Tests for string port I/O (INS/OUTS, testbed/x86/pio.py): intercepted at their address on
every VM type, emulated by KVM on a plain VM (emulate.c), #UD on SEV (KVM cannot decode them),
through #VC and the GHCB on SEV-ES/SNP (the runtime as Linux's vc_handle_ioio, sev.c
sev_es_string_io), and a #VE the TD's runtime refuses as Linux's handle_io does."""

from __future__ import annotations

from typing import Any

import pytest

import testbed
from testbed.machine import VmOptions
from testbed.x86.pio import IoInsn, decode_io

STRING_IO = """
guest_main:
    mov dx, 0x80
    lea rsi, [rip + src]
    mov rcx, 5
    rep outsb                          # A B C D E
    lea rax, [rip + src]
    sub rsi, rax
    GUEST_SYNC rsi                     # 5
    GUEST_SYNC rcx                     # 0
    mov dx, 0x80
    lea rdi, [rip + dst]
    mov rcx, 3
    rep insw                           # three words into dst
    lea rax, [rip + dst]
    sub rdi, rax
    GUEST_SYNC rdi                     # 6
    mov rax, qword ptr [rip + dst]
    GUEST_SYNC rax
    mov dx, 0x80
    lea rsi, [rip + src + 4]
    mov rcx, 2
    std
    rep outsb                          # backwards: E D
    cld
    lea rax, [rip + src]
    sub rsi, rax
    GUEST_SYNC rsi                     # 2
    mov dx, 0x80
    lea rsi, [rip + src]
    mov rcx, 7
    outsd                              # no REP: one element, RCX kept
    GUEST_SYNC rcx                     # 7
    mov dx, 0x80
    lea rdi, [rip + dst]
    xor ecx, ecx
    rep insb                           # REP with RCX = 0: nothing moves, no exit
    lea rax, [rip + dst]
    sub rdi, rax
    GUEST_SYNC rdi                     # 0
    ret
src:
    .byte 0x41, 0x42, 0x43, 0x44, 0x45
dst:
    .quad 0
"""
SYNCS = [5, 0, 6, 0x665544332211, 2, 7, 0]


def run_string_io(vm_type: str, vendor: str) -> tuple[list[tuple[str, int, int, bytes]], Any]:
    """Run STRING_IO, answering the INS with 11 22 33 44 55 66: the port-0x80 exits (direction,
    size, count, data) and the run's ucalls, or the report when the run ends otherwise."""
    exits: list[tuple[str, int, int, bytes]] = []
    syncs: list[int] = []
    with testbed.Vm(vm_type=vm_type, vendor=vendor, memory=16 << 20) as vm:
        vcpu = vm.load("string_io.s", text=STRING_IO)
        while True:
            match exit := vcpu.run():
                case testbed.IoOutExit(port=0x80, size=size, count=count, data=data):
                    exits.append(("out", size, count, data))
                case testbed.IoInExit(port=0x80, size=size, count=count):
                    exits.append(("in", size, count, b""))
                    exit.data = bytes.fromhex("112233445566")[: size * count]
                case _:
                    try:
                        ucall = vm.handle(exit)
                    except testbed.VmExitError as error:
                        return exits, error
                    if ucall is not None and ucall.cmd == "done":
                        return exits, syncs
                    if ucall is not None:
                        syncs.append(ucall.args[0])


@pytest.mark.parametrize("vendor", ["amd", "intel"])
def test_kvm_emulates_string_io_on_a_plain_vm(vendor: str) -> None:
    """On a plain VM KVM's emulator runs INS/OUTS (io_interception / handle_io ->
    kvm_emulate_instruction): OUTS exits once per element with the byte read at RSI (em_out,
    count 1; it used to send RAX's byte), forwards and with DF backwards; REP INSW exits once
    for all three words (pio_in_emulated's read-ahead) and writes them at RDI; RSI/RDI/RCX move
    as the instruction does; REP with RCX = 0 exits not at all."""
    exits, syncs = run_string_io("default", vendor)
    assert exits == [("out", 1, 1, b"A"), ("out", 1, 1, b"B"), ("out", 1, 1, b"C"), ("out", 1, 1, b"D"),
                     ("out", 1, 1, b"E"), ("in", 2, 3, b""), ("out", 1, 1, b"E"), ("out", 1, 1, b"D"),
                     ("out", 4, 1, b"ABCD")]
    assert syncs == SYNCS


@pytest.mark.parametrize("vm_type", ["sev-es", "sev-snp"])
def test_string_io_goes_through_the_ghcb_on_sev_es(vm_type: str) -> None:
    """On SEV-ES/SNP an INS/OUTS raises #VC (SVM_EXIT_IOIO with STR); the runtime moves the
    elements through the GHCB's shared buffer as Linux's vc_handle_ioio does, and KVM exits
    once per VMGEXIT with all of them (sev.c sev_es_string_io -> kvm_sev_es_outs/ins): five
    bytes in one exit, two backwards (E D), three words in; the registers end as the
    instruction leaves them (it ran natively before, unseen by the GHCB)."""
    exits, syncs = run_string_io(vm_type, "amd")
    assert exits == [("out", 1, 5, b"ABCDE"), ("in", 2, 3, b""), ("out", 1, 2, b"ED"), ("out", 4, 1, b"ABCD")]
    assert syncs == SYNCS


def test_string_io_on_sev_is_ud() -> None:
    """An SEV guest's INS/OUTS is #UD: KVM must emulate string I/O but gets no instruction
    bytes with the IOIO exit and reads only ciphertext (svm.c svm_check_emulate_instruction:
    "inject #UD if KVM reached this point without an instruction buffer"), which is why Linux
    unrolls string I/O in SEV guests (CC_ATTR_GUEST_UNROLL_STRING_IO)."""
    exits, error = run_string_io("sev", "amd")
    assert exits == []
    assert isinstance(error, testbed.VmExitError) and error.outcome == "unhandled_exception"
    assert "unexpected #UD" in error.detail and "(guest_main+0x" in error.detail


def test_string_io_in_a_td_is_a_ve_the_runtime_refuses() -> None:
    """In a TD an INS/OUTS is a #VE (EXIT_REASON_IO_INSTRUCTION, 30, string bit set), which the
    runtime refuses as Linux's handle_io does (VE_IS_IO_STRING: -EIO): reported unhandled."""
    exits, error = run_string_io("tdx", "intel")
    assert exits == []
    assert isinstance(error, testbed.VmExitError) and error.outcome == "unhandled_exception"
    assert "unexpected #VE (exit reason 30) at rip" in error.detail


@pytest.mark.parametrize(("code", "long_mode", "expected"), [
    (b"\xf3\x6e", True, IoInsn(0x80, 1, 2, False, string=True, rep=True, addr_size=8, segment=3)),
    (b"\x66\xf3\x6d", True, IoInsn(0x80, 2, 3, True, string=True, rep=True, addr_size=8, segment=0)),
    (b"\x67\x2e\x6f", True, IoInsn(0x80, 4, 3, False, string=True, addr_size=4, segment=1)),
    (b"\x67\xf2\x6c", False, IoInsn(0x80, 1, 3, True, string=True, rep=True, addr_size=2, segment=0)),
    (b"\x66\xe5\x71", True, IoInsn(0x71, 2, 3, True)),
], ids=["rep-outsb", "rep-insw", "67-cs-outsd", "32-bit-67-repne-insb", "in-ax-imm8"])
def test_decode_io_reads_size_address_size_rep_and_segment(code: bytes, long_mode: bool,
                                                           expected: IoInsn) -> None:
    """The decoder takes the size from the opcode and 66, the address size from the mode and 67,
    REP from F3 or F2, and the segment from the last override (OUTS) or ES (INS)."""
    prefixes = len(code) - (2 if code[-2] in (0xE4, 0xE5, 0xE6, 0xE7) else 1)
    assert decode_io(code, prefixes, long_mode, 0x12340080) == expected


MEMORY = 16 << 20  # nothing is mapped from here: a #PF at the first byte past it
FAULTING_INS = f"""
guest_main:
    GUEST_SET_HANDLER PF_VECTOR, guest_pf
    mov dx, 0x80
    mov rdi, {MEMORY} - 8
    mov rcx, 16
    rep insd                           # 8 dwords read ahead, the 3rd past the end of memory
    GUEST_FAIL "no #PF"
guest_pf:
    mov rax, cr2
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + EX_RDI]
    GUEST_SYNC rax
    mov rax, qword ptr [rdi + EX_RCX]
    GUEST_SYNC rax
    GUEST_DONE
"""


def test_a_forward_rep_ins_that_faults_leaves_rdi_and_rcx_and_writes_the_first_page() -> None:
    """A forward REP INS writes its whole read-ahead at once (emulate.c pio_in_emulated:
    OP_MEM_STR): when that write faults at the end of memory, the bytes before it are written
    (emulator_read_write splits at the page end), #PF has CR2 there, and RDI and RCX are as
    they were (writeback is skipped); the one exit read ahead 8 dwords."""
    with testbed.Vm(memory=MEMORY) as vm:
        vcpu = vm.load("ins.s", text=FAULTING_INS)
        exit = vcpu.run()
        assert isinstance(exit, testbed.IoInExit) and (exit.port, exit.size, exit.count) == (0x80, 4, 8)
        exit.data = bytes(range(1, 33))
        assert [vcpu.run_to_ucall().args[0] for _ in range(3)] == [MEMORY, MEMORY - 8, 16]
        assert vm.read(MEMORY - 8, 8) == bytes(range(1, 9))


ZERO_COUNT_67 = """
guest_main:
    mov rcx, 0x100000000               # ECX = 0
    lea rdi, [rip + guest_main]
    .byte 0x67, 0xf3, 0x6c             # REP INSB with 32-bit addresses: nothing moves
    GUEST_SYNC rcx
    ret
"""


@pytest.mark.parametrize(("vendor", "rcx"), [("amd", 0x100000000), ("intel", 0)])
def test_rep_ins_with_ecx_zero_clears_rcx_on_intel(vendor: str, rcx: int) -> None:
    """REP with a 32-bit count of 0 moves nothing and exits not at all; on an Intel guest KVM's
    emulator also clears RCX (emulate.c string_registers_quirk), on AMD RCX is kept."""
    report = testbed.run_guest("zero.s", VmOptions(vendor=vendor, memory=16 << 20), text=ZERO_COUNT_67)
    assert report.outcome == "done", report.detail
    assert report.syncs() == [rcx]
    assert not [e for e in report.user_exits if e.get("port") == 0x80]


def test_a_rep_ins_that_unmaps_its_own_code_gets_the_fetch_pf() -> None:
    """A REP INS that overwrites the guest's page tables makes KVM's decode of the next INS
    exit fault: x86_emulate_instruction() injects that fetch #PF (here its delivery fails too:
    a triple fault), rather than an emulation failure about bytes that are no INS/OUTS."""
    text = ("guest_main:\n    mov dx, 0x80\n    mov rdi, 0x300000\n    mov rcx, 0x400000\n    rep insb\n"
            "    ret\n")
    report = testbed.run_guest("<ins>", VmOptions(memory=16 << 20, timeout=5.0), text=text)
    assert report.outcome == "shutdown", f"{report.outcome}: {report.detail}"
