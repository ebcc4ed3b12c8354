"""Tests for testbed.asm: includes, defines, assert sites, symbols, and located errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.asm import Program, SourceLocation, assemble_files, assemble_source, engine, parse_define, syntax
from testbed.errors import AsmError, TestbedError, UsageError

BASE = 0x40_0000

# The shape of the runtime's assert macro: the call-site id arrives as the last argument.
ASSERT_MACRO = """\
.macro GUEST_ASSERT_EQ a, b, site
    cmp \\a, \\b
    .byte 0xcc, \\site
.endm
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def disassemble(program: Program) -> list[str]:
    decoder = Cs(CS_ARCH_X86, CS_MODE_64)
    return [f"{i.mnemonic} {i.op_str}".strip() for i in decoder.disasm(program.code, program.base)]


def asm_error(excinfo: pytest.ExceptionInfo[AsmError]) -> tuple[str, int, str]:
    return excinfo.value.file, excinfo.value.line, excinfo.value.message


# --------------------------------------------------------------------------------------------
# Basics
# --------------------------------------------------------------------------------------------


def test_source_location_prints_as_file_colon_line() -> None:
    """A SourceLocation prints as file:line."""
    assert str(SourceLocation("guests/a.s", 12)) == "guests/a.s:12"


def test_program_holds_the_code_at_its_base() -> None:
    """The program's code is the encoding of the source, loaded at the base given."""
    program = assemble_source("vmcall\nhlt", base=BASE)
    assert program.code == bytes.fromhex("0f01c1f4")
    assert program.base == BASE
    assert program.end == BASE + 4


def test_empty_source_gives_empty_program() -> None:
    """A source with only comments assembles to no code."""
    program = assemble_source("# nothing here\n/* nor here */\n", base=BASE)
    assert program.code == b""
    assert dict(program.symbols) == {}


def test_hash_and_semicolon_inside_strings_are_data() -> None:
    """`#` and `;` inside string and character literals are data, not comment or separator."""
    program = assemble_source(".ascii \"a;b#c\" # comment; not a statement\nmov al, ';'", base=BASE)
    assert program.code == b"a;b#c" + bytes.fromhex("b03b")


def test_comments_of_every_kind_are_ignored() -> None:
    """`#`, `//` and `/* */` comments emit nothing; a block comment does not end a statement."""
    program = assemble_source("nop # a\nnop // b\nnop /* c */\nmov eax, /* d\ne */ 1\n", base=BASE)
    assert program.code == bytes.fromhex("909090b801000000")


def test_utf8_string_literal_is_encoded_as_utf8() -> None:
    """A non-ASCII string literal is emitted as its UTF-8 bytes."""
    assert assemble_source('.ascii "é"', base=BASE).code == "é".encode()


# --------------------------------------------------------------------------------------------
# Includes
# --------------------------------------------------------------------------------------------


def test_include_is_resolved_relative_to_the_including_file(tmp_path: Path) -> None:
    """An include is resolved relative to the including file."""
    write(tmp_path, "lib/defs.s", ".byte 7\n")
    main = write(tmp_path, "lib/main.s", '.include "defs.s"\n.byte 8\n')
    assert assemble_files([main], base=BASE).code == bytes([7, 8])


def test_include_falls_back_to_the_include_dirs(tmp_path: Path) -> None:
    """An include not next to the including file is found in the include directories."""
    write(tmp_path, "inc/defs.s", ".byte 7\n")
    main = write(tmp_path, "src/main.s", '.include "defs.s"\n')
    program = assemble_files([main], base=BASE, include_dirs=[tmp_path / "inc"])
    assert program.code == bytes([7])


def test_include_prefers_the_including_directory(tmp_path: Path) -> None:
    """The including file's directory is searched before the include directories."""
    write(tmp_path, "inc/defs.s", ".byte 1\n")
    write(tmp_path, "src/defs.s", ".byte 2\n")
    main = write(tmp_path, "src/main.s", '.include "defs.s"\n')
    assert assemble_files([main], base=BASE, include_dirs=[tmp_path / "inc"]).code == bytes([2])


def test_nested_includes_keep_their_own_locations(tmp_path: Path) -> None:
    """Statements of a nested include keep the nested file's name and line numbers."""
    write(tmp_path, "c.s", "nop\nbogus_insn\n")
    write(tmp_path, "b.s", '# b\n.include "c.s"\n')
    main = write(tmp_path, "a.s", 'nop\n.include "b.s"\n')
    with pytest.raises(AsmError) as excinfo:
        assemble_files([main], base=BASE)
    assert asm_error(excinfo) == (str(tmp_path / "c.s"), 2, "invalid mnemonic: bogus_insn")


def test_include_from_a_string_source_uses_the_include_dirs(tmp_path: Path) -> None:
    """A source given as a string finds its includes in the include directories."""
    write(tmp_path, "defs.s", ".byte 9\n")
    program = assemble_source('.include "defs.s"', base=BASE, include_dirs=[tmp_path])
    assert program.code == bytes([9])


def test_missing_include_is_reported_at_the_include_line(tmp_path: Path) -> None:
    """A missing include file is an error at the line of the .include."""
    main = write(tmp_path, "main.s", 'nop\n\n.include "nowhere.s"\n')
    with pytest.raises(AsmError) as excinfo:
        assemble_files([main], base=BASE)
    file, line, message = asm_error(excinfo)
    assert (file, line) == (str(main), 3)
    assert "'nowhere.s' not found" in message


def test_include_cycle_is_reported_at_the_include_line(tmp_path: Path) -> None:
    """An include cycle is an error at the .include that closes it."""
    write(tmp_path, "a.s", 'nop\n.include "b.s"\n')
    write(tmp_path, "b.s", '.include "a.s"\n')
    with pytest.raises(AsmError) as excinfo:
        assemble_files([tmp_path / "a.s"], base=BASE)
    file, line, message = asm_error(excinfo)
    assert (file, line) == (str(tmp_path / "b.s"), 1)
    assert message == "include cycle: a.s -> b.s -> a.s"


def test_including_a_file_twice_without_a_cycle_is_allowed(tmp_path: Path) -> None:
    """The same file may be included twice in sequence."""
    write(tmp_path, "one.s", ".byte 1\n")
    main = write(tmp_path, "main.s", '.include "one.s"\n.include "one.s"\n')
    assert assemble_files([main], base=BASE).code == bytes([1, 1])


def test_include_needs_a_quoted_name() -> None:
    """An .include without a quoted file name is an error at its line."""
    with pytest.raises(AsmError, match="quoted file name"):
        assemble_source("nop\n.include defs.s", filename="m.s", base=BASE)


def test_unreadable_top_level_file_is_a_usage_error(tmp_path: Path) -> None:
    """A guest source that cannot be read is a usage error naming the path."""
    with pytest.raises(UsageError, match=r"missing\.s"):
        assemble_files([tmp_path / "missing.s"], base=BASE)


# --------------------------------------------------------------------------------------------
# Inputs Keystone 0.9.2 hangs on, crashes on, or silently mis-assembles
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("%define X 1", "NASM-style directive '%define'"),
        ("nop; %include 'x'", "NASM-style directive"),
        ("mov rax, %eax", "AT&T-style"),
        (".data", ".data crashes Keystone"),
        (".text", ".text crashes Keystone"),
        (".section .data", "sections are not supported"),
        (".globl start", "a flat image needs no .globl"),
        (".att_syntax", "only Intel syntax"),
        (".err", "silently ignores .err"),
        (".error x", ".error expects a quoted message"),
        (".quad 0x10000000000000000", "the number 0x10000000000000000 does not fit in 64 bits"),
        ("mov rax, -0x8000000000000001", "the number -0x8000000000000001 does not fit in 64 bits"),
        ("mov rax, 18446744073709551616", "does not fit in 64 bits"),
        (".if LATER\nnop\n.endif\n.equ LATER, 1", ".if needs constants defined before it, not LATER"),
        (".rept LATER\nnop\n.endr\n.equ LATER, 3", ".rept needs constants defined before it"),
        ("here: .if here == 0\n.endif", ".if needs constants defined before it, not here"),
        (".bogus 1", "unsupported directive .bogus"),
        ('.ascii "abc', "unterminated string literal"),
        ("nop /* open", "unterminated /* comment"),
        ("mov al, 'ab'", "malformed character literal"),
        ("nop `x`", "character '`' is not allowed"),
        ("nop ?", "character '?' is not allowed"),
        ("nop é", "non-ASCII character 'é'"),
        ("mov rax, [rbx", "unclosed '['"),
        ("jmp )", "unbalanced ')'"),
        (".byte 1,,2", "empty operand"),
        ("mov rbx,", "empty operand"),
        (".byte 1 +", "incomplete expression '1 +'"),
        ("mov rax, & 1", "incomplete expression"),
        (".equ X = 5", ".equ expects NAME, VALUE"),
        (".quad [1]", "brackets are not allowed in .quad"),
        ("+ nop", "must start with a mnemonic"),
        (".double 1.5e", "exponent without digits"),
        ("mov rax, 2.5", "floating-point number"),
        ("mov rax, \\x", "'\\' outside a macro body"),
    ],
)
def test_hazardous_input_is_refused_at_its_line(statement: str, message: str) -> None:
    """A construct Keystone 0.9.2 hangs on, crashes on or mis-assembles is refused at its line."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(f"nop\n{statement}\nnop", filename="g.s", base=BASE)
    file, line, text = asm_error(excinfo)
    assert (file, line) == ("g.s", 2)
    assert message in text


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("mov eax, 0x1ffffffff", "does not fit in 32 bits"),
        ("mov al, 0x1ff", "does not fit in 8 bits"),
        ("mov ax, 0x12345", "does not fit in 16 bits"),
        ("add eax, 0x1ffffffff", "does not fit in 32 bits"),
        ("cmp al, 300", "does not fit in 8 bits"),
        ("cmp al, -129", "does not fit in 8 bits"),
        ("push 0x100000000", "does not fit its encoding"),
        ("ret 0x10000", "does not fit its encoding"),
        ("enter 0x10000, 0", "do not fit"),
        ("mov rax, [rbx + 0x100000000]", "displacement does not fit in 32 bits"),
        ("mov rax, [rbx - 0x80000001]", "displacement does not fit in 32 bits"),
        ("lea rax, [rip + 0x100000000]", "displacement does not fit in 32 bits"),
        ("mov rax, [rbx + rsp*2]", "RSP cannot be an index register"),
        (".word 0x10000", ".word value 0x10000 does not fit in 16 bits"),
        (".word -32769", "does not fit in 16 bits"),
        (".space -5", ".space count -5 is negative"),
        (".fill -1, 1, 0", ".fill count -1 is negative"),
        (".fill 2, 9, 0", ".fill size 9 is not between 0 and 8"),
        (".align 3", "the alignment must be a power of two"),
        (".balign 6", "the alignment must be a power of two"),
        ("mov byte ptr [rbx], 256", "does not fit in 8 bits"),
        ("mov word ptr [rbx], -0x8001", "does not fit in 16 bits"),
        ("mov dword ptr [rbx + 8], 0x1ffffffff", "does not fit in 32 bits"),
        ("cmp byte ptr [rbx], 256", "does not fit in 8 bits"),
        ("imul eax, ebx, 0x100000000", "does not fit in 32 bits"),
        ("imul ax, bx, -0x8001", "does not fit in 16 bits"),
        ("push 0xffff", "sign-extended byte (push -1)"),
        ("push 0xff80", "sign-extended byte (push -128)"),
        ("pushf", "write pushfq"),
        ("popf", "write popfq"),
        ("iret", "write iretq"),
        ("into", "does not exist in 64-bit mode"),
        ("salc", "does not exist in 64-bit mode"),
        ("jmp $ + 4", "`$` (the current address)"),
        ("mov rbx, [0x200000]", "absolute address as RIP-relative"),
        ("lea rax, [0x1000]", "absolute address as RIP-relative"),
        ("jmp qword ptr [0x1000]", "absolute address as RIP-relative"),
        ("lea rax, [rip + rcx]", "RIP-relative addressing takes no index register"),
        (".quad -0x8000000000000001", "does not fit in 64 bits"),
    ],
)
def test_an_operand_keystone_would_encode_as_another_value_is_refused_at_its_line(statement: str,
                                                                                    message: str) -> None:
    """Keystone 0.9.2 silently encodes these as another value (an immediate modulo its width, a
    displacement dropped, RSP as "no index", a .word or a negative count that vanishes, an
    alignment ignored): each is refused at its line instead."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(f"nop\n{statement}\nnop", filename="g.s", base=BASE)
    file, line, text = asm_error(excinfo)
    assert (file, line) == ("g.s", 2)
    assert message in text


@pytest.mark.parametrize(("statement", "decoded"), [
    ("mov eax, 0xffffffff", "mov eax, 0xffffffff"),
    ("mov eax, -1", "mov eax, 0xffffffff"),
    ("cmp al, -128", "cmp al, 0x80"),
    ("mov rax, qword ptr [rbx + 0x7fffffff]", "mov rax, qword ptr [rbx + 0x7fffffff]"),
    ("mov rax, qword ptr [rbx - 0x80000000]", "mov rax, qword ptr [rbx - 0x80000000]"),
    ("push -1", "push -1"),
    ("ret 0xffff", "ret 0xffff"),
    ("mov rax, qword ptr [rsp + rbx*2]", "mov rax, qword ptr [rsp + rbx*2]"),
    ("mov byte ptr [rbx], -128", "mov byte ptr [rbx], 0x80"),
    ("mov dword ptr [rbx], 0xffffffff", "mov dword ptr [rbx], 0xffffffff"),
    ("push 0xff7f", "push 0xff7f"),
    ("pushfq", "pushfq"),
    ("mov rax, qword ptr [0x200000]", "movabs rax, qword ptr [0x200000]"),
    ("mov qword ptr [0x10], rax", "movabs qword ptr [0x10], rax"),
])
def test_operands_at_the_edges_of_their_encoding_assemble_as_written(statement: str, decoded: str) -> None:
    """The values at the ends of each range still assemble, to themselves."""
    assert disassemble(assemble_source(statement, filename="g.s", base=BASE)) == [decoded]


def test_unknown_macro_parameter_is_refused() -> None:
    """A `\\name` that is not a parameter of the enclosing macro is refused at its line."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(".macro M a\n  mov rax, \\b\n.endm", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 2, "unknown macro parameter \\b (known: \\a)")


def test_unclosed_block_is_reported_at_its_opening_line() -> None:
    """A .macro/.rept/.if without its closing directive is reported where it opens."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("nop\n.if 1\nnop\n", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 2, "block is not closed: missing .endif")


def test_stray_block_closer_is_reported() -> None:
    """A closing directive that closes nothing is reported at its line."""
    with pytest.raises(AsmError, match=r"g\.s:2: \.endm does not match"):
        assemble_source("nop\n.endm", filename="g.s", base=BASE)


def test_keystone_hang_becomes_a_located_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement Keystone loops forever on is reported at its line, not waited on forever."""
    monkeypatch.setattr(engine, "_TIMEOUT_FLOOR", 0.15)
    monkeypatch.setattr(engine, "_PROBE_TIMEOUT_FLOOR", 0.15)
    with pytest.raises(AsmError) as excinfo:
        assemble_source("nop\nrep .equ X<1", filename="g.s", base=BASE)
    file, line, message = asm_error(excinfo)
    assert (file, line) == ("g.s", 2)
    assert "hangs on this statement" in message


def test_keystone_crash_becomes_a_located_error() -> None:
    """A statement that aborts Keystone's process is reported at its line."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("nop\n.uleb128 later\nlater: nop", filename="g.s", base=BASE)
    file, line, message = asm_error(excinfo)
    assert (file, line) == ("g.s", 2)
    assert "Keystone crashed" in message
    assert assemble_source("nop", base=BASE).code == b"\x90"  # a fresh worker takes over


# --------------------------------------------------------------------------------------------
# Expressions Keystone mis-encodes in instruction operands
# --------------------------------------------------------------------------------------------

CONSTANTS = ".equ K, 1000\n.equ J, 8\n"


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("mov rax, -K", "mov rax, 0xfffffffffffffc18"),
        ("cmp rax, 1+K", "cmp rax, 0x3e9"),
        ("and rax, ~K", "and rax, 0xfffffffffffffc17"),
        ("push -K", "push -0x3e8"),
        ("mov rax, K-1", "mov rax, 0x3e7"),
        ("mov rax, [rbx - K]", "mov rax, qword ptr [rbx - 0x3e8]"),
        ("mov rax, [rbx + J*8]", "mov rax, qword ptr [rbx + 0x40]"),
        ("mov rax, [rbx + rcx*8 - J]", "mov rax, qword ptr [rbx + rcx*8 - 8]"),
        ("mov rax, qword ptr fs:[rbx + 8 - J]", "mov rax, qword ptr fs:[rbx]"),
        ("lock add qword ptr [rbx - J], 1", "lock add qword ptr [rbx - 8], 1"),
        ("mov al, '-'", "mov al, 0x2d"),
    ],
)
def test_symbol_expressions_in_operands_encode_their_value(statement: str, expected: str) -> None:
    """An operand expression with a symbol after an operator encodes its value, not a memory load."""
    assert disassemble(assemble_source(CONSTANTS + statement, base=BASE)) == [expected]


def test_label_arithmetic_in_a_rip_relative_address() -> None:
    """`[rip + label - J]` addresses label - J."""
    program = assemble_source(CONSTANTS + "lea rax, [rip + table - J]\nnop\ntable: .quad 0", base=BASE)
    (displacement,) = struct.unpack_from("<i", program.code, 3)
    assert BASE + 7 + displacement == program.symbol("table") - 8


def test_negated_constant_as_a_macro_argument() -> None:
    """A negated constant passed to an assert macro reaches it as an immediate."""
    program = assemble_source(CONSTANTS + ASSERT_MACRO + "GUEST_ASSERT_EQ rax, -K", base=BASE)
    assert disassemble(program)[0] == "cmp rax, -0x3e8"
    assert program.code.endswith(bytes([0xCC, 1]))


def test_negated_macro_parameter_in_a_macro_body() -> None:
    """`-\\param` in a macro body is computed for each expansion."""
    program = assemble_source(CONSTANTS + ".macro NEG a\npush -\\a\n.endm\nNEG K\nNEG J", base=BASE)
    assert disassemble(program) == ["push -0x3e8", "push -8"]


# --------------------------------------------------------------------------------------------
# Defines
# --------------------------------------------------------------------------------------------


def test_define_with_int_value_is_visible_to_the_source() -> None:
    """An int define becomes a constant the source can use."""
    program = assemble_source("mov eax, PAGES", base=BASE, defines={"PAGES": 4})
    assert program.code == bytes.fromhex("b804000000")


def test_define_with_expression_value() -> None:
    """A string define may be an expression over other names."""
    program = assemble_source(".byte TWICE", base=BASE, defines={"ONE": 1, "TWICE": "ONE * 2"})
    assert program.code == bytes([2])


def test_define_may_name_a_label_of_the_source() -> None:
    """A define's value may reference a label defined in the source."""
    program = assemble_source("nop\nentry: nop\n.quad ENTRY", base=BASE, defines={"ENTRY": "entry"})
    assert program.code[2:] == struct.pack("<Q", BASE + 1)


@pytest.mark.parametrize("name", ["1X", "A-B", "", "__tb_x"])
def test_define_with_bad_name_is_a_usage_error(name: str) -> None:
    """A define whose name is not an identifier is a usage error."""
    with pytest.raises(UsageError, match="define"):
        assemble_source("nop", base=BASE, defines={name: 1})


@pytest.mark.parametrize("value", ["1+", "(1", "1; nop", "", "8 // 2", 2**64])
def test_define_with_bad_value_is_a_usage_error(value: int | str) -> None:
    """A define whose value is not an expression is a usage error naming the define."""
    with pytest.raises(UsageError, match="define X="):
        assemble_source("nop", base=BASE, defines={"X": value})


def test_parse_define_splits_name_and_value() -> None:
    """`NAME=VALUE` from the command line splits at the first `=`."""
    assert parse_define("PAGES=4") == ("PAGES", "4")
    assert parse_define("MASK=1<<3") == ("MASK", "1<<3")


@pytest.mark.parametrize("text", ["PAGES", "=4", "PAGES=", "4PAGES=1", "P=1;nop"])
def test_parse_define_rejects_bad_syntax(text: str) -> None:
    """A command-line define not of the form NAME=VALUE is a usage error."""
    with pytest.raises(UsageError):
        parse_define(text)


# --------------------------------------------------------------------------------------------
# Assert call sites
# --------------------------------------------------------------------------------------------


def test_assert_sites_get_ids_in_order_across_files(tmp_path: Path) -> None:
    """Assert call sites are numbered 1, 2, 3 across files and map back to file:line."""
    prelude = write(tmp_path, "prelude.s", ASSERT_MACRO)
    guest = write(tmp_path, "guest.s", "nop\nGUEST_ASSERT_EQ rax, 5\n# c\ncheck: GUEST_ASSERT_EQ rbx, rcx\n")
    runtime = write(tmp_path, "runtime.s", "GUEST_ASSERT_EQ rdx, 0\n")
    program = assemble_files([prelude, guest, runtime], base=BASE)
    assert {site: where.location for site, where in program.asserts.items()} == {
        1: SourceLocation(str(guest), 2),
        2: SourceLocation(str(guest), 4),
        3: SourceLocation(str(runtime), 1),
    }
    assert [(where.kind, where.message) for where in program.asserts.values()] == [
        ("GUEST_ASSERT_EQ", "rax == 5"), ("GUEST_ASSERT_EQ", "rbx == rcx"), ("GUEST_ASSERT_EQ", "rdx == 0")]
    sites = [program.code[i + 1] for i in range(len(program.code) - 1) if program.code[i] == 0xCC]
    assert sites == [1, 2, 3]


def test_assert_without_arguments_gets_the_id_as_only_argument() -> None:
    """An assert macro called without arguments receives the id as its single argument."""
    program = assemble_source(".macro GUEST_ASSERT_FAIL site\n.byte \\site\n.endm\nGUEST_ASSERT_FAIL", base=BASE)
    assert program.code == bytes([1])
    assert {site: where.location for site, where in program.asserts.items()} == {1: SourceLocation("<string>", 4)}


def test_assert_inside_a_macro_body_is_not_rewritten() -> None:
    """An assert inside a macro body forwards the macro's own site; only call sites get ids."""
    source = ASSERT_MACRO + ".macro CHECK_ZERO reg, site\nGUEST_ASSERT_EQ \\reg, 0, \\site\n.endm\nCHECK_ZERO rax, 7\n"
    program = assemble_source(source, base=BASE)
    assert program.code.endswith(bytes([0xCC, 7]))
    assert dict(program.asserts) == {}


def test_assert_with_too_few_arguments_is_reported_at_its_line() -> None:
    """An assert call that leaves a macro parameter empty is an error at its line."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(ASSERT_MACRO + "nop\nGUEST_ASSERT_EQ rax\n", filename="g.s", base=BASE)
    file, line, message = asm_error(excinfo)
    assert (file, line) == ("g.s", 6)
    assert "GUEST_ASSERT_EQ takes 2 values, 1 given" in message


# --------------------------------------------------------------------------------------------
# Symbols and lines
# --------------------------------------------------------------------------------------------


def test_label_address_follows_known_size_bytes() -> None:
    """A label placed after known-size bytes has the address base + their size."""
    program = assemble_source("start: .byte 1, 2, 3\nafter: .quad 0\nend:", base=BASE)
    assert dict(program.symbols) == {"start": BASE, "after": BASE + 3, "end": BASE + 11}


def test_label_address_matches_rip_relative_lea() -> None:
    """A label's address agrees with the target Keystone encodes in `lea rax, [rip + label]`."""
    program = assemble_source("lea rax, [rip + target]\n.fill 37, 1, 0\ntarget: ret", base=BASE)
    assert program.code[:3] == bytes.fromhex("488d05")
    (displacement,) = struct.unpack_from("<i", program.code, 3)
    assert program.symbol("target") == BASE + 7 + displacement == BASE + 44


def test_symbols_of_all_files_share_one_address_space(tmp_path: Path) -> None:
    """Labels from every file are symbols at their place in the concatenated unit."""
    first = write(tmp_path, "a.s", "a_start: nop\n")
    second = write(tmp_path, "b.s", "b_start: .byte 1, 2\nb_end:\n")
    program = assemble_files([first, second], base=BASE)
    assert dict(program.symbols) == {"a_start": BASE, "b_start": BASE + 1, "b_end": BASE + 3}


def test_code_excludes_the_hidden_symbol_table() -> None:
    """The symbol table appended for Keystone is cut off the returned code."""
    program = assemble_source("one: nop\ntwo: nop\nthree: ret", base=BASE)
    assert program.code == bytes.fromhex("9090c3")


def test_label_in_untaken_if_branch_is_not_a_symbol() -> None:
    """A label in an .if branch that is not assembled is not a symbol."""
    program = assemble_source(".if 0\ndead: nop\n.else\nlive: nop\n.endif", base=BASE)
    assert dict(program.symbols) == {"live": BASE}


def test_label_in_an_expanded_macro_is_a_symbol() -> None:
    """A fixed label inside a macro body is a symbol once the macro is expanded."""
    program = assemble_source(".macro ENTRY\nnop\nentry_point: ret\n.endm\nnop\nENTRY", base=BASE)
    assert program.symbol("entry_point") == BASE + 2


def test_label_built_from_macro_arguments_is_not_listed() -> None:
    """Labels built from macro arguments work but are not in the symbol table."""
    source = ".macro ISR n\nisr_\\n: iretq\n.endm\nISR 3\njmp isr_3"
    program = assemble_source(source, base=BASE)
    assert dict(program.symbols) == {}
    assert program.code == bytes.fromhex("48cfebfc")


def test_symbol_lookup_names_the_missing_symbol() -> None:
    """Asking for a symbol the sources do not define raises an error naming it."""
    program = assemble_source("guest_main: ret", base=BASE)
    with pytest.raises(TestbedError, match=r"'guest_mian' is not defined.*did you mean guest_main"):
        program.symbol("guest_mian")


def test_lines_map_addresses_to_emitting_statements() -> None:
    """Program.lines gives the address of every statement that emits bytes."""
    source = "start:\nnop\n.macro TWO\nnop\nnop\n.endm\nTWO\n.equ X, 1\n.byte 1; ret\n"
    program = assemble_source(source, filename="g.s", base=BASE)
    assert list(program.lines) == [
        (BASE, SourceLocation("g.s", 2)),
        (BASE + 1, SourceLocation("g.s", 7)),
        (BASE + 3, SourceLocation("g.s", 9)),
        (BASE + 4, SourceLocation("g.s", 9)),
    ]


def test_location_finds_the_statement_of_an_address() -> None:
    """Program.location maps any address inside the code to the statement that emitted it."""
    program = assemble_source("nop\nmov eax, 1\nret", filename="g.s", base=BASE)
    assert program.location(BASE + 3) == SourceLocation("g.s", 2)
    assert program.location(BASE + 6) == SourceLocation("g.s", 3)
    assert program.location(BASE + 7) is None


# --------------------------------------------------------------------------------------------
# Error locations
# --------------------------------------------------------------------------------------------


def test_error_in_first_file_is_reported_at_its_line(tmp_path: Path) -> None:
    """An error in the first file is reported at that file's line."""
    first = write(tmp_path, "a.s", "nop\n\n# comment\nmov rax, [rbx+rcx*3]\n")
    second = write(tmp_path, "b.s", "nop\n")
    with pytest.raises(AsmError) as excinfo:
        assemble_files([first, second], base=BASE)
    assert asm_error(excinfo) == (str(first), 4, "invalid operand")


def test_error_in_second_file_is_reported_at_its_line(tmp_path: Path) -> None:
    """An error in a later file is reported at that file's own line number."""
    first = write(tmp_path, "a.s", "nop\n" * 10)
    second = write(tmp_path, "b.s", "nop\nvmcal\n")
    with pytest.raises(AsmError) as excinfo:
        assemble_files([first, second], base=BASE)
    assert asm_error(excinfo) == (str(second), 2, "invalid mnemonic: vmcal")


def test_error_after_a_macro_definition_counts_source_lines() -> None:
    """Lines of a macro definition count as source lines for errors after it."""
    source = ASSERT_MACRO + ".macro TWICE x\n.byte \\x\n.byte \\x\n.endm\nTWICE 1\nbad_one\n"
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 10, "invalid mnemonic: bad_one")


def test_error_after_semicolon_separated_statements() -> None:
    """An error in a `;`-separated statement is reported at the line it is written on."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("nop; nop\nnop; mov rax, [rbx+rcx*3]; nop\nnop", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 2, "invalid operand")


def test_error_after_a_multiline_comment_counts_its_lines() -> None:
    """Lines inside a block comment count for the line of a later error."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("nop /* one\ntwo\nthree */\nbad_one", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 4, "invalid mnemonic: bad_one")


def test_error_inside_an_included_file(tmp_path: Path) -> None:
    """An error inside an included file is reported at the included file's line."""
    write(tmp_path, "inc.s", "nop\nnop\n.byte 300\n")
    main = write(tmp_path, "main.s", 'nop\n.include "inc.s"\nnop\n')
    with pytest.raises(AsmError) as excinfo:
        assemble_files([main], base=BASE)
    assert asm_error(excinfo) == (str(tmp_path / "inc.s"), 3, "literal value out of range for directive")


def test_undefined_symbol_is_named_at_its_use() -> None:
    """An undefined symbol is reported, by name, where it is used."""
    source = "start: jmp later\nnop\ncall helpr\nlater: ret\nhelper: ret\n"
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 3, "symbol missing: helpr")


def test_undefined_symbol_in_data_is_named() -> None:
    """An undefined symbol in a data directive is reported, by name, at that directive."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("table: .quad start, finish\nstart: nop", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 1, "symbol missing: finish")


def test_forward_references_do_not_hide_a_later_error() -> None:
    """A forward reference before an error does not move the error to the reference."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("jmp done\nlea rax, [rip + data]\nbad_one\ndone: ret\ndata: .quad 0", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 3, "invalid mnemonic: bad_one")


def test_forward_reference_to_a_macro_built_label_does_not_hide_a_later_error() -> None:
    """A forward reference to a label a macro builds later does not take the blame for an error."""
    source = ".macro ISR n\nisr_\\n: iretq\n.endm\n.quad isr_3\nbad_one\nISR 3\n"
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 5, "invalid mnemonic: bad_one")


ISR_TABLE = """\
.macro ISR n
isr_\\n: iretq
.endm
idt:
.irp v, 0, 1, 2
.quad isr_\\v
.endr
"""


def test_forward_references_built_in_irp_do_not_hide_a_later_error() -> None:
    """Forward references a .irp builds from its arguments do not take the blame for an error."""
    source = ISR_TABLE + "nop\nbad_one\nISR 0\nISR 1\nISR 2\n"
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 9, "invalid mnemonic: bad_one")


def test_forward_references_built_in_irp_do_not_hide_a_missing_symbol() -> None:
    """Forward references a .irp builds from its arguments do not hide a missing symbol's use."""
    source = ISR_TABLE + "nop\ncall isr_commn\nISR 0\nISR 1\nISR 2\nisr_common: ret\n"
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 9, "symbol missing: isr_commn")


def test_missing_symbol_in_a_macro_body_is_reported_at_the_body_line() -> None:
    """A missing symbol used inside a macro body is reported where the body uses it."""
    source = "nop\n.macro EXIT\n  jmp guest_exitt\n.endm\nEXIT\nguest_exit: hlt\n"
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 3, "symbol missing: guest_exitt")


def test_define_naming_a_missing_symbol_is_a_usage_error() -> None:
    """A define whose value names a symbol no source defines is reported against the define."""
    with pytest.raises(UsageError, match="define ENTRY=guest_mian: symbol missing: guest_mian"):
        assemble_source("guest_main: nop\njmp ENTRY", base=BASE, defines={"ENTRY": "guest_mian"})


def test_error_in_a_macro_expansion_is_reported_at_the_invocation() -> None:
    """An error inside a macro body is reported where the macro is invoked, naming the macro."""
    source = "nop\n.macro LOAD reg\nmov \\reg, [rbx+rcx*3]\n.endm\nLOAD rax\n"
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 5, "invalid operand (in expansion of macro LOAD defined at g.s:2)")


def test_error_in_a_rept_body_is_reported_at_the_body_line() -> None:
    """An error inside a .rept body is reported at the line inside the body."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(".rept 2\nnop\nbad_one\n.endr\n", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 3, "invalid mnemonic: bad_one")


def test_error_in_taken_if_branch_is_reported_there() -> None:
    """An error in a taken .if branch is reported at its line; the untaken branch is ignored."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(".if 0\nbad_zero\n.else\nbad_one\n.endif\n", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 4, "invalid mnemonic: bad_one")


def test_duplicate_label_is_reported_at_its_second_definition() -> None:
    """A label defined twice is reported, by name, at the second definition, naming the first."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("loop: nop\nnop\nloop: nop\n", filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 3, "symbol redefined: loop (first defined: loop at g.s:1)")


def test_macro_used_before_its_definition_is_reported_as_such(tmp_path: Path) -> None:
    """A macro used in an earlier file than the one defining it is reported at the use."""
    guest = write(tmp_path, "guest.s", "nop\nGUEST_ASSERT_EQ rax, 1\n")
    runtime = write(tmp_path, "runtime.s", ASSERT_MACRO)
    with pytest.raises(AsmError) as excinfo:
        assemble_files([guest, runtime], base=BASE)
    file, line, message = asm_error(excinfo)
    assert (file, line) == (str(guest), 2)
    assert message.startswith(f"invalid mnemonic: GUEST_ASSERT_EQ (a macro defined later, at {runtime}:1;")


def test_missing_mnemonic_suggests_the_bytes_to_write() -> None:
    """A mnemonic Keystone 0.9.2 lacks (tdcall) is reported with the bytes to write instead."""
    with pytest.raises(AsmError, match=r"g\.s:1: invalid mnemonic: tdcall .*\.byte 0x66, 0x0f, 0x01, 0xcc"):
        assemble_source("tdcall", filename="g.s", base=BASE)


def test_bad_define_value_used_in_source_is_a_usage_error() -> None:
    """A define value Keystone rejects is reported against the define, not a source line."""
    with pytest.raises(UsageError, match=r"define X=1 2"):
        assemble_source("mov rax, X", base=BASE, defines={"X": "1 2"})


def test_asm_error_message_is_file_line_message() -> None:
    """An AsmError prints as `file:line: message` and keeps the parts."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source("nop\nbad_one", filename="guests/x.s", base=BASE)
    assert str(excinfo.value) == "guests/x.s:2: invalid mnemonic: bad_one"


# A few valid statements, some with forward references, to surround an invalid one.
_VALID = [
    "nop",
    "mov rax, 1",
    "jmp end",
    "lea rbx, [rip + data]",
    ".byte 1, 2",
    "push rax; pop rax",
    "# a comment",
    "",
    "call end # trailing comment",
    ".macro INC2 r\ninc \\r\ninc \\r\n.endm",
    ".irp v, 0\n.quad isr_\\v\n.endr",
]
_INVALID = ["bad_one", "mov rax, [rbx+rcx*3]", "jmp nowhere", ".byte 256", "mov rax, rbx, rcx"]


@settings(max_examples=20, deadline=None)
@given(
    before=st.lists(st.sampled_from(_VALID), max_size=6),
    after=st.lists(st.sampled_from(_VALID), max_size=6),
    invalid=st.sampled_from(_INVALID),
)
def test_invalid_statement_is_reported_at_its_own_line(before: list[str], after: list[str], invalid: str) -> None:
    """An invalid statement anywhere among valid ones is reported at its own line."""
    head = "\n".join(before)
    line = head.count("\n") + 2 if before else 1
    tail = ["end: ret", "data: .quad 0", ".macro ISR n\nisr_\\n: iretq\n.endm", "ISR 0"]
    source = "\n".join([*before, invalid, *after, *tail])
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert (excinfo.value.file, excinfo.value.line) == ("g.s", line)


def test_program_is_a_frozen_value() -> None:
    """A Program cannot be modified after assembly."""
    program = assemble_source("ret", base=BASE)
    assert isinstance(program, Program)
    with pytest.raises(AttributeError):
        program.base = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        program.symbols["x"] = 1  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Input the CLI used to end as "internal error": each is a located error, status 2
# --------------------------------------------------------------------------------------------


def _cli_usage_error(capsys: pytest.CaptureFixture[str], guest: Path) -> str:
    """Run `testbed run guest`; assert status 2 and return the one-line error."""
    from testbed.cli import EXIT_USAGE, main

    status = main(["run", str(guest), "--memory", "8M"])
    err = capsys.readouterr().err.strip()
    assert status == EXIT_USAGE == 2, f"status {status}: {err}"
    assert "internal error" not in err and len(err.splitlines()) == 1, err
    return err


def test_non_utf8_guest_source_is_a_located_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A guest source with a byte that is not UTF-8 is refused naming the file and line (API and CLI)."""
    guest = tmp_path / "g.s"
    guest.write_bytes(b"guest_main:\n    nop\n    ret # caf\xe9\n")
    with pytest.raises(AsmError) as excinfo:
        assemble_files([guest], base=BASE)
    assert (excinfo.value.file, excinfo.value.line) == (str(guest), 3)
    assert "not UTF-8 text: byte 0xe9" in excinfo.value.message
    err = _cli_usage_error(capsys, guest)
    assert f"{guest}:3" in err and "not UTF-8" in err


def test_non_utf8_included_file_is_located_in_that_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A non-UTF-8 include is refused at its own bad line, naming where it was included."""
    write(tmp_path, "bad.s", "").write_bytes(b"nop\nnop\n\xff\n")
    guest = write(tmp_path, "g.s", 'guest_main:\n.include "bad.s"\n    ret\n')
    with pytest.raises(AsmError) as excinfo:
        assemble_files([guest], base=BASE)
    assert (Path(excinfo.value.file).name, excinfo.value.line) == ("bad.s", 3)
    assert f"included at {guest}:2" in excinfo.value.message
    assert "bad.s:3: not UTF-8 text" in _cli_usage_error(capsys, guest)


def test_deep_include_nesting_is_refused_at_the_include(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """329 nested .includes (each file including the next) stop at a clear depth limit, not a RecursionError."""
    for i in range(329):
        write(tmp_path, f"f{i}.s", f'.include "f{i + 1}.s"\n')
    write(tmp_path, "f329.s", "nop\n")
    guest = write(tmp_path, "g.s", 'guest_main:\n.include "f0.s"\n    ret\n')
    with pytest.raises(AsmError) as excinfo:
        assemble_files([guest], base=BASE)
    assert excinfo.value.message == f"include nesting deeper than {syntax._MAX_INCLUDE_DEPTH} files"
    assert excinfo.value.line == 1 and Path(excinfo.value.file).name.startswith("f")
    assert "include nesting deeper than" in _cli_usage_error(capsys, guest)
    # the limit itself is allowed
    write(tmp_path, f"f{syntax._MAX_INCLUDE_DEPTH - 10}.s", "nop\n")
    assert assemble_files([guest], base=BASE).code == b"\x90\xc3"


def test_include_cycle_is_a_located_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """a.s including b.s including a.s is refused at the include that closes the cycle."""
    write(tmp_path, "a.s", '.include "b.s"\n')
    write(tmp_path, "b.s", 'nop\n.include "a.s"\n')
    guest = write(tmp_path, "g.s", 'guest_main:\n.include "a.s"\n')
    with pytest.raises(AsmError) as excinfo:
        assemble_files([guest], base=BASE)
    assert (Path(excinfo.value.file).name, excinfo.value.line) == ("b.s", 2)
    assert excinfo.value.message == "include cycle: a.s -> b.s -> a.s"
    assert "include cycle" in _cli_usage_error(capsys, guest)


def test_error_directive_reports_its_message_where_it_is_assembled() -> None:
    """`.error "text"` fails assembly with its text at the line that assembles it: its own line at top
    level, the invoking line for one in a macro body; an .error in a branch not taken is silent."""
    assert assemble_source('.if 0\n.error "never"\n.endif\nnop', base=BASE).code == b"\x90"
    with pytest.raises(AsmError) as excinfo:
        assemble_source('nop\n.if 1\n.error "boom"\n.endif\n', filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 3, "boom")
    source = '.macro M x\n.if \\x > 3\n.error "too big"\n.endif\n.byte \\x\n.endm\nM 1\nnop\nM 9\n'
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    assert asm_error(excinfo) == ("g.s", 9, "too big")


# ------------------------------------------------------------------------ numeric local labels


def test_numeric_local_labels_resolve_backward_and_forward() -> None:
    """`1b` jumps to the nearest `1:` before it, `1f` to the nearest after it, as in GNU as."""
    source = "1: nop\njmp 1b\njmp 1f\n1: int3\njmp 1b\n2: jmp 2f\n2: hlt\n"
    program = assemble_source(source, base=BASE)
    expected = assemble_source(
        "a: nop\njmp a\njmp b\nb: int3\njmp b\nc: jmp d\nd: hlt\n", base=BASE
    )
    assert program.code == expected.code, disassemble(program)
    assert not any(name.startswith("__tb_") for name in program.symbols), program.symbols


def test_numeric_local_label_mixed_with_a_named_label_on_one_line() -> None:
    """A statement may carry named and numeric labels together; only the named one is a symbol."""
    program = assemble_source("start: 1: nop\njmp 1b\n", base=BASE)
    assert program.symbols == {"start": BASE}
    assert disassemble(program)[1] == f"jmp {BASE:#x}"


def test_hex_and_binary_literals_are_not_local_label_references() -> None:
    """0x1b, 1bh and 0b1 stay numbers: only a bare `Nb`/`Nf` names a local label."""
    program = assemble_source("1: mov rax, 0x1b\nmov rbx, 1bh\nmov rcx, 0b1\n", base=BASE)
    assert disassemble(program) == ["mov rax, 0x1b", "mov rbx, 0x1b", "mov rcx, 1"]


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        ("nop\njmp 1b\n1: nop", 2, "1b: no local label 1: before it"),
        ("nop\njmp 3f\n3: nop\njmp 3f\n", 4, "3f: no local label 3: after it"),
        (".macro M\n1: nop\n.endm\n", 2, "numeric local label 1: inside a .macro, .rept or .irp body"),
        (".rept 2\n4: nop\n.endr\n", 2, "numeric local label 4: inside a .macro, .rept or .irp body"),
    ],
)
def test_numeric_local_label_errors_are_located(source: str, line: int, message: str) -> None:
    """A `1b` with no `1:` before it, a `1f` with none after it, or a `1:` in a body that is
    expanded more than once is refused at its line."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    file, at, text = asm_error(excinfo)
    assert (file, at) == ("g.s", line)
    assert message in text


def test_the_collector_is_paused_during_an_assembly_and_restored_after() -> None:
    """An assembly runs with the cyclic collector off and leaves it as it found it: on again
    after a program or an error, still off when it was off."""
    import gc

    from testbed.asm import assembler

    seen: list[bool] = []
    real = assembler._assemble_unit_now

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    original = assembler._assemble_unit_now
    assembler._assemble_unit_now = spy  # type: ignore[assignment]
    try:
        assert gc.isenabled()
        assemble_source("nop\n", base=0x1000)
        assert gc.isenabled()
        with pytest.raises(AsmError):
            assemble_source("no_such_instruction rax\n", base=0x1000)
        assert gc.isenabled()
        gc.disable()
        try:
            assemble_source("nop\n", base=0x1000)
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        assembler._assemble_unit_now = original  # type: ignore[assignment]
    assert seen == [False, False, False]


# --------------------------------------------------------------------------------------------
# Forms found by a third review (2026-12-01: a differential sweep against GNU as 2.40)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "encoded"), [
    ("lock add dword ptr [rbx], 0x100000000", "f08103" + "00000000"),
    ("mov al, 0x100h", "b000"),
    ("mov al, (256)", "b000"),
    ("mov rax, [rbx + 0x40000000*2]", "488b8300000080"),
    (".equ A, 0xffff\npush A", "666aff"),
    (".equ A, 0x100\nmov al, A", "b000"),
    ("mov rdi, K\n.equ K, 0x80000000", "48c7c700000080"),
    (".equ A, 0x10000\n.word A", ""),
    (".macro PUSHV v\npush \\v\n.endm\nPUSHV 0x80000000", "66680000"),
    ("jmp qword ptr L\nL: .quad 0", "eb00" + "00" * 8),
    ("mov rax, [rbx + rsp]", "488b0423"),
    ("mov eax, [eip + 8]", "8b4008"),
    ("mov rax, [rbx + rcx*(4)]", "488b03"),
    ("mov rbx, fs:0x28", "64488b1d28000000"),
    ("ljmp tbyte ptr [rbx]", "ff2b"),
    ("imul eax, 0x1ffffffff", "69c0ffffffff"),
])
def test_keystone_mis_encodes_these_forms_silently(source: str, encoded: str) -> None:
    """Canaries of the forms the front end refuses since the third review (each is another
    instruction or value than its source says, with no error from Keystone 0.9.2)."""
    assert engine._ks_asm(source + "\n", BASE) == bytes.fromhex(encoded)


@pytest.mark.parametrize(("source", "keystone", "gnu_as"), [
    (".quad 1 << 12 - 1", 0x800, 0xFFF),
    (".quad 6 & 3 + 1", 4, 3),
    (".quad 3 == 3", 1, -1),
    ("movabs rax, 6 | 1 ^ 3", 6, 4),
    ("movabs rax, -8 >> 1", -4, 0x7FFFFFFFFFFFFFFC),
])
def test_keystone_and_gnu_as_compute_these_expressions_differently(source: str, keystone: int, gnu_as: int) -> None:
    """Keystone's operator precedence, comparisons and (in an instruction) right shift are not GNU
    as's (the values GNU as 2.40 gives are in the table): the front end refuses such an
    expression (testbed/asm/guards.py agree)."""
    code = engine._ks_asm(source + "\n", BASE)
    assert struct.unpack("<q", code[-8:])[0] == keystone != gnu_as


def test_keystone_empties_the_unit_for_a_label_named_like_an_operand_keyword() -> None:
    """An instruction naming a label called `byte` makes Keystone return no bytes at all for
    the whole unit, with no error."""
    assert engine._ks_asm("nop\nbyte: nop\njmp byte\n", BASE) == b""


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        # a prefix does not hide the operands from the checks
        ("lock add dword ptr [rbx], 0x100000000", 1, "does not fit in 32 bits"),
        ("lock sub byte ptr [rbx], -129", 1, "does not fit in 8 bits"),
        ("xacquire lock add dword ptr [rbx], 0x100000000", 1, "does not fit in 32 bits"),
        ("lock add rax, rbx", 1, "lock needs a memory destination"),
        # macro, .irp and .rept bodies are checked as expanded
        (".macro PUSHV v\npush \\v\n.endm\nnop\nPUSHV 0x80000000", 5, "push 0x80000000 (in macro PUSHV at g.s:2)"),
        (".macro LD a\nmov rax, [rbx + \\a]\n.endm\nLD 0x100000000", 4, "displacement does not fit in 32 bits"),
        (".macro OUTER x\nINNER \\x\n.endm\n.macro INNER y\nmov al, \\y\n.endm\nOUTER 300", 7,
         "(in macro INNER at g.s:5, in macro OUTER at g.s:2): the immediate does not fit in 8 bits"),
        (".irp v, 1, 256\nmov al, \\v\n.endr", 2, "mov al, 256 (with v = 256)"),
        (".set i, 250\n.rept 10\nmov al, i\n.set i, i + 1\n.endr", 3, "does not fit in 8 bits"),
        (".macro M\nloop L\n.endm\nM\n.space 200\nL: nop", 2, "loop in a .macro, .rept or .irp body"),
        (".rept 1\njrcxz L\n.endr\n.space 200\nL: nop", 2, "jrcxz in a .macro, .rept or .irp body"),
        (".macro J\njmp 0x100000000\n.endm\nnop\nJ", 5, "jmp 0x100000000 (in macro J at g.s:2)"),
        (".macro J t\ncall \\t\n.endm\nJ 0xffffffff80000000", 4, "call 0xffffffff80000000"),
        # 0x...h literals
        ("push 0x80000000h", 1, "0x80000000h"),
        ("mov rax, [rbx + 0x100000000h]", 1, "0x100000000h"),
        (".word 0x10000h", 1, "0x10000h"),
        ("mov al, 0x100h", 1, "0x100h"),
        (".quad 2**3", 1, "`**` is no operator"),
        (".space 4, 0x1ff", 1, "fill value 0x1ff does not fit in a byte"),
        (".equ F, -129\n.skip 2, F", 2, "fill value F does not fit in a byte"),
        # constant expressions
        ("mov al, (256)", 1, "does not fit in 8 bits"),
        ("mov al, +256", 1, "does not fit in 8 bits"),
        ("mov rax, [rbx + 0x40000000*2]", 1, "displacement does not fit in 32 bits"),
        ("cmp ax, 0x8000 * 2", 1, "does not fit in 16 bits"),
        # expressions GNU as computes otherwise
        (".equ M, 1 << 12 - 1", 1, "Keystone computes 0x800 where GNU as computes 0xfff"),
        ("mov eax, 6 & 3 + 1", 1, "Keystone computes 0x4 where GNU as computes 0x3"),
        ("mov al, 6 | 1 ^ 3", 1, "add parentheses"),
        (".quad 3 == 3", 1, "GNU as computes -0x1"),
        ("mov rax, -8 >> 1", 1, "add parentheses"),
        ("mov rax, [rbx + 1 << 4 + 1]", 1, "Keystone computes 0x20 where GNU as computes 0x11"),
        (".if 6 & 3 + 1 - 4\nnop\n.endif", 1, "add parentheses"),
        (".macro M v\n.set q, \\v << 2 + 1\nmov eax, q\n.endm\nnop\nM 1", 6, "(in macro M at g.s:2)"),
        # symbols whose values the front end knows
        (".equ A, 0xffff\npush A", 2, "sign-extended byte"),
        (".equ A, 0x80000000\npush A", 2, "does not fit its encoding"),
        (".equ K, 0x80000000\nmov rax, [rbx + K]", 2, "displacement does not fit in 32 bits"),
        (".equ A, 0x100\nmov al, A", 2, "does not fit in 8 bits"),
        (".equ A, 0x80\n.equ B, A * 2\nmov al, B", 3, "does not fit in 8 bits"),
        (".equ A, 0x10000\nret A", 2, "does not fit its encoding"),
        (".equ A, 0x10000\n.word A", 2, "does not fit in 16 bits"),
        (".equ A, 0x100000000\nimul eax, ebx, A", 2, "does not fit in 32 bits"),
        # symbols defined later: a sign-extended 32-bit field
        ("mov rdi, K\n.equ K, 0x80000000", 1, "K is defined after this statement"),
        ("push K\n.equ K, 0xffffffff", 1, "K is defined after this statement"),
        ("mov rax, 0+K\n.equ K, 0x80000000", 1, "defined after this statement"),
        ("mov rax, [rbx + K]\n.equ K, 0x80000000", 1, "defined after this statement"),
        ("test rax, K\n.equ K, 0x80000000", 1, "defined after this statement"),
        # `ptr` without brackets
        ("jmp qword ptr L\nL: .quad 0", 1, "`ptr` needs a memory operand in brackets"),
        ("call qword ptr L\nL: .quad 0", 1, "`ptr` needs a memory operand in brackets"),
        ("mov rax, qword ptr L\nL: .quad 0", 1, "`ptr` needs a memory operand in brackets"),
        ("push qword ptr L\nL: .quad 0", 1, "`ptr` needs a memory operand in brackets"),
        ("jmp qword ptr 0x1000", 1, "`ptr` needs a memory operand in brackets"),
        # RSP anywhere but first
        ("mov rax, [rbx + rsp]", 1, "RSP can only be the base register"),
        ("mov rax, [rax + rsp + 8]", 1, "RSP can only be the base register"),
        ("mov rax, [r12 + rsp]", 1, "RSP can only be the base register"),
        ("mov eax, [ebx + esp]", 1, "ESP can only be the base register"),
        ("mov rax, [rbx + 8 + rsp]", 1, "RSP can only be the base register"),
        # eip / ip
        ("mov eax, [eip + 8]", 1, "eip"),
        ("lea rax, [eip + L]\nL: nop", 1, "eip"),
        ("mov eax, [ip + 8]", 1, "ip"),
        # scales
        ("mov rax, [rbx + rcx*(4)]", 1, "scale"),
        ("mov rax, [rbx + rcx*(2+2)]", 1, "scale"),
        ("mov rax, [rbx + rcx*2*2]", 1, "scale"),
        ("mov rax, [rbx + rcx*-1]", 1, "scale"),
        ("mov rax, [rbx + (rcx)]", 1, "scale"),
        # a segment override without brackets
        ("mov rbx, fs:0x28", 1, "fs:0x28"),
        ("mov rbx, ds:0x200000", 1, "ds:0x200000"),
        ("mov rax, qword ptr fs:L\nL: nop", 1, "fs:L"),
        # far indirect jumps and calls
        ("ljmp tbyte ptr [rbx]", 1, "16:64"),
        ("lcall qword ptr [rbx]", 1, "16:64"),
        ("ljmp dword ptr [rbx]", 1, "fword"),
        # two-operand imul
        ("imul eax, 0x1ffffffff", 1, "does not fit in 32 bits"),
        ("imul ax, 0x10000", 1, "does not fit in 16 bits"),
        # a symbol named like an operand keyword, where Keystone reads the keyword
        ("byte: nop\njmp byte", 2, "byte: a symbol named like an operand keyword"),
        ("nop\ndword:\nmov rax, dword", 3, "dword: a symbol named like an operand keyword"),
        (".equ qword, 5\nmov rax, qword + 1", 2, "qword: a symbol named like an operand keyword"),
        ("far = 8\nmov rax, -far", 2, "far: a symbol named like an operand keyword"),
        (".equ FAR, 8\nmov rax, [rbx - FAR]", 2, "FAR: a symbol named like an operand keyword"),
        (".macro M v\njmp \\v\n.endm\nword: nop\nM word", 5, "jmp word (in macro M at g.s:2): word: a symbol"),
        # one name as both a constant and a label
        (".equ X, 5\nnop\nX: nop", 3, "X is already a symbol defined by .equ at g.s:1"),
        ("X: nop\n.equ X, 5", 2, "X is already a label at g.s:1"),
        ("X: nop\nX = 5", 2, "X is already a label at g.s:1"),
    ],
)
def test_a_form_the_third_review_found_is_refused_at_its_line(source: str, line: int, message: str) -> None:
    """Each form Keystone 0.9.2 would silently encode as another instruction or value (see
    test_keystone_mis_encodes_these_forms_silently) is an error at its line instead: a macro
    expansion's at the line that expands it, naming the body line; a .rept/.irp body's at its
    own line."""
    with pytest.raises(AsmError) as excinfo:
        assemble_source(source, filename="g.s", base=BASE)
    file, at, text = asm_error(excinfo)
    assert (file, at, message in text) == ("g.s", line, True), text


def test_a_define_named_like_an_operand_keyword_is_refused_where_keystone_misreads_it() -> None:
    """-D FAR=8 may stand alone as an operand; after an operator Keystone would load from memory."""
    assert disassemble(assemble_source("mov rax, FAR", base=BASE, defines={"FAR": 8})) == ["mov rax, 8"]
    with pytest.raises(AsmError, match="FAR: a symbol named like an operand keyword"):
        assemble_source("mov rax, 1 + FAR", base=BASE, defines={"FAR": 8})


@pytest.mark.parametrize(("source", "decoded"), [
    ("lock add dword ptr [rbx], 1", ["lock add dword ptr [rbx], 1"]),
    (".macro PUSHV v\npush \\v\n.endm\nPUSHV 0x7fffffff\nPUSHV rax", ["push 0x7fffffff", "push rax"]),
    (".irp v, 1, 255\nmov al, \\v\n.endr", ["mov al, 1", "mov al, 0xff"]),
    (".macro J\nloop_target: nop\n.endm\nJ", ["nop"]),
    ("mov al, (255)", ["mov al, 0xff"]),
    ("mov al, 0xffffffffffffffff", ["mov al, 0xff"]),
    ("mov al, 2 * 3 + 1", ["mov al, 7"]),
    ("mov eax, (1 << 12) - 1", ["mov eax, 0xfff"]),
    ("mov rax, [rbx + (1 << 4) + 1]", ["mov rax, qword ptr [rbx + 0x11]"]),
    ("mov rax, [rbx + 0x40000000 - 1 + 0x40000000]", ["mov rax, qword ptr [rbx + 0x7fffffff]"]),
    (".equ A, 0x7fffffff\npush A", ["push 0x7fffffff"]),
    (".equ A, 0x80000000\nmov rdi, A", ["movabs rdi, 0x80000000"]),
    (".equ A, 0xff\nmov al, A", ["mov al, 0xff"]),
    ("mov rdi, K\n.equ K, 0x7fffffff", ["mov rdi, 0x7fffffff"]),
    ("mov rdi, K\n.equ K, -1", ["mov rdi, 0xffffffffffffffff"]),
    ("push K\n.equ K, 0xffff", ["push 0xffff"]),
    ("mov eax, K\n.equ K, 0x80000000", ["mov eax, 0x80000000"]),
    ("mov rax, [rsp + rbx]", ["mov rax, qword ptr [rsp + rbx]"]),
    ("mov rax, [8 + rsp + rbx]", ["mov rax, qword ptr [rsp + rbx + 8]"]),
    ("mov rax, [rbx + 4*rcx]", ["mov rax, qword ptr [rbx + rcx*4]"]),
    ("mov rax, [rbx + rcx*0x8 + 16]", ["mov rax, qword ptr [rbx + rcx*8 + 0x10]"]),
    ("mov rax, qword ptr fs:[rbx + 8]", ["mov rax, qword ptr fs:[rbx + 8]"]),
    ("mov rax, fs:[rbx]", ["mov rax, qword ptr fs:[rbx]"]),
    ("jmp qword ptr [rip + L]\nL: .quad 0", ["jmp qword ptr [rip]"]),
    ("ljmp fword ptr [rbx]", ["jmp ptr [rbx]"]),
    ("ljmp [rbx]", ["jmp ptr [rbx]"]),
    ("imul eax, 0x7fffffff", ["imul eax, eax, 0x7fffffff"]),
    ("imul eax, ebx", ["imul eax, ebx"]),
    ("mov rax, qword ptr [rip + word]\nword: .quad 0", ["mov rax, qword ptr [rip]"]),
    (".equ far, 8\nmov rax, far\nmov rax, [rbx + far]", ["mov rax, 8", "mov rax, qword ptr [rbx + 8]"]),
])
def test_forms_next_to_the_refused_ones_assemble_as_written(source: str, decoded: list[str]) -> None:
    """The neighbours of each refused form still assemble, to what they say."""
    assert disassemble(assemble_source(source, filename="g.s", base=BASE))[: len(decoded)] == decoded


def test_a_define_keystone_accepted_is_not_sent_again_and_a_refused_one_always_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A define's value is checked alone by Keystone once per process (the answer cannot
    change); a value it refuses is refused again, with Keystone asked each time."""
    from testbed.asm import frontend

    sent: list[str] = []
    real = frontend._ks_asm

    def keystone(text: str, base: int, *, probe: bool = False) -> bytes:
        sent.append(text)
        if "REFUSED" in text:  # as Keystone answers a value it cannot parse
            raise engine._KeystoneError("KS_ERR_ASM_INVALIDOPERAND", "invalid operand")
        return real(text, base, probe=probe)

    monkeypatch.setattr(frontend, "_ks_asm", keystone)
    monkeypatch.setattr(frontend, "_KEYSTONE_ACCEPTED", set())
    assert parse_define("ONCE_ONLY=0x40 + 2") == ("ONCE_ONLY", "0x40 + 2")
    assert parse_define("ONCE_ONLY=0x40 + 2") == ("ONCE_ONLY", "0x40 + 2")
    assert sent == [".equ ONCE_ONLY, 0x40 + 2\n"]
    for _ in range(2):
        with pytest.raises(UsageError, match=r"define REFUSED=7: not a valid expression \(invalid operand\)"):
            parse_define("REFUSED=7")
    assert sent[1:] == [".equ REFUSED, 7\n"] * 2
