"""Mis-assembly guards: operands Keystone 0.9.2 would hang on or silently mis-encode, refused or rewritten."""

from __future__ import annotations

import re
from collections.abc import Callable, Container

from testbed.asm.program import SourceLocation
from testbed.asm.syntax import (
    _DATA_DIRECTIVES,
    _REGISTER,
    _integer_value,
    _references,
    _split_labels,
    _split_top_level,
    _strip_literals,
)
from testbed.errors import AsmError

_BINARY_OPERATOR_START = re.compile(r"(?:[*/%&|^<>=]|!=)")
_OPERATOR_END = re.compile(r"[-+*/%&|^~!<>=(]$")
_EQU_OPERANDS = re.compile(r"[A-Za-z_.$\\][\w.$@\\()]*\s*,\s*\S")


def _check_operands(directive: str, operands: str, macro_call: bool, loc: SourceLocation) -> None:
    """Reject malformed operands before Keystone sees them.

    Hazard: on these Keystone 0.9.2 either loops forever (`.equ X = 5`, `.byte 1,,2`,
    `.quad [1]`, `.byte &`) or silently assembles something else (`mov rax, [rbx` becomes
    `movabs rax, [0]`; `.byte 1 +` and `mov rax, &` vanish). Canaries:
    test_unclosed_bracket_becomes_absolute_zero, test_empty_operand_drops_the_statement.
    """
    text = _strip_literals(operands)
    depth: list[str] = []
    for c in text:
        if c in "([{":
            depth.append(c)
        elif c in ")]}" and (not depth or "([{"[")]}".index(c)] != depth.pop()):
            raise AsmError(loc.file, loc.line, f"unbalanced {c!r} in {operands!r}")
    if depth:
        raise AsmError(loc.file, loc.line, f"unclosed {depth[-1]!r} in {operands!r}")
    if directive in (".equ", ".set", ".equiv") and not _EQU_OPERANDS.match(operands):
        raise AsmError(loc.file, loc.line, f"{directive} expects NAME, VALUE")
    if directive in _DATA_DIRECTIVES and ("[" in text or "{" in text):
        raise AsmError(loc.file, loc.line, f"brackets are not allowed in {directive} operands")
    if not text.strip() or macro_call:
        return  # macro arguments may be empty or partial expressions
    pieces = _split_top_level(text)
    if directive in (".align", ".balign", ".p2align", ".fill") and len(pieces) > 1:
        pieces = [p for p in pieces if p.strip()]  # `.balign 8, , 3` omits the fill value
    for piece in (p.strip() for p in pieces):
        if not piece:
            raise AsmError(loc.file, loc.line, f"empty operand in {operands!r}")
        if _BINARY_OPERATOR_START.match(piece) or _OPERATOR_END.search(piece):
            raise AsmError(loc.file, loc.line, f"incomplete expression {piece!r}")


# Integer literals as Keystone reads them: 0x hex, 0b binary, h-suffixed hex, 0-prefixed
# octal, decimal. A `-` counts as unary after the start, an opening bracket, a comma or an
# operator.
_INTEGER = re.compile(
    r"(?P<minus>(?:^|(?<=[(\[,+\-*/%&|^~!<>=]))\s*-\s*)?"
    r"\b(?P<number>0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH]|[0-9]+)\b"
)


_DIGIT = re.compile(r"\d")


def _check_literals(text: str, loc: SourceLocation) -> None:
    """Refuse an integer literal outside [-2^63, 2^64).

    Hazard: Keystone 0.9.2 hangs on one in a directive (`.quad 0x10000000000000000`),
    silently drops a macro call that passes one (`GUEST_SYNC 0x10000000000000000` assembles
    without its `movabs`), and silently wraps `-0x8000000000000001` to 0x7fffffffffffffff.
    Canaries: tests/test_guest_api_immediates.py (test_oversized_literal_*).
    """
    plain = _strip_literals(text)
    if not _DIGIT.search(plain):
        return
    # The operands alone: a minus right after the mnemonic or directive is unary
    # (`.quad -0x8000000000000001`), as after a comma.
    rest = _split_labels(plain)[1]
    plain = rest[len(rest.split(None, 1)[0]):].strip() if rest.split(None, 1) else rest
    for m in _INTEGER.finditer(plain):
        value = _integer_value(m.group("number"))
        if value is None:
            continue
        limit = 2**63 if m.group("minus") else 2**64 - 1
        if value > limit:
            number = m.group(0).strip().replace(" ", "")
            raise AsmError(loc.file, loc.line, f"the number {number} does not fit in 64 bits")


# Hazard: in instruction operands Keystone's Intel-syntax parser handles a symbol only as the
# first token of an immediate, and only as one added term of an address: `mov rax, -K` and
# `cmp rax, 1+K` load from memory at K, `[rbx - K]` becomes `[rbx + K]`, `[rbx + K*8]` becomes
# `[rbx + K]`, silently. Directive expressions are parsed right, so such an expression is moved
# into a hidden `.equ` just before the statement (`.equ` may be redefined, so this works in
# macro bodies too). Canaries: test_symbol_after_an_operator_becomes_a_memory_operand,
# test_negated_symbol_in_an_address_loses_its_sign.
_BARE_NAME = re.compile(r"[A-Za-z_.$][\w.$@]*")
_PARAM_TOKEN = re.compile(r"\\[\w$.]")
_SYMBOL_FIRST = re.compile(r"\s*(?:\\[\w$.]|[A-Za-z_.$])")
_ADDRESS = re.compile(r"\[([^\[\]]*)\]")


def _symbolic(text: str) -> bool:
    """Whether (literal-free) `text` names a symbol or a macro parameter that may be one."""
    return bool(_references(text) or _PARAM_TOKEN.search(text))


def _signed_terms(text: str) -> list[tuple[str, int, int]]:
    """The terms of a (literal-free) sum as (sign, start, end), split at `+`/`-` outside parentheses."""
    terms, depth, sign, start = [], 0, "+", 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c in "+-" and depth == 0:
            if text[start:i].strip():
                terms.append((sign, start, i))
                sign = c
            elif c == "-":  # a unary minus at the start of a term
                sign = "-" if sign == "+" else "+"
            start = i + 1
    if text[start:].strip():
        terms.append((sign, start, len(text)))
    return terms


def _hoist_operands(operands: str, new_name: Callable[[], str]) -> tuple[str, list[str]]:
    """Operands with every expression Keystone would mis-encode replaced by a hidden `.equ` name,
    and the `.equ` lines defining those names."""
    hoisted: list[str] = []

    def hoist(expression: str) -> str:
        name = new_name()
        hoisted.append(f".equ {name}, {expression}")
        return name

    def address(content: str) -> str:
        plain = _strip_literals(content)
        if not _symbolic(plain):
            return content
        base, displacement, symbols = [], [], []
        for sign, start, end in _signed_terms(plain):
            term, original = plain[start:end].strip(), content[start:end].strip()
            words = re.findall(r"[A-Za-z_][\w]*", term)
            if "\\" in term or any(_REGISTER.fullmatch(w.lower()) for w in words):
                base.append((sign, original))  # a register (or a parameter that may be one)
            else:
                displacement.append((sign, original))
                if _references(term):
                    symbols.append((sign, term))
        if len(symbols) <= 1 and all(sign == "+" and _BARE_NAME.fullmatch(t) for sign, t in symbols):
            return content
        kept = " ".join(f"{sign} {term}" for sign, term in base)
        name = hoist(" ".join(f"{sign} ({term})" for sign, term in displacement))
        return f"{kept.removeprefix('+ ')} + {name}" if kept else name

    pieces = []
    for piece in _split_top_level(operands):
        if "[" in piece:
            pieces.append(_ADDRESS.sub(lambda m: f"[{address(m.group(1))}]", piece))
            continue
        plain = _strip_literals(piece)
        if _symbolic(plain) and not _SYMBOL_FIRST.match(plain):
            lead = len(piece) - len(piece.lstrip())
            pieces.append(piece[:lead] + hoist(piece.strip()))
        else:
            pieces.append(piece)
    return ",".join(pieces), hoisted




# Hazard: Keystone 0.9.2 silently encodes an immediate wider than its operand modulo the operand's
# size (`mov eax, 0x1ffffffff` is `mov eax, 0xffffffff`, `cmp al, 300` is `cmp al, 0x2c`, `push
# 0x100000000` is `push word 0`), drops a displacement outside 32 bits (`[rbx + 0x100000000]` is
# `[rbx]`), encodes RSP as an index as no index at all (`[rbx + rsp*2]` is `[rbx + riz*2]`), makes a
# `.word` out of range vanish, and ignores negative counts (`.space -5`), alignments that are no
# power of two (`.align 3`) and `.fill` sizes above 8. Only plain integer literals are checked here
# (expressions and symbols are Keystone's). Canaries: tests/test_asm.py (test_*_is_refused_at_its_line).
_REG_WIDTH = {
    **{r: 8 for r in ("al", "bl", "cl", "dl", "ah", "bh", "ch", "dh", "sil", "dil", "spl", "bpl",
                      *(f"r{i}b" for i in range(8, 16)))},
    **{r: 16 for r in ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp", *(f"r{i}w" for i in range(8, 16)))},
    **{r: 32 for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp", *(f"r{i}d" for i in range(8, 16)))},
}
#: instructions whose second operand is an immediate of the first (register) operand's width
_IMMEDIATE_OF_WIDTH = frozenset({"mov", "add", "sub", "and", "or", "xor", "cmp", "test", "adc", "sbb"})
_LITERAL = re.compile(r"\s*(-)?\s*(0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH]|[0-9]+)\s*$")
_INDEX_SP = re.compile(r"\b[re]?sp\s*\*|\*\s*[re]?sp\b", re.IGNORECASE)
_WORD_DIRECTIVES = frozenset({".word", ".short", ".value", ".2byte"})
_COUNT_DIRECTIVES = frozenset({".space", ".skip", ".zero", ".fill"})


def _literal(text: str) -> int | None:
    """The value of `text` if it is one plain integer literal (maybe negated), else None."""
    m = _LITERAL.match(text)
    if m is None:
        return None
    value = _integer_value(m.group(2))
    if value is None:
        return None
    return -value if m.group(1) else value


def _fits(value: int, bits: int) -> bool:
    """Whether `value` is a `bits`-wide signed or unsigned number."""
    return -(1 << (bits - 1)) <= value < (1 << bits)


# Hazard: Keystone 0.9.2 also encodes, without an error (canaries in tests/test_keystone_canary.py,
# refusals in tests/test_asm.py):
# - a memory operand holding only an absolute address (literals and constants defined before) as
#   RIP-relative: `mov rbx, [0x200000]` is `mov rbx, [rip + 0x200000]`, `lea rax, [K]` likewise;
#   only MOV with AL/AX/EAX/RAX has the absolute moffs form (a label is encoded absolute);
# - RIP-relative with an index register as no index: `lea rax, [rip + rcx]` is `lea rax, [rip]`;
# - an immediate wider than a BYTE/WORD/DWORD PTR memory destination, or than a three-operand
#   IMUL's register, modulo its size (`mov byte ptr [rbx], 256` stores 0);
# - PUSH 0xff80..0xffff as a sign-extended byte (`push 0xffff` pushes -1);
# - PUSHF, POPF and IRET as their 16-bit forms (66 9c: RSP moves by 2), INTO and SALC, which do
#   not exist in 64-bit mode;
# - a statement using `$` (the current address) that another statement follows: it vanishes.
_MEM_WIDTH = {"byte": 8, "word": 16, "dword": 32}
_SIZED_MEMORY = re.compile(r"\s*(byte|word|dword)\s+ptr\b", re.IGNORECASE)
_ACCUMULATORS = frozenset({"al", "ax", "eax", "rax"})
_SIXTEEN_BIT_FORMS = {"pushf": "pushfq", "popf": "popfq", "iret": "iretq"}
_NOT_IN_64_BIT = frozenset({"into", "salc"})


def _absolute_address(content: str, absolute: Container[str]) -> bool:
    """Whether a register-free address is a constant: every name in it defined before (a define
    or an absolute `.equ`), so Keystone knows its value - and encodes it RIP-relative."""
    return all(name in absolute for name in _references(content))


def _check_encodable(mnemonic: str, directive: str, operands: str, loc: SourceLocation,
                     absolute: Container[str] = frozenset()) -> None:
    """Refuse the plain literals and forms Keystone would encode as another instruction or value
    (see the hazards above); `absolute`: the names defined before as constants."""
    if not directive:
        if mnemonic in _SIXTEEN_BIT_FORMS and not operands.strip():
            raise AsmError(loc.file, loc.line, f"{mnemonic}: Keystone assembles the 16-bit form; write "
                                               f"{_SIXTEEN_BIT_FORMS[mnemonic]}")
        if mnemonic in _NOT_IN_64_BIT:
            raise AsmError(loc.file, loc.line, f"{mnemonic} does not exist in 64-bit mode (#UD)")
        if "$" in _strip_literals(operands):
            raise AsmError(loc.file, loc.line, "`$` (the current address) makes Keystone drop the statement: "
                                               "use a label")
    pieces = [p.strip() for p in _split_top_level(operands)] if operands.strip() else []
    if directive:
        if directive in _WORD_DIRECTIVES:
            for piece in pieces:
                value = _literal(piece)
                if value is not None and not _fits(value, 16):
                    raise AsmError(loc.file, loc.line, f"{directive} value {piece} does not fit in 16 bits")
        elif directive in _COUNT_DIRECTIVES and pieces:
            count = _literal(pieces[0])
            if count is not None and count < 0:
                raise AsmError(loc.file, loc.line, f"{directive} count {pieces[0]} is negative")
            size = _literal(pieces[1]) if directive == ".fill" and len(pieces) > 1 else None
            if size is not None and not 0 <= size <= 8:
                raise AsmError(loc.file, loc.line, f".fill size {pieces[1]} is not between 0 and 8")
        elif directive in (".align", ".balign") and pieces:
            alignment = _literal(pieces[0])
            if alignment is not None and (alignment < 0 or alignment & (alignment - 1)):
                raise AsmError(loc.file, loc.line, f"{directive} {pieces[0]}: the alignment must be a power of two")
        return
    for piece in pieces:
        for address in _ADDRESS.findall(_strip_literals(piece)):
            if _INDEX_SP.search(address):
                raise AsmError(loc.file, loc.line, f"[{address.strip()}]: RSP cannot be an index register")
        for content in _ADDRESS.findall(piece):
            plain = _strip_literals(content)
            registers = [w for w in re.findall(r"[A-Za-z_]\w*", plain) if _REGISTER.fullmatch(w.lower())]
            if not registers:
                others = [p for p in pieces if p is not piece]
                moffs = mnemonic == "mov" and len(others) == 1 and others[0].lower() in _ACCUMULATORS
                if not moffs and content.strip() and _absolute_address(content, absolute):
                    raise AsmError(loc.file, loc.line, f"[{content.strip()}]: Keystone encodes an absolute address "
                                   "as RIP-relative here (only MOV with AL/AX/EAX/RAX has the absolute form): "
                                   "load the address into a register, or use a label")
                continue
            if "rip" in (r.lower() for r in registers) and len(registers) > 1:
                raise AsmError(loc.file, loc.line, f"[{content.strip()}]: RIP-relative addressing takes no index "
                                                   "register (Keystone drops it)")
            total, literal_only = 0, True
            for sign, start, end in _signed_terms(plain):
                term = content[start:end].strip()
                value = _literal(term)
                if value is not None:
                    total += -value if sign == "-" else value
                elif not re.fullmatch(r"[A-Za-z_]\w*(\s*\*\s*\d+)?|\d+\s*\*\s*[A-Za-z_]\w*", term):
                    literal_only = False
            if literal_only and not -(1 << 31) <= total < (1 << 31):
                raise AsmError(loc.file, loc.line, f"[{content.strip()}]: the displacement does not fit in "
                                                   "32 bits (signed)")
    if len(pieces) == 2 and mnemonic in _IMMEDIATE_OF_WIDTH:
        width = _REG_WIDTH.get(pieces[0].lower())
        sized = _SIZED_MEMORY.match(pieces[0])
        if width is None and sized is not None:
            width = _MEM_WIDTH[sized.group(1).lower()]
        value = _literal(pieces[1])
        if width is not None and value is not None and not _fits(value, width):
            raise AsmError(loc.file, loc.line, f"{mnemonic} {pieces[0]}, {pieces[1]}: the immediate does not fit "
                                               f"in {width} bits")
    if len(pieces) == 3 and mnemonic == "imul":
        width, value = _REG_WIDTH.get(pieces[0].lower()), _literal(pieces[2])
        if width is not None and value is not None and not _fits(value, width):
            raise AsmError(loc.file, loc.line, f"imul {operands.strip()}: the immediate does not fit in {width} bits")
    if len(pieces) == 1:
        value = _literal(pieces[0])
        if value is not None and ((mnemonic == "push" and not -(1 << 31) <= value < (1 << 31))
                                  or (mnemonic in ("ret", "retn", "retf") and not _fits(value, 16))):
            raise AsmError(loc.file, loc.line, f"{mnemonic} {pieces[0]}: the immediate does not fit its encoding")
        if value is not None and mnemonic == "push" and 0xFF80 <= value <= 0xFFFF:
            raise AsmError(loc.file, loc.line, f"push {pieces[0]}: Keystone encodes it as a sign-extended byte "
                                               f"(push {value - 0x10000}); load it into a register first")
    if mnemonic == "enter" and len(pieces) == 2:
        size, level = _literal(pieces[0]), _literal(pieces[1])
        if (size is not None and not 0 <= size < 1 << 16) or (level is not None and not 0 <= level < 1 << 8):
            raise AsmError(loc.file, loc.line, f"enter {operands.strip()}: the immediates do not fit (16 and 8 bits)")
