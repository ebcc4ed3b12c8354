"""Macro, .irp and .rept bodies as Keystone expands them, for the checks only.

Hazard (a review, 2026-12-01; refusals in tests/test_asm.py): Keystone expands .macro, .rept
and .irp bodies itself, so the guards (testbed/asm/guards.py) see a body's statements only as
written: `push \\v` called with 0x80000000 is a 16-bit push, `mov al, \\v` in `.irp v, 256` is
`mov al, 0`, a `.set` counter in a `.rept` body grows past its field - silently. The front end
keeps each body's statements (as it hands them to Keystone) and, where a top-level statement
expands one (a macro call, the `.endr` of a .rept/.irp/.irpc), substitutes the arguments here
and runs the same checks on every statement the expansion assembles, with the constants known
at that point and the `.set`/`.equ` values of the expansion itself.

Only what is certain is checked: a statement under an `.if` this module cannot decide (a label,
`.ifdef`, a symbol whose value is not known here) is skipped, and so is what follows a nested
`.macro` definition's use, a recursion deeper than Keystone's 20 levels, or an expansion of
more than _BUDGET statements (see docs/emulator-facts.md: not caught). A macro whose body holds
no instruction or data statement at any depth (the prelude's __guest_kind) is not expanded: the
names it sets become unknown.

A branch to an absolute address inside an expansion cannot be placed, so its target is
returned; the front end has the expanding statement's span checked after assembly
(testbed/asm/branches.py). A rel8-only branch (`loop`) in a body is refused where it is written
(frontend.py), or here where a parameter names it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from testbed.asm.branches import REL8_ONLY, REL32
from testbed.asm.evaluate import evaluate, operand_value
from testbed.asm.guards import Deferred, Scope, _check_encodable, agree, strip_prefixes
from testbed.asm.program import SourceLocation
from testbed.asm.syntax import (
    _ASSIGNMENT,
    _BLOCK_OPENERS,
    _DATA_DIRECTIVES,
    _RESERVED_PREFIX,
    Line,
    _Macro,
    _split_labels,
    _split_top_level,
    _strip_literals,
)
from testbed.errors import AsmError

#: Statements one expansion may visit before the rest is left unchecked.
_BUDGET = 20_000
#: Keystone stops expanding nested macros at this depth, without an error.
_MAX_DEPTH = 20
_PARAM = re.compile(r"\\([\w$.]+)(?:\\\(\))?")
_HIDDEN = re.compile(re.escape(_RESERVED_PREFIX) + r"expr_\d+")
_DEFINITIONS = (".equ", ".set", ".equiv")
_IF_TESTS: dict[str, Callable[[int], bool]] = {
    ".if": lambda v: v != 0, ".ifne": lambda v: v != 0, ".ifeq": lambda v: v == 0, ".ifgt": lambda v: v > 0,
    ".ifge": lambda v: v >= 0, ".iflt": lambda v: v < 0, ".ifle": lambda v: v <= 0,
}
_REPEATS = (".rept", ".irp", ".irpc")
#: Directives that neither emit bytes nor call anything: a body of only these sets names only.
_INERT = frozenset({*_BLOCK_OPENERS, ".else", ".elseif", ".endif", ".endr", ".endm", ".endmacro", ".exitm",
                    ".purgem"})
_ACTIVE, _FALSE, _DONE, _UNKNOWN = "active", "false", "done", "unknown"


@dataclass(frozen=True)
class Target:
    """An absolute branch target inside an expansion."""

    statement: str  # as expanded, for the message
    context: str
    value: int


@dataclass
class Expansion:
    """What checking one expansion found: checks for later, absolute branch targets, and the
    names it (may have) set."""

    deferred: list[Deferred] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    defined: set[str] = field(default_factory=set)


def split_arguments(operands: str) -> list[str]:
    """A macro call's arguments: comma-separated, a quoted one unquoted."""
    if not operands.strip():
        return []
    out = []
    for piece in _split_top_level(operands):
        argument = piece.strip()
        if len(argument) >= 2 and argument[0] == argument[-1] == '"':
            argument = argument[1:-1]
        out.append(argument)
    return out


def bind(macro: _Macro, arguments: Sequence[str]) -> dict[str, str] | None:
    """The macro's parameters bound to a call's arguments (positional or NAME=VALUE), or None
    when the call is not understood here."""
    values: dict[str, str] = {}
    position = 0
    names = [p.name for p in macro.params]
    for index, argument in enumerate(arguments):
        m = re.fullmatch(r"([A-Za-z_$][\w$.]*)\s*=\s*(.*)", argument, re.DOTALL)
        if m and m.group(1) in names and "=" not in m.group(2)[:1]:
            values[m.group(1)] = m.group(2).strip()
            continue
        if position >= len(macro.params):
            return None
        param = macro.params[position]
        if param.vararg:
            values[param.name] = ", ".join(arguments[index:])
            position = len(macro.params)
            break
        values[param.name] = argument
        position += 1
    for param in macro.params:
        values.setdefault(param.name, param.default)
    return values


def substitute(text: str, values: Mapping[str, str]) -> str:
    """`text` with `\\name` of each bound parameter replaced and `\\()` removed."""
    if "\\" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        value = values.get(m.group(1))
        # Another block's parameter is substituted there; `\()` separates a parameter from the
        # text after it.
        return m.group(0) if value is None else value

    return _PARAM.sub(one, text)


class _Names(Mapping[str, int]):
    """The constants an expansion sees: its own values over the unit's; a name it set to an
    unknown value hides the unit's."""

    def __init__(self, local: dict[str, int | None], unit: Mapping[str, int]) -> None:
        self.local, self.unit = local, unit

    def __getitem__(self, name: str) -> int:
        if name in self.local:
            value = self.local[name]
            if value is None:
                raise KeyError(name)
            return value
        return self.unit[name]

    def __iter__(self) -> Iterator[str]:
        return iter({*self.local, *self.unit})

    def __len__(self) -> int:
        return len({*self.local, *self.unit})


class _LocalAbsolute:
    def __init__(self, local: dict[str, int | None], unit: Container[str]) -> None:
        self.local, self.unit = local, unit

    def __contains__(self, name: object) -> bool:
        if name in self.local:
            return self.local[name] is not None
        return name in self.unit


class Expander:
    """Checks expansions against the unit's state at one top-level statement."""

    def __init__(self, macros: Mapping[str, _Macro], constants: Mapping[str, int], absolute: Container[str],
                 settled: Container[str], report: SourceLocation | None,
                 keywords: Collection[str] = frozenset()) -> None:
        self.macros = macros
        self.local: dict[str, int | None] = {}
        self.pending: dict[str, str] = {}  # local names given an expression naming a later symbol
        self.hidden: dict[str, str] = {}  # the front end's hidden `.equ` names: their expressions
        self.names = _Names(self.local, constants)
        self.scope = Scope(self.names, _LocalAbsolute(self.local, absolute), _Settled(self.local, settled), keywords)
        self.report = report  # where errors are reported (None: at each body line)
        self.budget = _BUDGET
        self.result = Expansion()

    # -- entry points -----------------------------------------------------------------------

    def call(self, macro: _Macro, operands: str, loc: SourceLocation) -> Expansion:
        """Check one call of `macro`."""
        self.macro(macro, operands, loc, (), 0)
        return self.result

    def block(self, directive: str, operands: str, body: Sequence[Line]) -> Expansion:
        """Check a top-level .rept/.irp/.irpc block."""
        self.repeat(directive, operands, list(body), (), 0, None)
        return self.result

    # -- expansion ----------------------------------------------------------------------------

    def macro(self, macro: _Macro, operands: str, loc: SourceLocation, context: tuple[str, ...],
              depth: int) -> None:
        values = bind(macro, split_arguments(operands))
        if depth >= _MAX_DEPTH or values is None or not macro.emits:
            self.forget(self.defines_of(macro, values))
            return
        lines = [Line(substitute(line.text, values), line.loc) for line in macro.body]
        self.run(lines, (f"in macro {macro.name} at {{at}}", *context), depth + 1, loc)

    def defines_of(self, macro: _Macro, values: Mapping[str, str] | None,
                   seen: set[tuple[str, str]] | None = None) -> set[str]:
        """The names a call of `macro` may set (its nested calls' too, each call once)."""
        seen = set() if seen is None else seen
        names = {substitute(name, values or {}) for name in macro.body_defines}
        for call, arguments in macro.body_calls:
            inner = self.macros.get(call)
            actual = substitute(arguments, values or {})
            if inner is not None and (call, actual) not in seen and len(seen) < _BUDGET:
                seen.add((call, actual))
                names |= self.defines_of(inner, bind(inner, split_arguments(actual)), seen)
        return names

    def forget(self, names: set[str]) -> None:
        """Names an expansion not followed here may set: their values become unknown."""
        for name in names:
            if "\\" not in name and not name.startswith(_RESERVED_PREFIX):
                self.local[name] = None
                self.pending.pop(name, None)
                self.result.defined.add(name)

    def repeat(self, directive: str, operands: str, body: list[Line], context: tuple[str, ...], depth: int,
               report: SourceLocation | None) -> bool:
        """Check a .rept/.irp/.irpc block; False when the rest is not followed (see run)."""
        if directive == ".rept":
            count = evaluate(operands, self.names).value
            if count is None:
                self.unknown(body)
                return True
            simple = not any(_defines(line.text) or self.is_call(line.text) for line in body)
            for k in range(min(count, 1) if simple else count):
                here = context if simple else (f"repetition {k + 1} of the .rept", *context)
                if not self.run(body, here, depth, report):
                    return False
            return True
        name, _, rest = operands.partition(",")
        name = name.strip()
        values = split_arguments(rest) if directive == ".irp" else [c for c in rest.strip()]
        for value in values or [""]:
            lines = [Line(substitute(line.text, {name: value}), line.loc) for line in body]
            if not self.run(lines, (f"with {name} = {value}", *context), depth, report):
                return False
        return True

    def unknown(self, lines: Sequence[Line]) -> None:
        """Lines that may or may not be assembled: what they set becomes unknown."""
        for line in lines:
            for name in _defines(line.text):
                self.forget({name})
            rest = _split_labels(line.text)[1]
            word = rest.split(None, 1)[0] if rest else ""
            macro = self.macros.get(word)
            if macro is not None:
                self.forget(self.defines_of(macro, bind(macro, split_arguments(rest[len(word):]))))

    def is_call(self, text: str) -> bool:
        return _mnemonic(text) in self.macros

    def run(self, lines: list[Line], context: tuple[str, ...], depth: int, report: SourceLocation | None) -> bool:
        """Check `lines`; False when the rest of the expansion is not followed (.exitm, the
        budget spent)."""
        conditions: list[str] = []  # the state of each open .if
        i = 0
        while i < len(lines):
            self.budget -= 1
            if self.budget < 0:
                self.unknown(lines[i:])
                return False
            line = lines[i]
            i += 1
            _labels, rest = _split_labels(line.text)
            if not rest:
                continue
            word = rest.split(None, 1)[0]
            directive = word.lower() if word.startswith(".") else ""
            operands = rest[len(word):].strip()
            state = _ACTIVE
            for c in conditions:
                if c in (_FALSE, _DONE):
                    state = _FALSE
                    break
                if c == _UNKNOWN:
                    state = _UNKNOWN
            at = report if report is not None else line.loc
            if directive in _BLOCK_OPENERS and _BLOCK_OPENERS[directive] == ".endif":
                conditions.append(self.condition(directive, operands, line.loc, at, context) if state == _ACTIVE
                                  else _UNKNOWN if state == _UNKNOWN else _DONE)
                continue
            if directive in (".else", ".elseif"):
                if conditions:
                    last = conditions[-1]
                    if last == _ACTIVE:
                        conditions[-1] = _DONE
                    elif last == _FALSE:
                        conditions[-1] = _ACTIVE if directive == ".else" else self.condition(
                            ".if", operands, line.loc, at, context)
                continue
            if directive == ".endif":
                if conditions:
                    conditions.pop()
                continue
            if directive in _REPEATS or directive == ".macro":
                end = _block_end(lines, i, ".endm" if directive == ".macro" else ".endr")
                body = lines[i:end]
                i = end + 1
                if directive == ".macro":
                    continue  # a nested definition: its calls are not followed
                if state == _ACTIVE:
                    if not self.repeat(directive, operands, body, context, depth, report):
                        self.unknown(lines[i:])
                        return False
                elif state == _UNKNOWN:
                    self.unknown(body)
                continue
            if state == _FALSE:
                continue
            if directive == ".exitm":  # the rest of the macro is not assembled, or (unknown) may not be
                if state == _UNKNOWN:
                    self.unknown(lines[i:])
                return False
            if state == _UNKNOWN:
                self.unknown([line])
                continue
            self.statement(rest, word, directive, operands, line.loc, at, context, depth)
        return True

    def condition(self, directive: str, operands: str, loc: SourceLocation, at: SourceLocation,
                  context: tuple[str, ...]) -> str:
        """The state an .if family directive opens: _ACTIVE, _FALSE or _UNKNOWN."""
        if directive in _IF_TESTS:
            computed = evaluate(operands, self.names)
            value = computed.value
            if value is None:
                return _UNKNOWN
            test = _IF_TESTS[directive]
            if computed.gas is not None and test(value) != test(computed.gas):
                self.guard(lambda: agree(operands, computed, loc), f"{directive} {operands}", at, context, loc)
            return _ACTIVE if test(value) else _FALSE
        if directive in (".ifb", ".ifnb"):
            blank = not operands.strip()
            return _ACTIVE if blank == (directive == ".ifb") else _FALSE
        if directive in (".ifc", ".ifnc"):
            first, comma, _second = _strip_literals(operands).partition(",")
            if not comma:
                return _UNKNOWN
            same = operands[:len(first)].strip() == operands[len(first) + 1:].strip()
            return _ACTIVE if same == (directive == ".ifc") else _FALSE
        return _UNKNOWN  # .ifdef, .ifndef, .ifeqs, .ifnes: not decided here

    def guard(self, check: Callable[[], object], shown: str, at: SourceLocation, context: tuple[str, ...],
              loc: SourceLocation) -> None:
        """Run `check`, its AsmError reported at `at` with the statement and where it comes from."""
        try:
            check()
        except AsmError as e:
            where = ", ".join(c.replace("{at}", str(loc)) for c in context)
            message = e.message.removeprefix(f"{shown}: ")
            raise AsmError(at.file, at.line, f"{shown} ({where}): {message}" if where else
                           f"{shown}: {message}") from None

    def statement(self, rest: str, word: str, directive: str, operands: str, loc: SourceLocation,
                  at: SourceLocation, context: tuple[str, ...], depth: int) -> None:
        """Check one assembled statement of an expansion (errors reported at `at`)."""
        macro = self.macros.get(word)
        if macro is not None:
            self.macro(macro, operands, at, tuple(c.replace("{at}", str(loc)) for c in context), depth)
            return
        assignment = None if directive else _ASSIGNMENT.match(rest)
        if directive in _DEFINITIONS or assignment:
            if assignment:
                name, expression = assignment.group(1), rest[assignment.end():]
            else:
                name, _, expression = operands.partition(",")
            self.define(name.strip(), expression.strip(), loc, at, context)
            return
        if directive and directive not in _DATA_DIRECTIVES:
            return
        mnemonic, inner = strip_prefixes(word.lower(), operands)
        where = ", ".join(c.replace("{at}", str(loc)) for c in context)
        shown = raw = f"{mnemonic} {inner}".strip() if not directive else rest.strip()
        if self.hidden:  # the front end's hidden names, as written
            shown = _HIDDEN.sub(lambda m: self.hidden.get(m.group(), m.group()), shown)
        try:
            if mnemonic in REL8_ONLY:
                raise AsmError(loc.file, loc.line, f"{mnemonic} in a .macro, .rept or .irp body: its target cannot "
                               "be checked (Keystone wraps a rel8 target 128 to ~255 bytes away silently)")
            operands = self.resolve_pending(operands)
            found = _check_encodable(mnemonic if not directive else word, directive, operands, loc, self.scope)
        except AsmError as e:
            message = e.message.removeprefix(f"{raw}: ")
            raise AsmError(at.file, at.line, f"{shown} ({where}): {message}" if where else
                           f"{shown}: {message}") from None
        self.result.deferred.extend(Deferred(at, f"{shown} ({where})" if where else shown, d.expression, d.bindings,
                                             d.what, d.hint) for d in found)
        if mnemonic in REL32 and not directive and "[" not in inner:
            target = operand_value(inner, self.names).value
            if target is not None:
                self.result.targets.append(Target(shown, where, target))

    def resolve_pending(self, operands: str) -> str:
        """`operands` with each local name whose value waits for a later symbol replaced by its
        expression (a hidden `.equ` of the front end's, mostly)."""
        if not self.pending:
            return operands
        for _ in range(8):
            changed = False
            for name, expression in self.pending.items():
                if re.search(rf"(?<![\w.$@]){re.escape(name)}(?![\w.$@])", operands):
                    operands = re.sub(rf"(?<![\w.$@]){re.escape(name)}(?![\w.$@])", f"({expression})", operands)
                    changed = True
            if not changed:
                break
        return operands

    def define(self, name: str, expression: str, loc: SourceLocation, at: SourceLocation,
               context: tuple[str, ...]) -> None:
        if "\\" in name:
            return
        if name.startswith(_RESERVED_PREFIX):
            self.hidden[name] = expression  # the front end's: never the unit's
        else:
            self.result.defined.add(name)
        self.pending.pop(name, None)
        value = evaluate(expression, self.names)
        if value.gas is not None:
            shown = _HIDDEN.sub(lambda m: self.hidden.get(m.group(), m.group()), expression)
            self.guard(lambda: agree(shown, value, loc), shown, at, context, loc)
        self.local[name] = value.value
        if value.value is None and value.missing is not None and self.scope.forward(value.missing):
            self.pending[name] = self.resolve_pending(expression)


class _Settled:
    """Names known not to be constants defined later: the unit's settled names and every name
    the expansion set."""

    def __init__(self, local: dict[str, int | None], unit: Container[str]) -> None:
        self.local, self.unit = local, unit

    def __contains__(self, name: object) -> bool:
        return name in self.local or name in self.unit


def _mnemonic(text: str) -> str:
    rest = _split_labels(text)[1]
    return rest.split(None, 1)[0] if rest else ""


def body_facts(text: str) -> tuple[list[str], bool]:
    """For a body statement: the names it defines, and whether it can emit bytes or do
    anything but set names (a macro call counts: it is followed where it is expanded)."""
    defined = _defines(text)
    if defined:
        return defined, False
    rest = _split_labels(text)[1]
    word = rest.split(None, 1)[0].lower() if rest else ""
    return [], bool(word) and word not in _INERT


def _defines(text: str) -> list[str]:
    """The name a `.equ`/`.set`/`.equiv`/`=` statement defines (a list of at most one)."""
    rest = _split_labels(text)[1]
    word = rest.split(None, 1)[0] if rest else ""
    if word.lower() in _DEFINITIONS:
        return [rest[len(word):].partition(",")[0].strip()]
    m = None if word.startswith(".") else _ASSIGNMENT.match(rest)
    return [m.group(1)] if m else []


def _block_end(lines: Sequence[Line], start: int, closer: str) -> int:
    """The index of the line closing the block whose body starts at `start` (len(lines) if none)."""
    depth = 0
    for j in range(start, len(lines)):
        rest = _split_labels(lines[j].text)[1]
        word = rest.split(None, 1)[0].lower() if rest else ""
        if word in _REPEATS or word == ".macro":
            depth += 1
        elif word in (".endr", ".endm", ".endmacro"):
            if depth == 0:
                return j
            depth -= 1
    return len(lines)
