"""Constant expressions as Keystone 0.9.2 computes them, for the front end's range checks.

No eval(): a tokenizer and a precedence parser over integers. Keystone has two expression
parsers with different rules (measured; canaries in tests/test_asm.py):

* directives (`.equ`, `.quad`, `.if`...) and an instruction operand that starts with a symbol
  use LLVM's assembler parser: `||` `&&` < `|` `^` `&` (one level, left to right) < `==` `!=`
  `<>` `<` `<=` `>` `>=` (1 or 0) < `<<` `>>` (logical) < `+` `-` < `*` `/` `%`;
* any other instruction operand (one with no symbol: the front end moves an expression with a
  symbol after an operator into a hidden `.equ`), and a displacement in brackets, the
  Intel-syntax parser of LLVM's X86 back end: `|` < `^` < `&` < `<<` `>>` (arithmetic) < `+`
  `-` < `*` `/`, with no `%` or comparisons (an error), and `~~x` is `~x`.

Both compute in signed 64 bits, wrapping: `6 | 1 ^ 3` is 6 in an instruction and 4 in a
directive, `-8 >> 1` is -4 and 0x7ffffffffffffffc.

Neither is GNU as (measured with as 2.40): `||` < `&&` < comparisons (-1 when true) < `+` `-` <
`|` `^` `&` < `*` `/` `%` `<<` `>>` (logical), in directives and instructions alike. `1 << 12 -
1` is 0x800 to Keystone and 0xfff to GNU as, `6 & 3 + 1` 4 and 3, `3 == 3` 1 and -1: a source
written for GNU as gets another value, silently. `Value.gas` is GNU as's value where it differs,
and the front end refuses the expression (add parentheses).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from testbed.asm.syntax import _OPERAND_KEYWORDS, _REGISTER

_MASK = (1 << 64) - 1
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<number>0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH]|[0-9]+)(?![\w.$@])
    | (?P<char>'[^\\']')
    | (?P<name>[A-Za-z_.$][\w.$@]*)
    | (?P<op><<|>>|<=|>=|==|!=|<>|&&|\|\||[-+*/%&|^~!<>()])
    )""",
    re.VERBOSE,
)
# Binary operators: precedence (higher binds tighter) in each parser.
_DIRECTIVE = {"||": 1, "&&": 1, "|": 2, "^": 2, "&": 2, "==": 3, "!=": 3, "<>": 3, "<": 3, "<=": 3,
              ">": 3, ">=": 3, "<<": 4, ">>": 4, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6}
_INTEL = {"|": 0, "^": 1, "&": 2, "<<": 3, ">>": 3, "+": 4, "-": 4, "*": 5, "/": 5}
_GAS = {"||": 1, "&&": 2, "==": 3, "!=": 3, "<>": 3, "<": 3, "<=": 3, ">": 3, ">=": 3, "+": 4, "-": 4,
        "|": 5, "^": 5, "&": 5, "*": 6, "/": 6, "%": 6, "<<": 6, ">>": 6}
_COMPARISONS = frozenset({"==", "!=", "<>", "<", "<=", ">", ">="})
_TABLES = {"intel": _INTEL, "llvm": _DIRECTIVE, "gas": _GAS}


class _UnsupportedError(Exception):
    """Not an expression this module computes (registers, `$`, syntax a parser rejects)."""


class _MissingError(Exception):
    """A name without a known value."""

    def __init__(self, name: str) -> None:
        self.name = name


def _signed(value: int) -> int:
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


def _number(token: str) -> int:
    lower = token.lower()
    if lower.startswith(("0x", "0b")):
        return int(lower, 0)
    if lower.endswith("h"):
        return int(lower[:-1], 16)
    if len(lower) > 1 and lower[0] == "0":
        return int(lower, 8)  # ValueError for 09: Keystone reports it
    return int(lower)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise _UnsupportedError(text[pos:])
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _binary(op: str, a: int, b: int, dialect: str) -> int:
    if op in ("/", "%"):
        if b == 0:
            raise _UnsupportedError("division by zero")
        quotient = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)  # C: towards zero
        return quotient if op == "/" else a - quotient * b
    if op in ("<<", ">>"):
        if not 0 <= b < 64:
            raise _UnsupportedError("shift count")
        if op == "<<":
            return a << b
        return a >> b if dialect == "intel" else (a & _MASK) >> b
    if op in _COMPARISONS and dialect == "gas":  # all ones when true
        return -_binary(op, a, b, "llvm")
    simple: dict[str, Callable[[int, int], int]] = {
        "+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
        "&": lambda x, y: x & y, "|": lambda x, y: x | y, "^": lambda x, y: x ^ y,
        "==": lambda x, y: int(x == y), "!=": lambda x, y: int(x != y), "<>": lambda x, y: int(x != y),
        "<": lambda x, y: int(x < y), "<=": lambda x, y: int(x <= y), ">": lambda x, y: int(x > y),
        ">=": lambda x, y: int(x >= y), "&&": lambda x, y: int(bool(x and y)), "||": lambda x, y: int(bool(x or y)),
    }
    return simple[op](a, b)


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], lookup: Callable[[str], int], dialect: str) -> None:
        self.tokens, self.pos, self.lookup, self.dialect = tokens, 0, lookup, dialect
        self.table = _TABLES[dialect]

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> int:
        value = self.expression(0)
        if self.peek() is not None:
            raise _UnsupportedError("trailing tokens")
        return value

    def expression(self, floor: int) -> int:
        left = self.unary()
        while (token := self.peek()) is not None and token[0] == "op" and token[1] in self.table \
                and self.table[token[1]] >= floor:
            op = token[1]
            self.pos += 1
            right = self.expression(self.table[op] + 1)  # left-associative
            left = _signed(_binary(op, left, right, self.dialect))
        return left

    def unary(self) -> int:
        token = self.peek()
        if token is None:
            raise _UnsupportedError("missing operand")
        self.pos += 1
        kind, text = token
        if kind == "number":
            try:
                return _signed(_number(text))
            except ValueError:
                raise _UnsupportedError(text) from None
        if kind == "char":
            return ord(text[1])
        if kind == "name":
            return _signed(self.lookup(text))
        if text == "(":
            value = self.expression(0)
            if self.peek() != ("op", ")"):
                raise _UnsupportedError("unbalanced")
            self.pos += 1
            return value
        if self.dialect == "intel" and text == "~":
            while self.peek() == ("op", "~"):  # Keystone's Intel parser: `~~x` is `~x`
                self.pos += 1
        operand = self.unary() if text in "-+~!" else None
        if operand is None:
            raise _UnsupportedError(text)
        return _signed({"-": -operand, "+": operand, "~": ~operand, "!": int(operand == 0)}[text])


@dataclass(frozen=True)
class Value:
    """What an expression is: `value` when computed; else `missing`, a name with no known value
    (maybe a symbol defined later), or neither (not a constant expression)."""

    value: int | None = None
    missing: str | None = None
    gas: int | None = None  # GNU as's value, where it is another


_NOT_CONSTANT = Value()


def evaluate(text: str, values: Mapping[str, int], *, intel: bool = False) -> Value:
    """`text` computed with the names in `values` (signed 64-bit result) by one of Keystone's
    parsers, and by GNU as's rules where they may give another value."""
    def lookup(name: str) -> int:
        if name in (".", "$") or _REGISTER.fullmatch(name.lower()) or name.lower() in _OPERAND_KEYWORDS:
            raise _UnsupportedError(name)
        value = values.get(name)
        if value is None:
            raise _MissingError(name)
        return value

    try:
        tokens = _tokens(text)
        value = _Parser(tokens, lookup, "intel" if intel else "llvm").parse()
    except _MissingError as e:
        return Value(missing=e.name)
    except (_UnsupportedError, RecursionError):
        return _NOT_CONSTANT
    operators = [t for kind, t in tokens if kind == "op" and t in _GAS]
    if len(operators) < 2 and not any(op in _COMPARISONS or op == ">>" for op in operators):
        return Value(value)  # one operator (or none): the same in every dialect
    try:
        gas = _Parser(tokens, lookup, "gas").parse()
    except (_MissingError, _UnsupportedError, RecursionError):
        return Value(value)
    return Value(value, gas=gas if gas != value else None)


_SIMPLE = re.compile(r"\s*(?:(?P<number>0[xX][0-9a-fA-F]+|[1-9][0-9]*|0)|(?P<name>[A-Za-z_][\w.$@]*))\s*")


def operand_value(text: str, values: Mapping[str, int]) -> Value:
    """An instruction operand's value as Keystone computes it: by its Intel-syntax parser when
    no name is in it, else by its directive parser (see the module's doc)."""
    if m := _SIMPLE.fullmatch(text):  # most operands: a number or a name
        if m.group("number") is not None:
            return Value(_signed(int(m.group("number"), 0)))
        name = m.group("name")
        if _REGISTER.fullmatch(name.lower()) or name.lower() in _OPERAND_KEYWORDS:
            return _NOT_CONSTANT
        value = values.get(name)
        return Value(missing=name) if value is None else Value(_signed(value))
    names = any(kind == "name" for kind, _ in _safe_tokens(text))
    return evaluate(text, values, intel=not names)


def _safe_tokens(text: str) -> list[tuple[str, str]]:
    try:
        return _tokens(text)
    except _UnsupportedError:
        return []


def fits(value: int, bits: int) -> bool:
    """Whether `value` (modulo 2^64) is a `bits`-wide number, signed or unsigned."""
    value &= _MASK
    return value < (1 << bits) or value >= (1 << 64) - (1 << (bits - 1))
