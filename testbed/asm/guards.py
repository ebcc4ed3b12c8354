"""Mis-assembly guards: operands Keystone 0.9.2 would hang on or silently mis-encode, refused or rewritten."""

from __future__ import annotations

import re
from collections.abc import Callable

from testbed.asm.program import SourceLocation
from testbed.asm.syntax import (
    _DATA_DIRECTIVES,
    _REGISTER,
    _integer_value,
    _references,
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


