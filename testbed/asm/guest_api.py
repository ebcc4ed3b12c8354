"""The guest API's operand rules (guests/lib/prelude.s): checked where a macro is called."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from testbed.asm.program import SourceLocation
from testbed.asm.syntax import _REGISTER, _integer_value, _split_top_level, _strip_literals, _words
from testbed.errors import AsmError

# The guest API's macros that take values (guests/lib/prelude.s): their operands are
# general-purpose registers, matched by name in lower case by the prelude's __guest_kind, or
# immediates, loaded with movabs. Anything else is refused here, where it is written.
# The two-operand asserts and the relation each checks (the failure message shows it).
_ASSERT_RELATIONS = {
    "GUEST_ASSERT_EQ": "==",
    "GUEST_ASSERT_NE": "!=",
    "GUEST_ASSERT_LT": "<",
    "GUEST_ASSERT_LE": "<=",
    "GUEST_ASSERT_GT": ">",
    "GUEST_ASSERT_GE": ">=",
    "GUEST_ASSERT_SLT": "<",
    "GUEST_ASSERT_SLE": "<=",
    "GUEST_ASSERT_SGT": ">",
    "GUEST_ASSERT_SGE": ">=",
}
# Signed comparisons take 64-bit registers only: a narrow register is zero-extended, so
# comparing it as signed would be wrong for its negative values.
_SIGNED_ASSERTS = frozenset(name for name in _ASSERT_RELATIONS if name.startswith("GUEST_ASSERT_S"))
_GUEST_API_VALUE_MACROS = (
    _words("GUEST_SYNC GUEST_ASSERT GUEST_RUN_USER GUEST_SET_HANDLER GHCB_SET GUEST_TERMINATE")
    | _ASSERT_RELATIONS.keys()
)
# How many values each takes (GUEST_SYNC: one to six, as the ucall carries).
_GUEST_API_ARITY = {"GUEST_SYNC": (1, 6), "GUEST_ASSERT": (1, 1), **dict.fromkeys(_ASSERT_RELATIONS, (2, 2))}
# Operands (by position) that must be constants, not registers.
_GUEST_API_CONSTANTS = {"GUEST_TERMINATE": ("reason set", "reason code"), "GHCB_SET": ("field offset",)}
# The ranges the prelude checks at run time (a ud2 at the caller's line), checked here too
# where the operand is a plain constant: (operand position, name, lowest, highest).
_GUEST_API_RANGES = {
    "GUEST_TERMINATE": ((0, "reason set", 0, 15), (1, "reason code", 0, 255)),
    "GHCB_SET": ((0, "field offset", 0, 0xFF8),),
    "GUEST_SET_HANDLER": ((0, "vector", 0, 31),),
}
_GPR = re.compile(
    r"r(?:[abcd]x|[sd]i|[sb]p|[89]|1[0-5])|e(?:[abcd]x|[sd]i|[sb]p)|r(?:[89]|1[0-5])[dwb]|[abcd]x|[sd]i|[sb]p"
    r"|[abcd][lh]|(?:[sd]i|[sb]p)l"
)


def _gpr_width(name: str) -> int:
    """The width of general-purpose register `name` (lower case)."""
    if re.fullmatch(r"r(?:[abcd]x|[sd]i|[sb]p|[89]|1[0-5])", name):
        return 64
    if name[0] == "e" or re.fullmatch(r"r\d+d", name):
        return 32
    return 16 if re.fullmatch(r"[abcd]x|[sd]i|[sb]p|r\d+w", name) else 8


def _constant(text: str, constants: Mapping[str, int]) -> int | None:
    """The value of `text` if it is an integer literal or a known constant, maybe negated."""
    m = re.fullmatch(r"(-\s*)?([\w.$]+)", text.strip())
    if not m:
        return None
    token = m.group(2)
    value = constants.get(token) if not token[0].isdigit() else _integer_value(token)
    if value is None:
        return None
    return -value if m.group(1) else value


def _check_guest_api_ranges(
    mnemonic: str, words: Sequence[str], constants: Mapping[str, int], loc: SourceLocation
) -> None:
    """Refuse a plain constant the prelude would refuse at run time, or that cannot equal the
    narrow register it is compared with."""
    for position, what, low, high in _GUEST_API_RANGES.get(mnemonic, ()):
        value = _constant(words[position], constants) if position < len(words) else None
        if value is not None and not low <= value <= high:
            limit = f"{high:#x}" if high > 255 else str(high)
            message = f"{mnemonic}: the {what} must be {low} to {limit}, not {words[position]}"
            raise AsmError(loc.file, loc.line, message)
    if mnemonic in _SIGNED_ASSERTS:
        for word in words:
            if _GPR.fullmatch(word.lower()) and _gpr_width(word.lower()) < 64:
                raise AsmError(
                    loc.file, loc.line, f"{mnemonic} compares signed 64-bit values: {word} is narrower "
                    "(move it into a 64-bit register with movsx first)"
                )
    if mnemonic in ("GUEST_ASSERT_EQ", "GUEST_ASSERT_NE") and len(words) >= 2:
        for register, other in ((words[0], words[1]), (words[1], words[0])):
            value = _constant(other, constants)
            if value is None or not _GPR.fullmatch(register.lower()):
                continue
            width = _gpr_width(register.lower())
            if width < 64 and not -(1 << (width - 1)) <= value < (1 << width):
                raise AsmError(
                    loc.file, loc.line, f"{mnemonic}: {other} does not fit the {width}-bit register {register} "
                    f"(signed or unsigned), so the assert could never {'pass' if mnemonic.endswith('EQ') else 'fail'}"
                )


def _guest_api_operands(mnemonic: str, operands: str, constants: Mapping[str, int], loc: SourceLocation) -> str:
    """The operands of a guest-API macro call with register names in lower case; AsmError for
    an operand the prelude cannot load (a memory operand, a register that is not a GPR) or a
    constant out of range."""
    words = [w.strip() for w in _split_top_level(operands)]
    low, high = _GUEST_API_ARITY.get(mnemonic, (0, 99))
    if not low <= len(words) <= high:
        count = str(low) if low == high else f"{low} to {high}"
        raise AsmError(loc.file, loc.line, f"{mnemonic} takes {count} values, {len(words)} given")
    _check_guest_api_ranges(mnemonic, words, constants, loc)
    pieces = []
    constants_only = _GUEST_API_CONSTANTS.get(mnemonic, ())
    for i, piece in enumerate(_split_top_level(operands)):
        word = piece.strip()
        plain = _strip_literals(word)
        if "[" in plain:
            raise AsmError(
                loc.file, loc.line, f"{mnemonic} takes registers and immediates, not memory operands ({word}): "
                "load the value into a register first"
            )
        lower = word.lower()
        if i < len(constants_only) and _REGISTER.fullmatch(lower):
            raise AsmError(
                loc.file, loc.line, f"{mnemonic}: the {constants_only[i]} must be a constant, not register {word}"
            )
        if _REGISTER.fullmatch(lower) and not _GPR.fullmatch(lower):
            raise AsmError(
                loc.file, loc.line, f"{mnemonic} takes general-purpose registers and immediates, not {word}: "
                "move the value into a general-purpose register first"
            )
        pieces.append(piece.replace(word, lower) if _GPR.fullmatch(lower) else piece)
    return ",".join(pieces)




def _assert_message(mnemonic: str, operands: str) -> str:
    """An assert's text as the failure report shows it: `rax == -KVM_ENOSYS`, `rbx`."""
    words = [w.strip() for w in _split_top_level(operands)] if operands else []
    relation = _ASSERT_RELATIONS.get(mnemonic)
    if relation is not None and len(words) == 2:
        signed = " (signed)" if mnemonic in _SIGNED_ASSERTS else ""
        return f"{words[0]} {relation} {words[1]}{signed}"
    return ", ".join(words)


def _guest_fail_message(operands: str, loc: SourceLocation) -> str:
    """GUEST_FAIL's message: its one operand, a string literal; AsmError otherwise."""
    m = re.fullmatch(r'"((?:[^"\\\n]|\\.)*)"', operands.strip())
    if not m:
        raise AsmError(loc.file, loc.line, 'GUEST_FAIL expects one quoted message: GUEST_FAIL "what went wrong"')
    return re.sub(r"\\(.)", r"\1", m.group(1))
