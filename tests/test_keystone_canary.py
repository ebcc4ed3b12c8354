"""Canaries: the Keystone 0.9.2 behaviour testbed.asm is designed around.

Each test pins one fact (see ../shared/UNICORN.md, "Keystone 0.9.2"). If an upgrade changes
one, the test fails here instead of testbed.asm silently misbehaving; the docstring of the
workaround in testbed/asm.py names the fact it relies on. These tests call Keystone directly.
"""

from __future__ import annotations

import select
import subprocess
import sys
import textwrap

import pytest
from keystone import KS_ARCH_X86, KS_ERR_ASM_SYMBOL_MISSING, KS_MODE_64, Ks, KsError, ks_version

BASE = 0x1000


@pytest.fixture(scope="module")
def ks() -> Ks:
    return Ks(KS_ARCH_X86, KS_MODE_64)


def encode(ks: Ks, source: str, base: int = BASE) -> bytes:
    encoding, _count = ks.asm(source.encode(), base, as_bytes=True)
    return bytes(encoding or b"")


def test_keystone_is_version_0_9() -> None:
    """The Keystone core is version 0.9, the one these facts were measured on."""
    assert ks_version()[:2] == (0, 9)


# --------------------------------------------------------------------------------------------
# Facts listed in UNICORN.md
# --------------------------------------------------------------------------------------------


def test_include_is_silently_ignored(ks: Ks) -> None:
    """`.include` of a file that does not exist is silently ignored (so asm.py resolves it)."""
    assert encode(ks, '.include "no/such/file.s"\nnop') == b"\x90"


@pytest.mark.parametrize(
    ("source", "encoding"),
    [("vmcall", "0f01c1"), ("vmmcall", "0f01d9"), ("rep vmmcall", "f30f01d9")],
)
def test_hypercall_instructions_encode_as_expected(ks: Ks, source: str, encoding: str) -> None:
    """VMCALL, VMMCALL and `rep vmmcall` (VMGEXIT) have their architectural encodings."""
    assert encode(ks, source) == bytes.fromhex(encoding)


@pytest.mark.parametrize("mnemonic", ["tdcall", "pvalidate", "rmpadjust", "vmgexit", "sysretq"])
def test_confidential_vm_mnemonics_are_missing(ks: Ks, mnemonic: str) -> None:
    """Keystone has no mnemonic for tdcall, pvalidate, rmpadjust, vmgexit or sysretq."""
    with pytest.raises(KsError, match="Invalid mnemonic"):
        encode(ks, mnemonic)


def test_semicolon_separates_statements(ks: Ks) -> None:
    """`;` separates statements, so it cannot start a comment."""
    assert encode(ks, "nop; ret") == bytes.fromhex("90c3")


def test_hash_starts_a_comment(ks: Ks) -> None:
    """`#` comments to the end of the line, `;` included."""
    assert encode(ks, "nop # ret; ret\nint3") == bytes.fromhex("90cc")


def test_absolute_memory_operand_is_encoded_rip_relative(ks: Ks) -> None:
    """`[0x200000]` in a ModRM operand is encoded RIP-relative, not absolute."""
    # 48 8b 1d disp32: mov rbx, [rip + 0x200000]; the absolute form would be 48 8b 1c 25.
    assert encode(ks, "mov rbx, [0x200000]") == bytes.fromhex("488b1d00002000")


def test_absolute_load_into_rax_uses_movabs(ks: Ks) -> None:
    """`mov rax, [imm]` is the absolute moffs64 form (movabs) and is correct."""
    assert encode(ks, "mov rax, [0x200000]") == bytes.fromhex("48a10000200000000000")


@pytest.mark.parametrize(("source", "encoded", "means"), [
    ("push 0xffff", "6aff", "push -1: a sign-extended byte"),
    ("pushf", "669c", "the 16-bit pushf (RSP moves by 2)"),
    ("iret", "66cf", "the 16-bit iret"),
    ("lea rax, [rip + rcx]", "488d0500000000", "lea rax, [rip]: the index dropped"),
    ("mov byte ptr [rbx], 256", "c60300", "mov byte ptr [rbx], 0"),
    ("imul eax, ebx, 0x100000000", "69c300000000", "imul eax, ebx, 0"),
])
def test_silent_misencodings_the_front_end_refuses(ks: Ks, source: str, encoded: str, means: str) -> None:
    """Canaries of the encodings testbed/asm/guards.py refuses (each is another instruction or
    value than its source says, with no error from Keystone); if one changes, revisit the guard."""
    assert encode(ks, source) == bytes.fromhex(encoded), means


def test_loop_out_of_rel8_reach_wraps_silently(ks: Ks) -> None:
    """`loop L` to a label 200 bytes ahead encodes rel8 0xc8 (a branch backwards) without an
    error, and `jmp 0x100000000` from 0x100000 encodes a jump to 0: testbed/asm/branches.py
    checks both after assembly."""
    assert encode(ks, "loop L1\n.space 200\nL1: nop")[:2] == bytes.fromhex("e2c8")
    assert encode(ks, "jmp 0x100000000", base=0x100000) == bytes.fromhex("e9fbffefff")  # rel32 -0x100005: to 0


def test_numeric_local_labels_are_rejected(ks: Ks) -> None:
    """Numeric local labels (`1:`) are an error."""
    with pytest.raises(KsError):
        encode(ks, "1: nop\njmp 1b")


def test_macro_arguments_are_substituted(ks: Ks) -> None:
    """`.macro` with `\\arg` parameters expands with the arguments substituted."""
    assert encode(ks, ".macro LOAD reg, value\nmov \\reg, \\value\n.endm\nLOAD rbx, 5") == bytes.fromhex(
        "48c7c305000000"
    )


def test_label_built_from_a_macro_argument_works(ks: Ks) -> None:
    """A label built from a macro argument can be defined and referenced."""
    assert encode(ks, ".macro ISR n\nisr_\\n: iretq\n.endm\nISR 3\njmp isr_3") == bytes.fromhex("48cfebfc")


def test_fixed_label_in_a_macro_fails_on_second_expansion(ks: Ks) -> None:
    """A fixed label inside a macro body is redefined, and rejected, by a second expansion."""
    with pytest.raises(KsError, match="redefined"):
        encode(ks, ".macro M\nhere: nop\n.endm\nM\nM")


# --------------------------------------------------------------------------------------------
# Facts the design of testbed.asm relies on
# --------------------------------------------------------------------------------------------


def test_error_count_does_not_locate_a_parse_error(ks: Ks) -> None:
    """KsError.get_asm_count() is 0 after a parse error, whatever its line (so asm.py bisects)."""
    with pytest.raises(KsError) as excinfo:
        encode(ks, "nop\nnop\nnop\nbad_one\nnop")
    assert excinfo.value.get_asm_count() == 0


def test_error_count_of_a_missing_symbol_is_the_whole_unit(ks: Ks) -> None:
    """A missing symbol is found at the end: get_asm_count() counts every statement."""
    with pytest.raises(KsError) as excinfo:
        encode(ks, "nop\njmp nowhere\nnop\nnop")
    assert excinfo.value.errno == KS_ERR_ASM_SYMBOL_MISSING
    assert excinfo.value.get_asm_count() == 4


def test_symbol_after_an_operator_becomes_a_memory_operand(ks: Ks) -> None:
    """An immediate with a symbol after an operator (`-K`, `1+K`) is encoded as a memory load."""
    assert encode(ks, ".equ K, 1000\nmov rax, -K") == bytes.fromhex("48a1e803000000000000")  # movabs rax, [0x3e8]
    assert encode(ks, ".equ K, 1000\ncmp rax, 1+K") == bytes.fromhex("483b05e1f3ffff")  # cmp rax, [rip - 0xc1f]


def test_negated_symbol_in_an_address_loses_its_sign(ks: Ks) -> None:
    """`[rbx - K]` is encoded as `[rbx + K]`, and `[rbx + K*8]` as `[rbx + K]`."""
    assert encode(ks, ".equ K, 1000\nmov rax, [rbx - K]") == bytes.fromhex("488b83e8030000")
    assert encode(ks, ".equ K, 8\nmov rax, [rbx + K*8]") == bytes.fromhex("488b4308")


def test_symbol_first_immediate_is_computed(ks: Ks) -> None:
    """An immediate expression that starts with the symbol (`K-1`) is encoded right."""
    assert encode(ks, ".equ K, 1000\nmov rax, K-1") == bytes.fromhex("48c7c0e7030000")


def test_equ_of_an_expression_is_used_right(ks: Ks) -> None:
    """A `.equ` holding `-K` is used right as an immediate and as a displacement."""
    assert encode(ks, ".equ K, 1000\n.equ E, -K\nmov rax, E") == bytes.fromhex("48c7c018fcffff")
    assert encode(ks, ".equ K, 1000\n.equ E, -K\nmov rax, [rbx + E]") == bytes.fromhex("488b8318fcffff")


def test_parse_error_is_reported_before_a_missing_symbol(ks: Ks) -> None:
    """A parse error is reported even after a missing symbol: symbols are resolved at the end."""
    with pytest.raises(KsError, match="Invalid mnemonic"):
        encode(ks, "nop\njmp nowhere\nbad_one\nnop")


def test_missing_macro_argument_drops_the_statement(ks: Ks) -> None:
    """A statement using a macro parameter left without an argument is silently dropped."""
    source = ".macro M a, b\nmov eax, \\a\nmov ebx, \\b\n.endm\nM 1"
    assert encode(ks, source) == bytes.fromhex("b801000000")


def test_unknown_macro_parameter_drops_the_statement(ks: Ks) -> None:
    """A statement using `\\name` for a parameter the macro lacks is silently dropped."""
    assert encode(ks, ".macro M a\nmov eax, \\b\nnop\n.endm\nM 1") == b"\x90"


def test_quad_of_a_label_is_its_absolute_address(ks: Ks) -> None:
    """`.quad label` emits the label's absolute address (base + offset): the symbol table."""
    assert encode(ks, "nop\nhere: nop\n.quad here") == bytes.fromhex("9090") + (BASE + 1).to_bytes(8, "little")


def test_ifdef_is_false_for_a_label_never_assembled(ks: Ks) -> None:
    """`.ifdef` after the code is false for a label in an untaken `.if` branch."""
    source = ".if 0\ndead: nop\n.endif\n.ifdef dead\n.byte 1\n.else\n.byte 0\n.endif"
    assert encode(ks, source) == b"\x00"


def test_ifndef_is_true_for_a_referenced_undefined_name(ks: Ks) -> None:
    """`.ifndef` is true for a name used but not defined, and defining it then resolves the use."""
    source = "jmp later\n.ifndef later\n.byte 1\nlater:\n.endif"
    assert encode(ks, source) == bytes.fromhex("eb0101")  # jmp over the .byte 1 to `later`


def test_block_comment_does_not_end_a_statement(ks: Ks) -> None:
    """A `/* */` comment spanning lines does not end the statement; `//` comments a line."""
    assert encode(ks, "mov eax, /* one\ntwo */ 1 // ret") == bytes.fromhex("b801000000")


def test_utf8_in_a_string_literal_passes_through(ks: Ks) -> None:
    """UTF-8 bytes inside a string literal are emitted unchanged."""
    assert encode(ks, '.ascii "é"') == "é".encode()


def test_macro_names_are_case_sensitive(ks: Ks) -> None:
    """Macro names are case-sensitive (so only `GUEST_ASSERT*` in capitals gets a site id)."""
    with pytest.raises(KsError, match="Invalid mnemonic"):
        encode(ks, ".macro GUEST_ASSERT_EQ a, b, site\n.endm\nguest_assert_eq 1, 2, 3")


def test_globl_zeroes_absolute_references(ks: Ks) -> None:
    """After `.globl sym`, `.quad sym` encodes 0 (so asm.py refuses `.globl`)."""
    assert encode(ks, ".globl here\nhere: .quad here") == bytes(8)


def test_unknown_directive_is_silently_ignored(ks: Ks) -> None:
    """An unknown directive without operands is ignored without an error."""
    assert encode(ks, "nop\n.bogus\nnop") == bytes.fromhex("9090")


def test_section_directive_empties_the_output(ks: Ks) -> None:
    """`.section` makes Keystone return no code and no error (so asm.py refuses it)."""
    assert encode(ks, "nop\n.section .data\nnop") == b""


def test_directive_error_followed_by_statements_is_lost(ks: Ks) -> None:
    """A malformed `.equ` is reported when last but silently dropped when more follows."""
    with pytest.raises(KsError):
        encode(ks, "nop\n.equ X, 1+\n")
    assert encode(ks, "nop\n.equ X, 1+\nnop") == bytes.fromhex("9090")


def test_empty_operand_drops_the_statement(ks: Ks) -> None:
    """`mov rbx,` is silently dropped (so asm.py refuses empty operands)."""
    assert encode(ks, "mov rbx,\nnop") == b"\x90"


def test_unclosed_bracket_becomes_absolute_zero(ks: Ks) -> None:
    """`mov rax, [rbx` silently becomes `movabs rax, [0]` (so asm.py checks brackets)."""
    assert encode(ks, "mov rax, [rbx") == bytes.fromhex("48a10000000000000000")


def test_float_literal_is_encoded_as_double_bits(ks: Ks) -> None:
    """`mov rax, 2.5` silently loads the bits of the double 2.5 (so asm.py refuses it)."""
    assert encode(ks, "mov rax, 2.5") == bytes.fromhex("48b80000000000000440")


def _run_keystone(source: str) -> subprocess.Popen[str]:
    """Start a process that assembles `source` once Keystone is loaded; it prints `ready` first."""
    script = textwrap.dedent(
        f"""
        from keystone import KS_ARCH_X86, KS_MODE_64, Ks
        ks = Ks(KS_ARCH_X86, KS_MODE_64)
        print("ready", flush=True)
        ks.asm({source!r}.encode())
        print("assembled", flush=True)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


@pytest.mark.parametrize("statement", ["+ x", "%define X 1"])
def test_statement_starting_with_an_operator_hangs(statement: str) -> None:
    """A statement starting with an operator or `%` makes ks_asm loop forever."""
    process = _run_keystone(f"nop\n{statement}\nnop")
    try:
        # ks_asm has not returned within 0.25 s (two nops take microseconds): no "assembled"
        # line, whatever the interpreter's own start or exit costs
        readable, _, _ = select.select([process.stdout], [], [], 0.25)
        assert not readable and process.poll() is None
    finally:
        process.kill()
        process.wait()


def test_text_directive_crashes_the_process() -> None:
    """`.text` kills the process with a signal (so asm.py refuses it and uses a worker)."""
    process = _run_keystone("nop\n.text\nnop")
    assert process.wait(timeout=10) < 0
