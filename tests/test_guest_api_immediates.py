"""The guest API's value operands (guests/lib/prelude.s, testbed/asm.py): every 64-bit immediate
and every general-purpose register width reaches the host exactly, or is refused at assembly
time at the line of the call, or (where the value is only known to Keystone) fails at run
time at that line. Never a silent wrong answer.

The sweeps run one guest per macro with every boundary value in it (memory=8 MiB). The
canaries at the end pin the Keystone 0.9.2 facts the prelude and asm.py work around.
"""

from __future__ import annotations

from typing import Any

import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError

from testbed.errors import AsmError
from testbed.machine import VmOptions, build_program, run_guest
from testbed.vmm.vmm import RunReport

MEMORY = 8 << 20
MASK = (1 << 64) - 1

# (operand text, the 64-bit value it denotes). LATER is defined after its uses, as a symbol
# Keystone knows only at the end; -KVM_ENOSYS is a prelude constant behind an operator.
VALUES: list[tuple[str, int]] = [
    ("0", 0),
    ("0x7fffffff", 0x7FFFFFFF),
    ("0x80000000", 0x80000000),
    ("0xffffffff", 0xFFFFFFFF),
    ("0x100000000", 1 << 32),
    ("0x8000000000000000", 1 << 63),
    ("0xffffffffffffffff", MASK),
    ("-1", MASK),
    ("-0x80000000", -0x80000000 & MASK),
    ("-0x8000000000000000", 1 << 63),
    ("-KVM_ENOSYS", -1000 & MASK),
    ("LATER", 0x80000000),
]
LATER_DEFINITION = ".equ LATER, 0x80000000\n"


def run(text: str, **options: Any) -> RunReport:
    return run_guest("api.s", VmOptions(memory=MEMORY, timeout=10.0, **options), text=text)


def guest(body: str) -> str:
    return "guest_main:\n" + body + "    ret\n" + LATER_DEFINITION


def assert_done(report: RunReport) -> None:
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"


def refused(body: str) -> str:
    """The assembly error's text for a guest `body` (which must be refused at line 2)."""
    with pytest.raises(AsmError) as excinfo:
        build_program("api.s", VmOptions(memory=MEMORY), text=guest(body))
    assert (excinfo.value.file, excinfo.value.line) == ("api.s", 2), str(excinfo.value)
    return excinfo.value.message


# --------------------------------------------------------------------------------------------
# GUEST_SYNC
# --------------------------------------------------------------------------------------------


def test_guest_sync_carries_every_64_bit_immediate() -> None:
    """GUEST_SYNC IMM reports the immediate's full 64-bit value, for every boundary value."""
    report = run(guest("".join(f"    GUEST_SYNC {text}\n" for text, _ in VALUES)))
    assert_done(report)
    assert report.syncs() == [value for _, value in VALUES]


def test_guest_sync_zero_extends_narrow_registers() -> None:
    """GUEST_SYNC of a 32/16/8-bit register reports it zero-extended; rsp is the caller's."""
    body = """\
    movabs rax, 0x1122334455667788
    movabs r9, 0x99aabbccddeeff00
    mov rbx, rsp
    GUEST_SYNC rax
    GUEST_SYNC eax
    GUEST_SYNC ax
    GUEST_SYNC al
    GUEST_SYNC ah
    GUEST_SYNC r9d
    GUEST_SYNC r9w
    GUEST_SYNC r9b
    GUEST_SYNC EAX
    GUEST_SYNC rsp
    GUEST_SYNC rbx
    GUEST_SYNC spl
"""
    report = run(guest(body))
    assert_done(report)
    *values, rsp, rbx, spl = report.syncs()
    assert values == [0x1122334455667788, 0x55667788, 0x7788, 0x88, 0x77, 0xDDEEFF00, 0xFF00, 0x00, 0x55667788]
    assert rsp == rbx and spl == rbx & 0xFF


# --------------------------------------------------------------------------------------------
# GUEST_ASSERT_EQ
# --------------------------------------------------------------------------------------------


def test_guest_assert_eq_passes_for_every_64_bit_immediate_either_side() -> None:
    """GUEST_ASSERT_EQ reg, IMM and IMM, reg pass when the register holds the value (every boundary value)."""
    body = "".join(
        f"    movabs rax, {value:#x}\n    GUEST_ASSERT_EQ rax, {text}\n    GUEST_ASSERT_EQ {text}, rax\n"
        f"    GUEST_ASSERT_EQ {text}, {text}\n"
        for text, value in VALUES
    )
    report = run(guest(body + "    GUEST_SYNC 0x600d\n"))
    assert_done(report)
    assert report.syncs() == [0x600D]


@pytest.mark.parametrize(("text", "value"), VALUES, ids=[text for text, _ in VALUES])
def test_guest_assert_eq_fails_with_both_values_when_they_differ(text: str, value: int) -> None:
    """A GUEST_ASSERT_EQ rax, IMM with rax one bit off reports both full values and the assert's line."""
    report = run(guest(f"    movabs rax, {value ^ 1:#x}\n    GUEST_ASSERT_EQ rax, {text}\n"))
    assert report.outcome == "guest_assert", f"{report.outcome}: {report.detail}"
    abort = report.ucalls[-1]
    assert abort["args"] == [value ^ 1, value], [hex(a) for a in abort["args"]]
    assert (abort["file"], abort["line"]) == ("api.s", 3)


# (register, value loaded into rax, immediates that must compare equal at that width)
NARROW_PASSES = [
    ("eax", 0xFFFFFFFF, ["0xffffffff", "-1", "LATER32"]),
    ("eax", 0x80000000, ["0x80000000", "-0x80000000"]),
    ("eax", 0x7FFFFFFF, ["0x7fffffff"]),
    ("eax", 0x0, ["0"]),
    ("ax", 0xFFFF, ["0xffff", "-1"]),
    ("ax", 0x8000, ["0x8000", "-0x8000"]),
    ("al", 0xFF, ["0xff", "-1"]),
    ("al", 0x80, ["0x80", "-128"]),
]


def test_narrow_register_compares_at_its_width() -> None:
    """GUEST_ASSERT_EQ eax/ax/al/ah, IMM compares at the register's width: -1 equals 0xffffffff in eax,
    and the bits above the register do not count."""
    body = ""
    for register, value, immediates in NARROW_PASSES:
        body += f"    movabs rax, {value | 0x5A5A5A5A00000000 if register != 'eax' else value:#x}\n"
        body += "".join(f"    GUEST_ASSERT_EQ {register}, {imm}\n    GUEST_ASSERT_EQ {imm}, {register}\n"
                        for imm in immediates)
        if register == "al":
            body += f"    mov ah, {value}\n    GUEST_ASSERT_EQ ah, {immediates[1]}\n"
    body += """\
    mov ebx, eax
    movabs rcx, 0x1234567800000000
    or rbx, rcx
    GUEST_ASSERT_EQ eax, ebx
    mov r15w, ax
    GUEST_ASSERT_EQ ax, r15w
    GUEST_SYNC 0x600d
"""
    report = run("guest_main:\n" + body + "    ret\n.equ LATER32, 0xffffffff\n")
    assert_done(report)
    assert report.syncs() == [0x600D]


def test_immediate_known_only_to_keystone_that_does_not_fit_fails_at_run_time() -> None:
    """An immediate asm.py cannot evaluate that does not fit eax (0x100000005, defined later) never
    equals eax = 5: the assert fails and reports both values, rather than comparing 5 with 5."""
    report = run("guest_main:\n    mov eax, 5\n    GUEST_ASSERT_EQ eax, LATER_BIG\n    ret\n"
                 ".equ LATER_BIG, 0x100000005\n")
    assert report.outcome == "guest_assert", f"{report.outcome}: {report.detail}"
    assert report.ucalls[-1]["args"] == [5, 0x100000005]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("GUEST_ASSERT_EQ eax, 0x100000000", "0x100000000 does not fit the 32-bit register eax"),
        ("GUEST_ASSERT_EQ eax, -0x80000001", "does not fit the 32-bit register eax"),
        ("GUEST_ASSERT_EQ 0x10000, ax", "0x10000 does not fit the 16-bit register ax"),
        ("GUEST_ASSERT_EQ al, 256", "256 does not fit the 8-bit register al"),
        ("GUEST_ASSERT_EQ r9b, -129", "does not fit the 8-bit register r9b"),
        ("GUEST_ASSERT_EQ eax, rbx", "the two registers have different widths"),
        ("GUEST_ASSERT_EQ rax, qword ptr [rbx]", "not memory operands"),
        ("GUEST_ASSERT_EQ rax, 0x10000000000000000", "does not fit in 64 bits"),
        ("GUEST_ASSERT_EQ rax, -0x8000000000000001", "does not fit in 64 bits"),
        ("GUEST_SYNC cr2", "not cr2"),
        ("GUEST_SYNC 0x10000000000000000", "does not fit in 64 bits"),
        ("GUEST_SET_HANDLER 32, guest_main", "the vector must be 0 to 31, not 32"),
        ("GUEST_SET_HANDLER -1, guest_main", "the vector must be 0 to 31, not -1"),
        ("GUEST_SET_HANDLER 0xffffffffffffffff, guest_main", "the vector must be 0 to 31"),
        ("GUEST_TERMINATE 16, 0", "the reason set must be 0 to 15, not 16"),
        ("GUEST_TERMINATE 0, 256", "the reason code must be 0 to 255, not 256"),
        ("GUEST_TERMINATE 0x80000000, 0", "the reason set must be 0 to 15"),
        ("GUEST_TERMINATE rax, 0", "the reason set must be a constant, not register rax"),
        ("GHCB_SET 0x1000, rax", "the field offset must be 0 to 0xff8"),
        ("GHCB_SET -8, rax", "the field offset must be 0 to 0xff8"),
    ],
)
def test_values_that_cannot_be_right_are_refused_at_the_call(body: str, message: str) -> None:
    """A value a guest-API macro cannot take is an assembly error at the line of the call, saying why."""
    assert message in refused(f"    {body}\n")


def test_register_operands_alias_the_scratch_registers() -> None:
    """GUEST_ASSERT_EQ compares the caller's rdi and rsi even though the macro loads through them."""
    body = """\
    mov rdi, 5
    mov rsi, 6
    GUEST_ASSERT_EQ rsi, 6
    GUEST_ASSERT_EQ rdi, 5
    GUEST_ASSERT_EQ 6, rsi
    GUEST_ASSERT_EQ edi, 5
    mov rbx, rsp
    GUEST_ASSERT_EQ rsp, rbx
    GUEST_ASSERT_EQ rsi, rdi
"""
    report = run(guest(body))
    assert report.outcome == "guest_assert", f"{report.outcome}: {report.detail}"
    assert report.ucalls[-1]["args"] == [6, 5] and report.ucalls[-1]["line"] == 10


# --------------------------------------------------------------------------------------------
# GUEST_SET_HANDLER, GUEST_RUN_USER, GHCB_SET, GUEST_TERMINATE
# --------------------------------------------------------------------------------------------


def test_guest_set_handler_stores_every_64_bit_handler_value() -> None:
    """GUEST_SET_HANDLER 31, IMM stores the full value in the runtime's handler table."""
    body = "".join(
        f"    GUEST_SET_HANDLER 31, {text}\n    movabs rax, RT_HANDLERS + 31 * 8\n    mov rbx, qword ptr [rax]\n"
        "    GUEST_SYNC rbx\n"
        for text, _ in VALUES
    )
    body += "    mov ecx, 31\n    GUEST_SET_HANDLER ecx, 0x1234\n    mov rbx, qword ptr [rax]\n    GUEST_SYNC rbx\n"
    body += "    GUEST_SET_HANDLER 31, 0\n"
    report = run(guest(body))
    assert_done(report)
    assert report.syncs() == [value for _, value in VALUES] + [0x1234]


@pytest.mark.parametrize("vector", ["ecx", "LATER_VECTOR"])
def test_guest_set_handler_vector_out_of_range_at_run_time_is_ud_at_the_call(vector: str) -> None:
    """A vector above 31 that only the running guest knows (a register, a symbol defined later) is a
    #UD reported at the GUEST_SET_HANDLER line, and no handler is written."""
    text = (f"guest_main:\n    mov ecx, 0x80000000\n    GUEST_SET_HANDLER {vector}, guest_main\n    ret\n"
            ".equ LATER_VECTOR, 0x80000000\n")
    report = run(text)
    assert report.outcome == "unhandled_exception", f"{report.outcome}: {report.detail}"
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["file"], report.exception["line"]) == (6, "api.s", 3)


@pytest.mark.parametrize("target", [0x80000000, 1 << 32])
def test_guest_run_user_jumps_to_the_full_address(target: int) -> None:
    """GUEST_RUN_USER IMM enters CPL 3 at exactly IMM: the fetch from that unmapped address faults
    with RIP = CR2 = IMM (a sign-extended or 16-bit encoding would fault elsewhere)."""
    report = run(guest(f"    GUEST_RUN_USER {target:#x}\n"))
    assert report.outcome == "unhandled_exception", f"{report.outcome}: {report.detail}"
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["rip"], report.exception["cr2"]) == (14, target, target)


def test_ghcb_set_stores_every_64_bit_value() -> None:
    """GHCB_SET FIELD, IMM (and a narrow register) writes the full value into the runtime's GHCB page."""
    items = [*VALUES, ("r8d", 0x89ABCDEF)]
    body = "    movabs r8, 0x0123456789abcdef\n"
    for text, _ in items:
        body += (f"    GHCB_SET GHCB_SW_EXITINFO2, {text}\n    movabs rax, RT_GHCB + GHCB_SW_EXITINFO2\n"
                 "    mov rbx, qword ptr [rax]\n    GUEST_SYNC rbx\n")
    report = run(guest(body))
    assert_done(report)
    assert report.syncs() == [value for _, value in items]


def test_guest_terminate_takes_the_largest_reason_set_and_code() -> None:
    """GUEST_TERMINATE 15, 255 on SEV-ES reaches the host as reason set 15, code 255
    (GHCB MSR protocol: set in bits 15:12, code in bits 23:16)."""
    report = run(guest("    GUEST_TERMINATE 15, 255\n"), vm_type="sev-es")
    assert report.outcome == "terminated", f"{report.outcome}: {report.detail}"
    assert report.termination == {"reason_set": 15, "reason_code": 255}


def test_guest_terminate_out_of_range_at_run_time_is_ud_at_the_call() -> None:
    """A reason set above 15 known only to Keystone (defined later) is a #UD at the GUEST_TERMINATE line."""
    report = run("guest_main:\n    nop\n    GUEST_TERMINATE LATER_SET, 0\n    ret\n.equ LATER_SET, 16\n",
                 vm_type="sev-es")
    assert report.outcome == "unhandled_exception", f"{report.outcome}: {report.detail}"
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["line"]) == (6, 3)


# --------------------------------------------------------------------------------------------
# Canaries: Keystone 0.9.2 facts the prelude and asm.py rely on (docs/emulator-facts.md)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ks() -> Ks:
    return Ks(KS_ARCH_X86, KS_MODE_64)


def encode(ks: Ks, text: str) -> bytes:
    encoding, _count = ks.asm(text, 0x1000, as_bytes=True)
    return encoding or b""


def test_push_of_a_large_immediate_is_a_16_bit_push(ks: Ks) -> None:
    """`push 0x80000000` encodes as `66 68 00 00` (push imm16): why the prelude never pushes immediates."""
    assert encode(ks, "push 0x80000000") == bytes.fromhex("66680000")
    assert encode(ks, "push 0xffffffff") == bytes.fromhex("6668ffff")


def test_mov_of_a_symbol_defined_later_is_sign_extended_imm32(ks: Ks) -> None:
    """`mov rdi, K` with K = 0x80000000 defined later encodes imm32 (0xffffffff80000000); movabs is exact."""
    assert encode(ks, "mov rdi, K\n.equ K, 0x80000000") == bytes.fromhex("48c7c700000080")
    assert encode(ks, "movabs rdi, K\n.equ K, 0x80000000") == bytes.fromhex("48bf0000008000000000")


def test_error_directive_is_silently_ignored(ks: Ks) -> None:
    """`.error "x"` assembles to nothing, without an error: asm.py turns it into a missing symbol."""
    assert encode(ks, '.error "x"\nnop') == b"\x90"


def test_if_on_a_symbol_defined_later_is_dropped(ks: Ks) -> None:
    """An .if on a symbol Keystone cannot evaluate yet is dropped: both branches assemble at top
    level, and nested in a true .if its .else closes the outer one."""
    assert encode(ks, ".if K == 1\nnop\n.else\nint3\n.endif\n.equ K, 5") == b"\x90\xcc"
    assert encode(ks, ".if 1\n.if K\n.else\nint3\n.endif\n.if K > 9\nhlt\n.endif\n.endif\n.equ K, 5") == b"\xf4"
    assert encode(ks, ".rept K\nnop\n.endr\n.equ K, 3") == b"\x90"


def test_oversized_literal_in_a_macro_argument_drops_the_statement(ks: Ks) -> None:
    """A macro argument beyond 64 bits makes the statement using it vanish (no error); outside a
    macro the same literal is an error."""
    assert encode(ks, ".macro M x\nmovabs rdi, \\x\n.endm\nM 0x10000000000000000\nnop") == b"\x90"
    with pytest.raises(KsError):
        encode(ks, "movabs rdi, 0x10000000000000000")


def test_jump_relative_to_dollar_is_dropped(ks: Ks) -> None:
    """`jbe $ + 4` assembles to nothing: the prelude encodes its short jumps as bytes."""
    assert encode(ks, "cmp rax, 15\njbe $ + 4\nud2") == bytes.fromhex("4883f80f0f0b")


def test_movzx_from_a_high_byte_register_into_rdi_aborts_keystone() -> None:
    """`movzx rdi, ah` needs REX.W, which cannot encode AH: LLVM aborts the process, so the prelude
    loads narrow registers into edi/esi. (Run in a child process.)"""
    import subprocess
    import sys

    script = ("from keystone import *\nks = Ks(KS_ARCH_X86, KS_MODE_64)\n"
              "print(ks.asm('movzx edi, ah', 0)[0])\nks.asm('movzx rdi, ah', 0)\nprint('survived')")
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          timeout=60)
    assert "[15, 182, 252]" in done.stdout
    assert "survived" not in done.stdout and done.returncode != 0
