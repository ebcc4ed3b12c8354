"""Statement analysis: the directive tables, the parsed shapes of statements, and small text helpers."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.asm.program import SourceLocation
from testbed.errors import AsmError

# --------------------------------------------------------------------------------------------
# Statement analysis
# --------------------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# A label at the start of a statement; a `\` in it means it is built from macro arguments.
_LABEL = re.compile(r"([A-Za-z_.$\\][\w.$@\\()]*)\s*:(?![:=])\s*")
_BAD_EXPONENT = re.compile(r"\b\d+(?:\.\d*)?[eE](?=\W|$)(?![+-]?\d)")
_REAL_NUMBER = re.compile(r"\b\d+(?:\.\d*[eE][+-]?\d+|\.\d*|[eE][+-]?\d*)(?=\W|$)")
_ASSIGNMENT = re.compile(r"([A-Za-z_.$][\w.$@]*)\s*=(?!=)")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL = re.compile(r""""(?:[^"\\\n]|\\.)*"|'(?:\\.|[^\\'])'""")
# Identifiers in an expression; macro parameter references and numbers are matched only so
# that they are skipped.
_REFERENCE = re.compile(r"\\[\w$.]*|\\\(\)|\d[\w.]*|[A-Za-z_.$][\w.$@]*")
_MACRO_PARAM_REF = re.compile(r"\\([\w$.]*)(\(\))?|\\(.)")
_REGISTER = re.compile(
    r"""[re]?[abcd]x|[abcd][lh]|[re]?(?:si|di|sp|bp|ip)|(?:si|di|sp|bp)l|r(?:[89]|1[0-5])[dwb]?
      |[c-gs]s|cr\d+|dr\d+|st\d?|mm\d|[xyz]mm\d+|k[0-7]|bnd[0-3]|[re]?flags""",
    re.VERBOSE,
)
_OPERAND_KEYWORDS = _words(
    "ptr byte word dword qword tbyte xword oword fword mmword xmmword ymmword zmmword offset short "
    "near far and or xor not shl shr mod rel z sae rn rd ru rz"
)
_PREFIXES = _words("rep repe repz repne repnz lock xacquire xrelease notrack bnd data16 addr32")

_BLOCK_OPENERS = {
    ".macro": ".endm",
    ".rept": ".endr",
    ".irp": ".endr",
    ".irpc": ".endr",
    **dict.fromkeys(
        _words(".if .ifeq .ifne .ifgt .ifge .iflt .ifle .ifdef .ifndef .ifnotdef .ifb .ifnb .ifc .ifnc")
        | {".ifeqs", ".ifnes"},
        ".endif",
    ),
}
_BLOCK_CLOSERS = {".endm": ".endm", ".endmacro": ".endm", ".endr": ".endr", ".endif": ".endif"}
_DATA_DIRECTIVES = _words(
    ".byte .short .word .value .2byte .int .long .4byte .quad .8byte .octa .uleb128 .sleb128 .ascii "
    ".asciz .string .single .float .double .align .balign .p2align .org .fill .zero .skip .space"
)
# Directives whose operands are expressions that may reference symbols.
_EXPRESSION_DIRECTIVES = (_DATA_DIRECTIVES - {".ascii", ".asciz", ".string"}) | _words(
    ".equ .set .equiv .rept .if .elseif .ifeq .ifne .ifgt .ifge .iflt .ifle"
)
_SUPPORTED_DIRECTIVES = (
    _DATA_DIRECTIVES
    | _BLOCK_OPENERS.keys()
    | _BLOCK_CLOSERS.keys()
    | _words(".equ .set .equiv .else .elseif .exitm .purgem .intel_syntax .code64 .error")
)
# Why the directives Keystone 0.9.2 mishandles are rejected. Any other directive not in
# _SUPPORTED_DIRECTIVES is rejected too: Keystone silently ignores unknown directives.
# Canaries: test_unknown_directive_is_silently_ignored, test_section_directive_empties_the_output,
# test_globl_zeroes_absolute_references, test_text_directive_crashes_the_process.
_SECTIONS = "sections are not supported: the program is one flat image at its base address"
_UNSUPPORTED = {
    ".text": f"{_SECTIONS} (.text crashes Keystone 0.9.2)",
    ".data": f"{_SECTIONS} (.data crashes Keystone 0.9.2)",
    ".bss": _SECTIONS,
    ".section": f"{_SECTIONS} (Keystone 0.9.2 returns no code at all after .section)",
    ".pushsection": _SECTIONS,
    ".popsection": _SECTIONS,
    ".previous": _SECTIONS,
    ".att_syntax": "only Intel syntax is supported",
    ".globl": "a flat image needs no .globl, and with it Keystone 0.9.2 encodes absolute references to "
    "the symbol (.quad sym, mov rax, sym) as 0",
    ".global": "a flat image needs no .global, and with it Keystone 0.9.2 encodes absolute references to "
    "the symbol (.quad sym, mov rax, sym) as 0",
    ".end": "Keystone 0.9.2 silently drops everything after .end, including later files",
    ".err": 'Keystone 0.9.2 silently ignores .err; use .error "message"',
    ".warning": "Keystone 0.9.2 ignores .warning",
    ".incbin": "use .include for sources; .incbin is not supported",
    ".balignw": "Keystone 0.9.2 aborts the process on .balignw; use .balign",
    ".balignl": "Keystone 0.9.2 aborts the process on .balignl; use .balign",
    ".p2alignw": "Keystone 0.9.2 aborts the process on .p2alignw; use .p2align",
    ".p2alignl": "Keystone 0.9.2 aborts the process on .p2alignl; use .p2align",
    ".align32": "Keystone 0.9.2 aborts the process on .align32; use .balign",
}
# Mnemonics Keystone 0.9.2 lacks, with the bytes to emit instead (Intel TDX module spec, AMD
# APM vol. 3). Canary: test_confidential_vm_mnemonics_are_missing.
_MISSING_MNEMONICS = {
    "tdcall": ".byte 0x66, 0x0f, 0x01, 0xcc",
    "pvalidate": ".byte 0xf2, 0x0f, 0x01, 0xff",
    "rmpadjust": ".byte 0xf3, 0x0f, 0x01, 0xfe",
    "vmgexit": "rep vmmcall",
    "sysretq": ".byte 0x48, 0x0f, 0x07",
}
# Hazard: Keystone 0.9.2 silently drops an .if whose expression it cannot evaluate yet (a
# label, even one defined before; a symbol defined later): the body is assembled and the
# .else/.endif then act on the enclosing block. `.rept LATER` repeats once. So these
# directives may use only names defined before them from constants (testbed/asm.py tracks
# which; inside macro bodies it cannot, and the prelude looks at no value there).
# Canary: tests/test_guest_api_immediates.py::test_if_on_a_symbol_defined_later_is_dropped.
_ABSOLUTE_DIRECTIVES = _words(".if .elseif .ifeq .ifne .ifgt .ifge .iflt .ifle .rept")
# Directives whose operands are names or raw text rather than expressions.
_FREE_FORM_DIRECTIVES = _words(".macro .irp .irpc .purgem .ifc .ifnc .ifb .ifnb .ifeqs .ifnes .ifdef .ifndef")
_NAME = r"(?:[A-Za-z_.$][\w.$@]*|\\[\w$.]+)"
_NAME_OPERAND = {
    ".purgem": re.compile(_NAME),
    ".ifdef": re.compile(_NAME),
    ".ifndef": re.compile(_NAME),
    ".irp": re.compile(rf"{_NAME}\s*(?:,.*)?", re.DOTALL),
    ".irpc": re.compile(rf"{_NAME}\s*(?:,.*)?", re.DOTALL),
}
_NAME_DIRECTIVES = _NAME_OPERAND.keys()
_NAME_OPERAND_HELP = {
    ".purgem": "a macro name",
    ".ifdef": "a symbol name",
    ".ifndef": "a symbol name",
    ".irp": "a parameter name and values: .irp reg, rax, rbx",
    ".irpc": "a parameter name and characters: .irpc c, 123",
}
_RESERVED_PREFIX = "__tb_"  # hidden labels this module adds to the unit
# How deep `.include`s may nest: deeper is almost surely a mistake, and each level costs
# Python stack frames (329 levels used to end in RecursionError).
_MAX_INCLUDE_DEPTH = 100

@dataclass(frozen=True)
class _Param:
    name: str
    required: bool  # no default value
    vararg: bool
    default: str = ""


@dataclass(frozen=True)
class Line:
    """One statement of a .macro/.rept/.irp body as Keystone gets it, and where it is written."""

    text: str
    loc: SourceLocation


@dataclass
class _Macro:
    name: str
    params: tuple[_Param, ...]
    loc: SourceLocation
    index: int  # of its .macro item: Keystone knows a macro only after its definition
    body_refs: set[str] = field(default_factory=set)
    body_labels: set[str] = field(default_factory=set)
    # Its body, for the checks of an expansion (testbed/asm/expand.py): the statements, the names
    # they define (as written), the statements that may call another macro (name, operands), and
    # whether any statement can emit bytes or call a macro.
    body: list[Line] = field(default_factory=list)
    body_defines: set[str] = field(default_factory=set)
    body_calls: list[tuple[str, str]] = field(default_factory=list)
    emits: bool = False


@dataclass(frozen=True)
class _Item:
    """One unit of the text handed to Keystone, and what it means to error reporting."""

    text: str  # one or more lines
    loc: SourceLocation
    mnemonic: str = ""
    labels: tuple[str, ...] = ()  # plain labels this statement defines
    refs: frozenset[str] = frozenset()  # identifiers it may reference as symbols
    closers: tuple[str, ...] = ()  # directives that close the blocks still open after it
    define: tuple[str, str] | None = None  # set for the .equ lines made from defines


@dataclass(frozen=True)
class _Label:
    name: str
    loc: SourceLocation
    conditional: bool  # inside a block: may be defined zero times


def _strip_literals(text: str) -> str:
    """`text` with the insides of string literals blanked and character literals made numbers,
    for analysis only; lengths are kept, so positions found in it are positions in `text`."""
    if '"' not in text and "'" not in text:
        return text

    def mask(m: re.Match[str]) -> str:
        literal = m.group()
        return '"' + " " * (len(literal) - 2) + '"' if literal[0] == '"' else "0" * len(literal)

    return _LITERAL.sub(mask, text)


def _split_labels(text: str) -> tuple[list[str], str]:
    """Labels at the start of a statement, and the rest of it."""
    labels = []
    while m := _LABEL.match(text):
        labels.append(m.group(1))
        text = text[m.end() :]
    return labels, text


def _references(operands: str) -> set[str]:
    """Identifiers in `operands` that could name a symbol (a new set: callers may change it)."""
    return set(_reference_names(operands))


@functools.lru_cache(maxsize=8192)
def _reference_names(operands: str) -> frozenset[str]:
    """_references, remembered: the same operand text recurs across a runtime's statements and
    across the programs one process assembles, and the answer depends on the text alone."""
    text = _strip_literals(operands)
    names = set()
    for m in _REFERENCE.finditer(text):
        token = m.group()
        if token[0] == "\\" or token[0].isdigit() or token in (".", "$"):
            continue
        # Part of a name pasted together from macro arguments (`isr_\n`): not a name itself.
        if (m.end() < len(text) and text[m.end()] == "\\") or (m.start() > 0 and text[m.start() - 1] == ")"):
            continue
        lower = token.lower()
        if _REGISTER.fullmatch(lower) or lower in _OPERAND_KEYWORDS:
            continue
        names.add(token)
    return frozenset(names)


# One `.macro` parameter: `name`, `name:req`, `name:vararg` or `name=default`.
_MACRO_PARAM = re.compile(r"\s*,?\s*([A-Za-z_$][\w$.]*)(?:\s*:\s*(\w+))?(?:\s*=\s*(\"[^\"]*\"|[^,\s]*))?")


def _parse_macro_params(text: str, file: str, line: int) -> tuple[str, tuple[_Param, ...]]:
    """Name and parameters of a `.macro NAME p1, p2=default, p3:req, rest:vararg` line."""
    m = re.match(r"\s*([A-Za-z_.$][\w.$@]*)\s*,?", text)
    if not m:
        raise AsmError(file, line, ".macro needs a name")
    params = []
    rest = text[m.end() :]
    pos = 0
    while pos < len(rest) and rest[pos:].strip():
        pm = _MACRO_PARAM.match(rest, pos)
        if not pm or pm.end() == pos:
            raise AsmError(file, line, f"cannot parse macro parameters {rest.strip()!r}")
        qualifier = (pm.group(2) or "").lower()
        default = pm.group(3) or ""
        if len(default) >= 2 and default[0] == default[-1] == '"':
            default = default[1:-1]
        params.append(_Param(pm.group(1), qualifier == "req" or pm.group(3) is None, qualifier == "vararg", default))
        pos = pm.end()
    return m.group(1), tuple(params)


def _integer_value(token: str) -> int | None:
    lower = token.lower()
    try:
        if lower.startswith(("0x", "0b")):
            return int(lower, 0)
        if lower.endswith("h"):
            return int(lower[:-1], 16)
        return int(lower, 8) if len(lower) > 1 and lower[0] == "0" else int(lower)
    except ValueError:
        return None  # e.g. 09: Keystone reports it


# What makes a comma not top-level: a bracket or a literal's quote.
_NESTING = re.compile(r"""[()\[\]{}"']""")


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and literals."""
    if not _NESTING.search(text):
        return text.split(",")  # every comma is top-level (most operand lists)
    pieces, depth, start = [], 0, 0
    for i, c in enumerate(_strip_literals(text)):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return pieces


def _render(items: Sequence[_Item], extra: Sequence[str] = ()) -> str:
    return "\n".join([*(item.text for item in items), *extra]) + "\n"


