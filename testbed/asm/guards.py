"""Mis-assembly guards: operands Keystone 0.9.2 would hang on or silently mis-encode, refused or rewritten."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Container, Mapping
from dataclasses import dataclass
from typing import NoReturn

from testbed.asm.evaluate import Value, evaluate, fits, operand_value
from testbed.asm.program import SourceLocation
from testbed.asm.syntax import (
    _DATA_DIRECTIVES,
    _PREFIXES,
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
# `[rbx]`), makes a `.word` out of range vanish, and ignores negative counts (`.space -5`),
# alignments that are no power of two (`.align 3`) and `.fill` sizes above 8. It does so for a
# literal, a constant expression (`mov al, (256)`, `[rbx + 0x40000000*2]`) and a symbol whose
# value it knows (`.equ A, 0x100` then `mov al, A`) alike: operands are computed here as Keystone
# computes them (testbed/asm/evaluate.py) with the constants defined before. A symbol defined
# *after* the statement is encoded into the widest field the instruction has, and a 64-bit
# operation's is a sign-extended 32-bit one: `mov rdi, K` with K = 0x80000000 defined later
# loads 0xffffffff80000000, `push K` with K = 0xffffffff pushes -1, `[rbx + K]` is `[rbx -
# 0x80000000]` (narrower fields are Keystone's "invalid fixup" errors). Such a field is checked
# once the unit's constants are known (`Deferred`, _Preprocessor.finish). Canaries:
# tests/test_asm.py (test_keystone_mis_encodes_these_forms_silently, test_*_is_refused_at_its_line).
_REG_WIDTH = {
    **{r: 8 for r in ("al", "bl", "cl", "dl", "ah", "bh", "ch", "dh", "sil", "dil", "spl", "bpl",
                      *(f"r{i}b" for i in range(8, 16)))},
    **{r: 16 for r in ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp", *(f"r{i}w" for i in range(8, 16)))},
    **{r: 32 for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp", *(f"r{i}d" for i in range(8, 16)))},
    **{r: 64 for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", *(f"r{i}" for i in range(8, 16)))},
}
#: instructions whose second operand is an immediate of the first operand's width
_IMMEDIATE_OF_WIDTH = frozenset({"mov", "add", "sub", "and", "or", "xor", "cmp", "test", "adc", "sbb"})
_WORD_DIRECTIVES = frozenset({".word", ".short", ".value", ".2byte"})
_COUNT_DIRECTIVES = frozenset({".space", ".skip", ".zero", ".fill"})
_VALUE_DIRECTIVES = _DATA_DIRECTIVES - {".ascii", ".asciz", ".string", ".single", ".float", ".double"}
# Where an expression may mean another value to GNU as than to Keystone: two binary operators, a
# comparison or a right shift (see testbed/asm/evaluate.py).
_MAY_DIVERGE = re.compile(r"[*/%&|^<>=!]|\S\s*[-+]")


def _show(value: int) -> str:
    return f"-0x{-value:x}" if value < 0 else f"0x{value:x}"


def agree(text: str, value: Value, loc: SourceLocation) -> None:
    """AsmError if GNU as computes `text` otherwise than Keystone (`value`, see evaluate.py).

    Hazard: Keystone's operator precedence is not GNU as's (`1 << 12 - 1` is 0x800, not 0xfff;
    `6 & 3 + 1` is 4, not 3), nor is a comparison's value (1, not -1), nor (in an instruction)
    `>>` (arithmetic), so a source written for GNU as gets another value, silently. Canaries:
    tests/test_asm.py (test_keystone_and_gnu_as_compute_these_expressions_differently).
    """
    if value.gas is not None and value.value is not None:
        raise AsmError(loc.file, loc.line, f"{text.strip()}: Keystone computes {_show(value.value)} where GNU as "
                       f"computes {_show(value.gas)} (operator precedence, a comparison's -1 or a right shift): "
                       "add parentheses")
_U64 = (1 << 64) - 1


def _simm32(value: int) -> bool:
    """Whether `value` (modulo 2^64) is what a sign-extended 32-bit field holds."""
    return fits(value, 32) and not (1 << 31) <= value & _U64 < (1 << 32)


# Hazard: Keystone 0.9.2 also encodes, without an error (canaries in tests/test_keystone_canary.py
# and tests/test_asm.py, refusals in tests/test_asm.py):
# - a memory operand holding only an absolute address (literals and constants defined before) as
#   RIP-relative: `mov rbx, [0x200000]` is `mov rbx, [rip + 0x200000]`, `lea rax, [K]` likewise;
#   only MOV with AL/AX/EAX/RAX has the absolute moffs form (a label is encoded absolute); a
#   segment override without brackets likewise (`mov rbx, fs:0x28` is `fs:[rip + 0x28]`), and
#   before a label the override is dropped;
# - RIP-relative with an index register as no index: `lea rax, [rip + rcx]` is `lea rax, [rip]`;
# - RSP anywhere but as the base as no register at all: `[rbx + rsp*2]` and `[rbx + rsp]` are
#   `[rbx + riz...]`, `[r12 + rsp]` is `[r12]`; a scale that is not one plain 1, 2, 4 or 8 is
#   dropped or cut (`[rbx + rcx*(4)]` is `[rbx]`, `[rbx + rcx*2*2]` is `[rbx + rcx*2]`); `eip`
#   and `ip` as RAX (`[eip + 8]` is `[rax + 8]`);
# - `ptr` without brackets as nothing: `jmp qword ptr L` is a direct `jmp L`, `mov rax, qword
#   ptr L` loads L's address;
# - every LJMP/LCALL through memory as the 16:32 far pointer (FF /5, FF /3 without REX.W):
#   `ljmp tbyte ptr [rbx]` and `lcall qword ptr [rbx]` read a 16:32 pointer, not 16:64;
# - an immediate wider than a BYTE/WORD/DWORD PTR memory destination, or than an IMUL's register,
#   modulo its size (`mov byte ptr [rbx], 256` stores 0), also behind a prefix (`lock add dword
#   ptr [rbx], 0x100000000`);
# - PUSH 0xff80..0xffff as a sign-extended byte (`push 0xffff` pushes -1);
# - PUSHF, POPF and IRET as their 16-bit forms (66 9c: RSP moves by 2), INTO and SALC, which do
#   not exist in 64-bit mode;
# - a statement using `$` (the current address) that another statement follows: it vanishes.
_MEM_WIDTH = {"byte": 8, "word": 16, "dword": 32, "qword": 64}
_SIZED_MEMORY = re.compile(r"\s*(byte|word|dword|qword)\s+ptr\b", re.IGNORECASE)
_ACCUMULATORS = frozenset({"al", "ax", "eax", "rax"})
_SIXTEEN_BIT_FORMS = {"pushf": "pushfq", "popf": "popfq", "iret": "iretq"}
_NOT_IN_64_BIT = frozenset({"into", "salc"})
_PTR = re.compile(r"\bptr\b(?!\s*(?:[cdefgs]s\s*:\s*)?\[)", re.IGNORECASE)
_INSTRUCTION_POINTER = re.compile(r"(?<![\w.$@\\])(e?ip)(?![\w.$@])", re.IGNORECASE)
_BARE_SEGMENT = re.compile(r"(?<![\w.$@\\])([cdefgs]s)\s*:\s*(?!\[)(\S*)", re.IGNORECASE)
_FAR_SIZE = re.compile(r"\b(\w+)\s+ptr\b", re.IGNORECASE)
_STACK_POINTERS = frozenset({"rsp", "esp"})
_SCALED = re.compile(r"(?P<reg>[A-Za-z]\w*)\s*\*\s*(?P<scale>\w+)|(?P<scale2>\w+)\s*\*\s*(?P<reg2>[A-Za-z]\w*)")
_WORD = re.compile(r"[A-Za-z_.$][\w.$@]*")


@dataclass(frozen=True)
class Deferred:
    """A sign-extended 32-bit field given a symbol defined after its statement: checked when the
    unit's constants are known (check_deferred)."""

    loc: SourceLocation
    statement: str  # as the error shows it
    expression: str  # the field's value, in directive syntax
    bindings: tuple[tuple[str, int], ...]  # the values the statement saw of the names it knew
    what: str  # the field, for the message
    hint: str = ""


class Scope:
    """What the checks know of names at a statement: `values` of the constants Keystone knows
    there, `absolute` the names it knows as constants (some without a value computed here),
    `settled` the names that are known not to be constants defined later (labels, and names
    a macro expansion defines), `keywords` the symbols named like an operand keyword (lower
    case)."""

    def __init__(self, values: Mapping[str, int], absolute: Container[str] = frozenset(),
                 settled: Container[str] = frozenset(), keywords: Collection[str] = frozenset()) -> None:
        self.values, self.absolute, self.settled, self.keywords = values, absolute, settled, keywords

    def forward(self, name: str) -> bool:
        """Whether `name` may be a constant defined after this statement."""
        return name not in self.absolute and name not in self.settled


_NO_NAMES = Scope({})


def strip_prefixes(mnemonic: str, operands: str) -> tuple[str, str]:
    """The instruction behind its prefixes (`lock`, `rep`, ...): its mnemonic and operands."""
    while mnemonic in _PREFIXES and operands:
        head, _, rest = operands.strip().partition(" ")
        mnemonic, operands = head.lower(), rest.strip()
    return mnemonic, operands


def _bindings(expression: str, values: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted((name, values[name]) for name in _references(expression) if name in values))


def _check_directive(directive: str, pieces: list[str], scope: Scope, loc: SourceLocation) -> None:
    def value(text: str) -> int | None:
        return evaluate(text, scope.values).value

    for piece in pieces:
        if _MAY_DIVERGE.search(_strip_literals(piece)):
            agree(piece, evaluate(piece, scope.values), loc)

    if directive in _WORD_DIRECTIVES:
        for piece in pieces:
            v = value(piece)
            if v is not None and not fits(v, 16):
                raise AsmError(loc.file, loc.line, f"{directive} value {piece} does not fit in 16 bits")
    elif directive in _COUNT_DIRECTIVES and pieces:
        count = value(pieces[0])
        if count is not None and count < 0:
            raise AsmError(loc.file, loc.line, f"{directive} count {pieces[0]} is negative")
        size = value(pieces[1]) if directive == ".fill" and len(pieces) > 1 else None
        if size is not None and not 0 <= size <= 8:
            raise AsmError(loc.file, loc.line, f".fill size {pieces[1]} is not between 0 and 8")
        fill = value(pieces[1]) if directive != ".fill" and len(pieces) > 1 else None
        if fill is not None and not fits(fill, 8):
            # Hazard: Keystone 0.9.2 fills with the low byte (`.space 4, 0x1ff` is ff ff ff ff).
            raise AsmError(loc.file, loc.line, f"{directive} fill value {pieces[1]} does not fit in a byte")
    elif directive in (".align", ".balign") and pieces:
        alignment = value(pieces[0])
        if alignment is not None and (alignment < 0 or alignment & (alignment - 1)):
            raise AsmError(loc.file, loc.line, f"{directive} {pieces[0]}: the alignment must be a power of two")


def _check_forms(mnemonic: str, operands: str, plain: str, pieces: list[str], loc: SourceLocation) -> None:
    """Refuse the operand forms Keystone encodes as another instruction (see the hazards above)."""
    def refuse(message: str) -> NoReturn:
        raise AsmError(loc.file, loc.line, message)

    if mnemonic in _SIXTEEN_BIT_FORMS and not operands.strip():
        refuse(f"{mnemonic}: Keystone assembles the 16-bit form; write {_SIXTEEN_BIT_FORMS[mnemonic]}")
    if mnemonic in _NOT_IN_64_BIT:
        refuse(f"{mnemonic} does not exist in 64-bit mode (#UD)")
    if "$" in plain:
        refuse("`$` (the current address) makes Keystone drop the statement: use a label")
    lower = plain.lower()
    if "ptr" in lower and (m := _PTR.search(plain)):
        sized = plain[:m.end()].rsplit(",", 1)[-1].strip()
        refuse(f"{operands.strip()}: `ptr` needs a memory operand in brackets ({sized} [...]): Keystone ignores a "
               "`ptr` without them (`jmp qword ptr L` is a direct jump to L, `mov rax, qword ptr L` loads L's "
               "address)")
    if "ip" in lower and (m := _INSTRUCTION_POINTER.search(plain)):
        refuse(f"{m.group(1)}: 64-bit code addresses relative to rip (Keystone encodes {m.group(1)} as rax: "
               "`[eip + 8]` is `[rax + 8]`)")
    if ":" in plain and (m := _BARE_SEGMENT.search(plain)):
        written = f"{m.group(1)}:{m.group(2).rstrip(',')}"
        refuse(f"{written}: a segment override needs brackets ({m.group(1)}:[...]): Keystone encodes "
               f"{m.group(1)}:ADDRESS RIP-relative, and drops the override before a label")
    if mnemonic in ("ljmp", "lcall"):
        sizes = [s.lower() for s in _FAR_SIZE.findall(plain)]
        if any(s in ("tbyte", "qword", "xword") for s in sizes):
            refuse(f"{mnemonic} {operands.strip()}: Keystone 0.9.2 cannot encode the 16:64 far pointer (REX.W): "
                   f"every {mnemonic} through memory reads a 16:32 pointer (write fword ptr for that)")
        if any(s != "fword" for s in sizes):
            refuse(f"{mnemonic} {operands.strip()}: a far pointer in memory is fword ptr (16:32); Keystone "
                   "encodes every size as that")
    if "[" in plain:
        for content in _ADDRESS.findall(plain):
            _check_registers(content, loc)


_SIZES = frozenset({"byte", "word", "dword", "qword", "tbyte", "fword", "mmword", "xmmword", "ymmword", "zmmword",
                    "xword", "oword"})


def _check_keyword_symbols(pieces: list[str], keywords: Collection[str], loc: SourceLocation) -> None:
    """Where an instruction names a symbol called like an operand keyword: alone as an operand
    (not a size), or added in brackets.

    Hazard: the front end reads such a name as the keyword, so it does not move `-FAR` or `1 +
    FAR` into a hidden `.equ` (Keystone loads from memory at FAR), nor `[rbx - FAR]` ([rbx +
    FAR]); and an instruction naming a label `word` outside brackets (`jmp word`, `mov rax,
    word`) makes Keystone return no bytes at all for the unit. Canary:
    test_keystone_empties_the_unit_for_a_label_named_like_an_operand_keyword.
    """
    for piece in pieces:
        plain = _strip_literals(piece)
        words = [m for m in _WORD.finditer(plain) if m.group().lower() in keywords]
        if not words:
            continue
        allowed: set[int] = set()
        stripped = plain.strip()
        if stripped.lower() in keywords and stripped.lower() not in _SIZES:
            allowed.add(plain.index(stripped))  # the whole operand
        for m in _ADDRESS.finditer(plain):
            content = m.group(1)
            for sign, start, end in _signed_terms(content):
                term = content[start:end]
                if sign == "+" and term.strip().lower() in keywords:
                    allowed.add(m.start(1) + start + len(term) - len(term.lstrip()))
        for m in words:
            after = plain[m.end():].lstrip().lower()
            if m.group().lower() in _SIZES and after.startswith("ptr"):
                continue  # `word ptr`: the keyword
            if m.start() not in allowed:
                raise AsmError(loc.file, loc.line, f"{m.group()}: a symbol named like an operand keyword can only be "
                               "a whole operand (not a size keyword) or added in brackets: Keystone reads it as the "
                               "keyword elsewhere (`jmp word` empties the whole program, `mov rax, -far` loads from "
                               "memory); rename it")


def _check_registers(content: str, loc: SourceLocation) -> None:
    """The register terms of an address: REG or REG*1/2/4/8; RSP/ESP only as the base."""
    if "\\" in content:
        return  # a macro parameter: checked where the macro is expanded
    seen_unscaled = False
    for _sign, start, end in _signed_terms(content):
        term = content[start:end].strip()
        words = [w for w in re.findall(r"[A-Za-z_]\w*", term) if _REGISTER.fullmatch(w.lower())]
        if not words:
            continue
        register = words[0].lower()
        if _REGISTER.fullmatch(term.lower()):
            if register in _STACK_POINTERS and seen_unscaled:
                name = register.upper()
                raise AsmError(loc.file, loc.line, f"[{content.strip()}]: {name} can only be the base register: write "
                               f"it first (Keystone encodes [rbx + {register}] as [rbx + riz])")
            seen_unscaled = True
            continue
        if ":" in term:
            continue  # a segment override: Keystone's to accept or refuse
        m = _SCALED.fullmatch(term)
        reg = (m.group("reg") or m.group("reg2")) if m else None
        scale = (m.group("scale") or m.group("scale2")) if m else ""
        # A plain number other than 1, 2, 4 or 8 is Keystone's "invalid operand".
        if m is None or len(words) > 1 or reg is None or not _REGISTER.fullmatch(reg.lower()) \
                or _integer_value(scale) is None:
            raise AsmError(loc.file, loc.line, f"[{content.strip()}]: {term}: write a register as REG or REG*SCALE "
                           "with one plain scale 1, 2, 4 or 8 (Keystone drops or cuts any other form: "
                           "`[rbx + rcx*(4)]` and `[rbx + (rcx)]` are [rbx])")
        if register in _STACK_POINTERS:
            raise AsmError(loc.file, loc.line, f"[{content.strip()}]: RSP cannot be an index register")


def _check_encodable(mnemonic: str, directive: str, operands: str, loc: SourceLocation,
                     scope: Scope = _NO_NAMES, *, defer: bool = True) -> list[Deferred]:
    """Refuse the operands Keystone would encode as another instruction or value (see the hazards
    above), with what `scope` knows of the names in them; return the checks of fields given a
    symbol defined later (none unless `defer`)."""
    if directive:
        if directive in _VALUE_DIRECTIVES and operands.strip():
            _check_directive(directive, [p.strip() for p in _split_top_level(operands)], scope, loc)
        return []
    locked = mnemonic == "lock" or (mnemonic in _PREFIXES and re.search(r"\block\b", operands, re.IGNORECASE))
    mnemonic, operands = strip_prefixes(mnemonic, operands)
    plain = _strip_literals(operands)
    if locked and "[" not in plain:
        # Hazard: Keystone encodes `lock add rax, rbx` (f0 48 01 d8), which raises #UD; GNU as refuses it.
        raise AsmError(loc.file, loc.line, f"lock {mnemonic} {operands.strip()}: lock needs a memory destination "
                                           "(the CPU raises #UD)")
    pieces = [p.strip() for p in _split_top_level(operands)] if operands.strip() else []
    _check_forms(mnemonic, operands, plain, pieces, loc)
    if scope.keywords:
        _check_keyword_symbols(pieces, scope.keywords, loc)
    statement = f"{mnemonic} {operands.strip()}".strip()
    deferred: list[Deferred] = []

    def later(expression: str, value: Value, what: str, hint: str = "") -> None:
        if defer and value.missing is not None and scope.forward(value.missing):
            deferred.append(Deferred(loc, statement, expression, _bindings(expression, scope.values), what, hint))

    if "[" in plain:
        for piece in pieces:
            for content in _ADDRESS.findall(piece):
                _check_displacement(content, mnemonic, pieces, piece, scope, loc, later)
    for piece in pieces:
        if "[" not in piece and _MAY_DIVERGE.search(_strip_literals(piece)):
            agree(piece, operand_value(piece, scope.values), loc)
    width = _width(pieces[0]) if pieces else None
    if (mnemonic in _IMMEDIATE_OF_WIDTH and len(pieces) == 2) or (mnemonic == "imul" and len(pieces) in (2, 3)):
        immediate = pieces[-1]
        if width is not None and "[" not in immediate and not _REGISTER.fullmatch(immediate.lower()):
            value = operand_value(immediate, scope.values)
            if value.value is not None and width < 64 and not fits(value.value, width):
                raise AsmError(loc.file, loc.line, f"{statement}: the immediate does not fit in {width} bits")
            if width == 64:
                later(immediate, value, "the immediate", " (or load it with movabs)" if mnemonic == "mov" else "")
    if len(pieces) == 1 and "[" not in pieces[0] and not _REGISTER.fullmatch(pieces[0].lower()) and (
            mnemonic == "push" or mnemonic in ("ret", "retn", "retf")):
        value = operand_value(pieces[0], scope.values)
        v = value.value
        if v is not None and not (_simm32(v) if mnemonic == "push" else fits(v, 16)):
            raise AsmError(loc.file, loc.line, f"{statement}: the immediate does not fit its encoding")
        if v is not None and mnemonic == "push" and 0xFF80 <= v & _U64 <= 0xFFFF:
            raise AsmError(loc.file, loc.line, f"{statement}: Keystone encodes it as a sign-extended byte "
                                               f"(push {(v & 0xFFFF) - 0x10000}); load it into a register first")
        if mnemonic == "push":
            later(pieces[0], value, "the immediate")
    if mnemonic == "enter" and len(pieces) == 2:
        size, level = (operand_value(p, scope.values).value for p in pieces)
        if (size is not None and not 0 <= size < 1 << 16) or (level is not None and not 0 <= level < 1 << 8):
            raise AsmError(loc.file, loc.line, f"enter {operands.strip()}: the immediates do not fit (16 and 8 bits)")
    return deferred


def _width(operand: str) -> int | None:
    """The width of a register or sized memory operand, else None."""
    width = _REG_WIDTH.get(operand.lower())
    sized = _SIZED_MEMORY.match(operand)
    return _MEM_WIDTH[sized.group(1).lower()] if width is None and sized is not None else width


def _check_displacement(content: str, mnemonic: str, pieces: list[str], piece: str, scope: Scope,
                        loc: SourceLocation, later: Callable[[str, Value, str], None]) -> None:
    """An address's displacement: within 32 bits, signed; an absolute address only where
    Keystone has an absolute form."""
    plain = _strip_literals(content)
    if "\\" in plain:
        return  # a macro parameter: checked where the macro is expanded
    registers = [w for w in re.findall(r"[A-Za-z_]\w*", plain) if _REGISTER.fullmatch(w.lower())]
    if not registers:
        others = [p for p in pieces if p is not piece]
        moffs = mnemonic == "mov" and len(others) == 1 and others[0].lower() in _ACCUMULATORS
        if content.strip() and all(name in scope.absolute for name in _references(content)):
            if not moffs:
                raise AsmError(loc.file, loc.line, f"[{content.strip()}]: Keystone encodes an absolute address "
                               "as RIP-relative here (only MOV with AL/AX/EAX/RAX has the absolute form): "
                               "load the address into a register, or use a label")
            return
        if not moffs:  # a symbol defined later: an absolute address, a sign-extended 32-bit field
            later(content.strip(), operand_value(content, scope.values), "the absolute address")
        return
    if "rip" in (r.lower() for r in registers) and len(registers) > 1:
        raise AsmError(loc.file, loc.line, f"[{content.strip()}]: RIP-relative addressing takes no index "
                                           "register (Keystone drops it)")
    # The terms that are no registers, computed as Keystone does: one with a symbol after an
    # operator makes the front end move them into a hidden `.equ`, each term in parentheses
    # (_hoist_operands), computed as a directive; else Keystone's Intel-syntax parser computes
    # them as one expression, the registers left out (`[rbx + 1 << 4 + 1]` is rbx + (1 << 5)).
    terms = [(sign, content[start:end].strip()) for sign, start, end in _signed_terms(plain)]
    numbers = [(sign, term) for sign, term in terms
               if not any(_REGISTER.fullmatch(w.lower()) for w in re.findall(r"[A-Za-z_]\w*", term))]
    if not numbers:
        return
    symbolic = [term for _sign, term in numbers if _references(term)]
    hoisted = len(symbolic) > 1 or any(sign != "+" or not _BARE_NAME.fullmatch(term) for sign, term in numbers
                                       if _references(term))
    if hoisted:
        for _sign, term in numbers:
            if _MAY_DIVERGE.search(term):
                agree(term, evaluate(term, scope.values), loc)
        expression = " ".join(f"{sign} ({term})" for sign, term in numbers)
        value = evaluate(expression, scope.values)
    else:
        expression = " ".join(f"{sign} {term}" for sign, term in numbers).removeprefix("+ ")
        value = evaluate(expression, scope.values, intel=True)
        agree(expression, value, loc)
        if value.value is None and value.missing is None:
            return  # not a constant expression: Keystone's to encode or refuse
    if value.value is not None and not -(1 << 31) <= value.value < (1 << 31):
        raise AsmError(loc.file, loc.line, f"[{content.strip()}]: the displacement does not fit in "
                                           "32 bits (signed)")
    later(expression, value, "the displacement")


def check_deferred(deferred: list[Deferred], constants: Mapping[str, int], unsettled: Container[str]) -> None:
    """AsmError at the first field given a symbol defined later whose value does not survive its
    sign extension; `constants`: the unit's, `unsettled`: names defined more than once (whose
    value at a use is not known here)."""
    for check in deferred:
        names = _references(check.expression)
        if any(name in unsettled for name in names):
            continue
        values = {**constants, **dict(check.bindings)}
        value = evaluate(check.expression, values).value
        if value is None or _simm32(value):
            continue
        missing = sorted(name for name in names if name not in dict(check.bindings))
        which = missing[0] if missing else "a symbol"
        sign_extended = value & 0xFFFFFFFF
        sign_extended -= (1 << 32) if sign_extended >> 31 else 0
        raise AsmError(check.loc.file, check.loc.line,
                       f"{check.statement}: {which} is defined after this statement, so Keystone encodes "
                       f"{check.what} (0x{value & _U64:x}) as a sign-extended 32-bit field, which reads "
                       f"0x{sign_extended & _U64:x}: define {which} before it{check.hint}")
