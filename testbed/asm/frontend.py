"""The source front end: includes, defines, assert sites, local labels; builds one assembly unit."""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.asm.branches import REL8_ONLY, BranchCheck, SpanCheck, branch_check
from testbed.asm.engine import _KeystoneError, _ks_asm
from testbed.asm.evaluate import evaluate
from testbed.asm.expand import _IF_TESTS, Expander, Expansion, body_facts
from testbed.asm.guards import (
    Deferred,
    Scope,
    _check_encodable,
    _check_literals,
    _check_operands,
    _hoist_operands,
    agree,
    check_deferred,
    strip_prefixes,
)
from testbed.asm.guest_api import (
    _GUEST_API_VALUE_MACROS,
    _assert_message,
    _constant,
    _guest_api_operands,
    _guest_fail_message,
)
from testbed.asm.lexer import _decode_source, _split_statements
from testbed.asm.program import AssertSite, SourceLocation
from testbed.asm.syntax import (
    _ABSOLUTE_DIRECTIVES,
    _ASSIGNMENT,
    _BAD_EXPONENT,
    _BLOCK_CLOSERS,
    _BLOCK_OPENERS,
    _DATA_DIRECTIVES,
    _EXPRESSION_DIRECTIVES,
    _FREE_FORM_DIRECTIVES,
    _IDENTIFIER,
    _LABEL,
    _MACRO_PARAM_REF,
    _MAX_INCLUDE_DEPTH,
    _NAME_DIRECTIVES,
    _NAME_OPERAND,
    _NAME_OPERAND_HELP,
    _OPERAND_KEYWORDS,
    _PREFIXES,
    _REAL_NUMBER,
    _REGISTER,
    _RESERVED_PREFIX,
    _SUPPORTED_DIRECTIVES,
    _UNSUPPORTED,
    Line,
    _Item,
    _Label,
    _Macro,
    _parse_macro_params,
    _references,
    _split_labels,
    _split_top_level,
    _strip_literals,
)
from testbed.errors import AsmError, TestbedError, UsageError

#: One include resolved: (the name as written in `.include`, the candidate paths tried before the
#: file and absent, the file read, the SHA-256 of its bytes).
IncludeRecord = tuple[str, tuple[str, ...], str, str]


@dataclass
class _Block:
    closer: str  # .endm, .endr or .endif
    loc: SourceLocation
    params: frozenset[str] = frozenset()  # macro / .irp parameters usable inside
    macro: _Macro | None = None
    # A top-level .rept/.irp/.irpc, checked as expanded at its .endr (testbed/asm/expand.py): the
    # directive, its operands, its position label, the unit's constants when it opened, and its
    # body's statements.
    repeat: tuple[str, str, str, dict[str, int], frozenset[str]] | None = None
    body: list[Line] | None = None


# An AT&T-style register (`%eax`), outside string literals.
_ATT_REGISTER = re.compile(r"%[A-Za-z]")
# Hazard: Keystone 0.9.2 reads `0x100h` as 0x100 (GNU as rejects it), and the front end's checks
# would not see a number in it: `mov al, 0x100h` is `mov al, 0`, `.word 0x10000h` vanishes.
_PREFIXED_AND_SUFFIXED = re.compile(r"(?<![\w.$@])0[xXbB][0-9a-fA-F]*[hH](?![\w.$@])")
_NO_PARAMS: frozenset[str] = frozenset()
#: What the checks know of names in a body as written: nothing (its expansions are checked).
_BODY_SCOPE = Scope({})
_ANY_DIGIT = re.compile(r"\d")

# Numeric local labels as GNU as has them: `N:` may be defined any number of times; `Nb` is the
# nearest definition before the reference, `Nf` the nearest after it.
_LOCAL_DEFINITION = re.compile(r"(\d+)\s*:(?![:=])\s*")
_LOCAL_REFERENCE = re.compile(r"(?<![\w.$@\\])(\d+)([bf])(?![\w.$@])")


class _LocalLabels:
    """Numeric local labels (`1:`, `1b`, `1f`) rewritten to hidden unique names, which
    Keystone takes: the k-th definition of `N:` is `__tb_local_N_k`."""

    def __init__(self) -> None:
        self.defined: dict[int, int] = {}  # N -> definitions so far
        self.pending: dict[str, tuple[str, SourceLocation]] = {}  # hidden name of an `Nf` -> (as written, where)

    @staticmethod
    def name(number: int, k: int) -> str:
        return f"{_RESERVED_PREFIX}local_{number}_{k}"

    def rewrite(self, text: str, loc: SourceLocation, in_body: bool) -> str:
        """`text` with its numeric label definitions and references renamed."""
        if not _ANY_DIGIT.search(text):
            return text  # (what the rest would return: its patterns all need a digit)
        head, rest = [], text
        while True:  # leading labels, named or numeric, in order
            if m := _LOCAL_DEFINITION.match(rest):
                number = int(m.group(1))
                if in_body:
                    # Each expansion would define the same hidden name again.
                    raise AsmError(loc.file, loc.line, f"numeric local label {m.group(1)}: inside a .macro, "
                                   ".rept or .irp body is not supported: use a named label built from an argument")
                self.defined[number] = self.defined.get(number, 0) + 1
                hidden = self.name(number, self.defined[number])
                self.pending.pop(hidden, None)
                head.append(f"{hidden}: ")
            elif m := _LABEL.match(rest):
                head.append(rest[: m.end()])
            else:
                break
            rest = rest[m.end() :]
        pieces, pos = [], 0
        for m in _LOCAL_REFERENCE.finditer(_strip_literals(rest)):
            number, seen = int(m.group(1)), self.defined.get(int(m.group(1)), 0)
            if m.group(2) == "b":
                if not seen:
                    raise AsmError(loc.file, loc.line, f"{m.group()}: no local label {m.group(1)}: before it")
                hidden = self.name(number, seen)
            else:
                hidden = self.name(number, seen + 1)
                self.pending.setdefault(hidden, (m.group(), loc))
            pieces.append(rest[pos : m.start()] + hidden)
            pos = m.end()
        return "".join(head) + "".join(pieces) + rest[pos:]

    def finish(self) -> None:
        """AsmError at the first `Nf` that no later `N:` resolves."""
        for written, loc in self.pending.values():
            raise AsmError(loc.file, loc.line, f"{written}: no local label {written[:-1]}: after it")


class _Preprocessor:
    """Walks the sources (following includes) and builds the items of one assembly unit."""

    def __init__(self, include_dirs: Sequence[Path]) -> None:
        self.include_dirs = [Path(d) for d in include_dirs]
        self.items: list[_Item] = []
        self.asserts: dict[int, AssertSite] = {}
        self.local_labels = _LocalLabels()
        self.labels: dict[str, _Label] = {}
        self.macros: dict[str, _Macro] = {}
        self.blocks: list[_Block] = []
        self.positions: list[tuple[str, SourceLocation, bool]] = []  # (hidden label, loc, conditional)
        #: branches whose encoded target the assembler verifies (testbed/asm/branches.py)
        self.branch_checks: list[BranchCheck] = []
        self.include_stack: list[Path] = []
        self.hoisted = 0
        # Every include resolved (IncludeRecord), so a cache of the result can tell whether it
        # is still valid.
        self.included: list[IncludeRecord] = []
        # `.error "message"` statements: the hidden symbol each one references -> its message.
        self.errors: dict[str, str] = {}
        # Names whose value is a plain integer at this point of the unit (from defines and
        # top-level `.equ NAME, 5`), for the guest API's range checks.
        self.constants: dict[str, int] = {}
        # Names defined so far by .equ/.set/.equiv/= (or -D) from constants only: what an
        # .if or .rept may use (see _ABSOLUTE_DIRECTIVES).
        self.absolute: set[str] = set()
        # Where each name defined by .equ/.set/.equiv/= (or -D) was first defined (a label may
        # not take the same name), and the names whose value at a use the front end cannot
        # know: defined more than once, or in a body expanded elsewhere.
        self.equ_defs: dict[str, SourceLocation] = {}
        self.unsettled: set[str] = set()
        # Fields given a symbol defined later, checked when the unit's constants are known
        # (guards.Deferred), and absolute branch targets inside expansions (branches.SpanCheck).
        self.deferred: list[Deferred] = []
        self.span_checks: list[SpanCheck] = []
        # Symbols named like an operand keyword (`word:`, -D FAR=...), in lower case: the front
        # end's analysis reads such a name as the keyword, so where an instruction may use one
        # is limited (guards._check_keyword_symbols).
        self.keyword_symbols: set[str] = set()
        # The image's note (Program.features): features declared by GUEST_IMAGE_FEATURE NAME,
        # and where GUEST_IMAGE_LEGACY withdrew MAP_GPA_RANGE (None if it did not).
        self.image_features: set[str] = set()
        self.image_legacy: SourceLocation | None = None

    def fork(self) -> _Preprocessor:
        """An independent copy, to go on from a cached state (assembler._front_end). Only
        between top-level sources: with no block open, no _Macro is still being filled in, so
        the macros (and every other element: frozen or never changed again) can be shared."""
        if self.blocks or self.include_stack:
            raise TestbedError("internal error: a front end forked inside a block or an include")
        other = copy.copy(self)
        other.include_dirs = list(self.include_dirs)
        other.items = list(self.items)
        other.asserts = dict(self.asserts)
        other.local_labels = _LocalLabels()
        other.local_labels.defined = dict(self.local_labels.defined)
        other.local_labels.pending = dict(self.local_labels.pending)
        other.labels = dict(self.labels)
        other.macros = dict(self.macros)
        other.blocks = []
        other.positions = list(self.positions)
        other.branch_checks = list(self.branch_checks)
        other.include_stack = []
        other.included = list(self.included)
        other.errors = dict(self.errors)
        other.constants = dict(self.constants)
        other.absolute = set(self.absolute)
        other.equ_defs = dict(self.equ_defs)
        other.unsettled = set(self.unsettled)
        other.deferred = list(self.deferred)
        other.span_checks = list(self.span_checks)
        other.keyword_symbols = set(self.keyword_symbols)
        other.image_features = set(self.image_features)
        return other

    def new_hoisted_name(self) -> str:
        self.hoisted += 1
        return f"{_RESERVED_PREFIX}expr_{self.hoisted}"

    # -- files ---------------------------------------------------------------------------

    def add_source(
        self, file: str, text: str, resolved: Path | None, include_loc: SourceLocation | None = None
    ) -> None:
        if resolved is not None:
            if len(self.include_stack) > _MAX_INCLUDE_DEPTH and include_loc is not None:
                raise AsmError(
                    include_loc.file, include_loc.line, f"include nesting deeper than {_MAX_INCLUDE_DEPTH} files"
                )
            self.include_stack.append(resolved)
        for raw in _split_statements(text, file):
            self.add_statement(raw.text, SourceLocation(file, raw.line))
        if resolved is not None:
            self.include_stack.pop()

    def finish(self) -> None:
        self.local_labels.finish()
        if self.blocks:
            block = self.blocks[-1]
            raise AsmError(block.loc.file, block.loc.line, f"block is not closed: missing {block.closer}")
        check_deferred(self.deferred, self.constants, self.unsettled)

    def scope(self) -> Scope:
        """What the checks know of names at the current statement."""
        return Scope(self.constants, self.absolute, self.labels, self.keyword_symbols)

    def include(self, operands: str, loc: SourceLocation) -> None:
        m = re.fullmatch(r'"([^"]+)"', operands.strip())
        if not m:
            raise AsmError(loc.file, loc.line, '.include expects a quoted file name: .include "file.s"')
        name = m.group(1)
        here = [] if loc.file.startswith("<") else [Path(loc.file).parent]
        candidates = [d / name for d in [*here, *self.include_dirs]]
        absent = list(itertools.takewhile(lambda p: not p.is_file(), candidates))
        found = candidates[len(absent)] if len(absent) < len(candidates) else None
        if found is None:
            searched = ", ".join(str(p.parent) for p in candidates) or "no directories"
            raise AsmError(loc.file, loc.line, f"include file {name!r} not found (searched: {searched})")
        resolved = found.resolve()
        if resolved in self.include_stack:
            cycle = [*self.include_stack[self.include_stack.index(resolved) :], resolved]
            raise AsmError(loc.file, loc.line, "include cycle: " + " -> ".join(p.name for p in cycle))
        try:
            data = found.read_bytes()
        except OSError as e:
            raise AsmError(loc.file, loc.line, f"cannot read include file {str(found)!r}: {e.strerror or e}") from None
        self.included.append((name, tuple(str(p) for p in absent), str(found), hashlib.sha256(data).hexdigest()))
        text = _decode_source(data, str(found), loc)
        self.add_source(str(found), text, resolved, loc)

    # -- statements ----------------------------------------------------------------------

    def add_statement(self, text: str, loc: SourceLocation) -> None:
        file, line = loc.file, loc.line
        if text.startswith("%"):
            # Hazard: NASM directives (%define, %macro) make ks_asm loop forever.
            # Canary: test_statement_starting_with_an_operator_hangs.
            raise AsmError(file, line, f"NASM-style directive {text.split(maxsplit=1)[0]!r} is not supported")
        stripped = _strip_literals(text)
        if "%" in stripped and _ATT_REGISTER.search(stripped):
            # Hazard: Keystone silently drops a statement with an AT&T register like %eax.
            raise AsmError(file, line, "AT&T-style %register is not supported (Intel syntax only)")
        if _BAD_EXPONENT.search(stripped):
            # Hazard: Keystone hangs on `.double 1.5e` (and encodes `mov rax, 1e` as a double).
            raise AsmError(file, line, "malformed number: an exponent without digits")
        _check_literals(text, loc)
        if "**" in stripped:
            # Hazard: Keystone 0.9.2 hangs on `**` in a directive (`.quad 2**3`), whatever the values.
            raise AsmError(file, line, "`**` is no operator (Keystone hangs on it): write the power out, e.g. 1 << 3")
        if m := _PREFIXED_AND_SUFFIXED.search(stripped):
            raise AsmError(file, line, f"{m.group()}: a number is 0x-prefixed or h-suffixed, not both (Keystone reads "
                           f"{m.group()} as {m.group()[:-1]}, GNU as rejects it)")
        written_labels = _split_labels(text)[0]
        # Keystone rejects numeric local labels (test_numeric_local_labels_are_rejected): they
        # become hidden unique names here.
        blocks = self.blocks
        text = self.local_labels.rewrite(text, loc, bool(blocks) and any(b.closer in (".endm", ".endr")
                                                                         for b in blocks))
        labels, rest = _split_labels(text)
        mnemonic = rest.split(None, 1)[0] if rest else ""
        operands = rest[len(mnemonic) :].strip()
        directive = mnemonic.lower() if mnemonic.startswith(".") else ""
        in_macro = bool(blocks) and any(b.closer == ".endm" for b in blocks)
        in_body = bool(blocks) and any(b.closer in (".endm", ".endr") for b in blocks)
        params = frozenset(p for b in blocks for p in b.params) if blocks else _NO_PARAMS

        if rest and not (rest[0].isalpha() or rest[0] in "_." or (rest[0] == "\\" and params)):
            # Hazard: a statement starting with an operator or bracket makes ks_asm loop forever.
            # Canary: test_statement_starting_with_an_operator_hangs.
            raise AsmError(file, line, f"a statement must start with a mnemonic, directive or label: {rest}")
        if directive == ".include":
            if labels:
                self.add_statement(" ".join(f"{name}:" for name in labels), loc)
            self.include(operands, loc)
            return
        error_symbol = ""
        if directive == ".error" and mnemonic not in self.macros:
            # Hazard: Keystone 0.9.2 silently ignores `.error`. It becomes a reference to a
            # symbol that is never defined, so assembly fails exactly when the statement is
            # assembled (an .if branch taken, a macro expanded); _locate_error finds the
            # statement that expanded it and reports the message there.
            # Canary: tests/test_guest_api_immediates.py::test_error_directive_is_silently_ignored.
            m = re.fullmatch(r'"((?:[^"\\\n]|\\.)*)"', operands)
            if not m:
                raise AsmError(file, line, '.error expects a quoted message: .error "what went wrong"')
            error_symbol = f"{_RESERVED_PREFIX}error_{len(self.errors)}"
            self.errors[error_symbol] = m.group(1).replace('\\"', '"') or ".error"
            text = "".join(f"{name}: " for name in labels) + f".quad {error_symbol}"
        if directive and directive not in _SUPPORTED_DIRECTIVES and mnemonic not in self.macros:
            reason = _UNSUPPORTED.get(directive, "Keystone 0.9.2 would silently ignore or mishandle it")
            raise AsmError(file, line, f"unsupported directive {mnemonic}: {reason}")
        self.check_backslashes(text, params, loc)
        assignment = None if directive else _ASSIGNMENT.match(rest)
        if assignment:
            _check_operands("", rest[assignment.end() :], False, loc)
        elif directive not in _FREE_FORM_DIRECTIVES:
            _check_operands(directive, operands, mnemonic in self.macros, loc)
            if mnemonic not in self.macros:
                # In a body only what holds whatever the expansion: the rest is checked where it
                # is expanded (testbed/asm/expand.py).
                self.deferred.extend(_check_encodable(mnemonic.lower(), directive, operands, loc,
                                                      _BODY_SCOPE if in_body else self.scope(), defer=not in_body))
                if in_body and not directive and strip_prefixes(mnemonic.lower(), operands)[0] in REL8_ONLY:
                    raise AsmError(file, line, f"{strip_prefixes(mnemonic.lower(), operands)[0]} in a .macro, .rept or "
                                   ".irp body: its rel8 target cannot be checked after assembly (Keystone wraps one "
                                   "128 to ~255 bytes away silently): write it outside the body, or use dec and jnz")
        elif directive in _NAME_DIRECTIVES and not _NAME_OPERAND[directive].fullmatch(operands):
            # Hazard: Keystone hangs on e.g. `.purgem foo: x`.
            raise AsmError(file, line, f"{directive} expects {_NAME_OPERAND_HELP[directive]}")
        for name in written_labels:
            if name.startswith(_RESERVED_PREFIX):
                raise AsmError(file, line, f"label {name!r}: names starting {_RESERVED_PREFIX} are reserved")
            if _REGISTER.fullmatch(name.lower()):
                # Hazard: Keystone accepts the label, then reads the name as the register (or
                # drops the term: `lea rbx, [rip + rax]` is `lea rbx, [rip]`).
                raise AsmError(file, line, f"label {name!r}: a register name cannot be a symbol")
            if name.lower() in _OPERAND_KEYWORDS:
                self.keyword_symbols.add(name.lower())  # checked where an instruction names it (guards)
            if name in self.equ_defs:
                # Hazard: which value a use gets (the .equ's or the label's) depends on where it is.
                raise AsmError(file, line, f"label {name}: {name} is already a symbol defined by .equ at "
                               f"{self.equ_defs[name]}")
        equ_name = ""
        if directive in (".equ", ".set", ".equiv") or assignment:
            equ_name = (assignment.group(1) if assignment else operands.split(",", 1)[0]).strip()
            if _REGISTER.fullmatch(equ_name.lower()):
                raise AsmError(file, line, f"{directive or '='} {equ_name}: a register name cannot be a symbol")
            if equ_name.lower() in _OPERAND_KEYWORDS:
                self.keyword_symbols.add(equ_name.lower())
            if equ_name in self.labels or equ_name in written_labels:
                at = self.labels[equ_name].loc if equ_name in self.labels else loc
                raise AsmError(file, line, f"{directive or '='} {equ_name}: {equ_name} is already a label at {at}")
        if directive == ".word":
            # Hazard: Keystone 0.9.2 drops a `.word` whose value is out of range (a constant's
            # too), silently; `.short` is the same directive and reports it.
            text = "".join(f"{name}: " for name in labels) + ".short" + rest[len(mnemonic):]

        if mnemonic in _GUEST_API_VALUE_MACROS and mnemonic in self.macros and not in_macro and operands:
            checked = _guest_api_operands(mnemonic, operands, self.constants, loc)
            if checked != operands:
                operands = checked
                text = "".join(f"{name}: " for name in labels) + f"{mnemonic} {operands}"
        if mnemonic in ("GUEST_IMAGE_FEATURE", "GUEST_IMAGE_LEGACY") and mnemonic in self.macros:
            self.image_note(mnemonic, operands, loc, in_macro)
        if mnemonic == "GUEST_FAIL":
            # The message stays on the host (the site table): never a byte of guest memory.
            message, operands = _guest_fail_message(operands, loc), "0"
            text = "".join(f"{name}: " for name in labels) + f"{mnemonic} {operands}"
        if (mnemonic.startswith("GUEST_ASSERT") or mnemonic == "GUEST_FAIL") and not in_macro:
            # The call-site id becomes the assert macro's last argument. Inside a macro body an
            # assert has no single call site: the macro must forward its own site argument.
            # Case-sensitive, like Keystone's macro names (test_macro_names_are_case_sensitive).
            site = len(self.asserts) + 1
            if mnemonic != "GUEST_FAIL":
                message = _assert_message(mnemonic, operands)
            self.asserts[site] = AssertSite(loc.file, loc.line, mnemonic, message)
            operands = f"{operands}, {site}" if operands else str(site)
            text = "".join(f"{name}: " for name in labels) + f"{mnemonic} {operands}"
        instruction = not directive and not assignment and mnemonic not in self.macros
        if instruction and _REAL_NUMBER.search(_strip_literals(operands)):
            # Hazard: Keystone silently encodes `mov rax, 2.5` as the bits of a double.
            # Canary: test_float_literal_is_encoded_as_double_bits.
            raise AsmError(file, line, "floating-point number in an instruction operand")
        if mnemonic in self.macros and not in_macro:
            self.check_macro_arguments(self.macros[mnemonic], operands, loc)

        refs = self.references(mnemonic, directive, rest, operands)
        if error_symbol:
            refs.add(error_symbol)
        hoisted: list[str] = []
        if not directive and not assignment and operands:
            inner = ""
            if mnemonic.lower() in _PREFIXES:  # `lock add [rbx - K], 1`: operands follow the instruction
                inner, _, operands = operands.partition(" ")
                inner += " "
            operands, hoisted = _hoist_operands(operands, self.new_hoisted_name)
            operands = inner + operands.strip()
            if hoisted:
                text = "".join(f"{name}: " for name in labels) + f"{mnemonic} {operands}"
        plain_labels = tuple(name for name in labels if "\\" not in name) if labels else ()
        defines_here = set(plain_labels)
        if directive in (".equ", ".set", ".equiv"):
            defines_here.add(operands.split(",", 1)[0].strip())
        elif assignment:
            defines_here.add(assignment.group(1))
        if directive in _ABSOLUTE_DIRECTIVES and not in_body and "\\" not in operands:
            condition = evaluate(operands, self.constants)
            if condition.gas is not None and condition.value is not None and (
                    directive == ".rept" or _IF_TESTS.get(directive, bool)(condition.value)
                    != _IF_TESTS.get(directive, bool)(condition.gas)):
                agree(operands, condition, loc)
        if directive in _ABSOLUTE_DIRECTIVES and not in_macro and "\\" not in operands:
            unknown = sorted(_references(operands) - self.absolute)
            if unknown:
                raise AsmError(
                    file, line, f"{directive} needs constants defined before it, not {', '.join(unknown)} "
                    f"(Keystone 0.9.2 silently drops an {directive} on a label or a symbol defined later)"
                )
        for name in defines_here:
            self.constants.pop(name, None)
            self.absolute.discard(name)
        if equ_name and "\\" not in equ_name:
            if equ_name in self.equ_defs or in_body:
                self.unsettled.add(equ_name)
            self.equ_defs.setdefault(equ_name, loc)
        if equ_name and not in_body:
            value_text = rest[assignment.end() :] if assignment else operands.split(",", 1)[1]
            computed = evaluate(value_text, self.constants)
            agree(value_text, computed, loc)
            value = _constant(value_text, self.constants)
            if value is None:
                value = computed.value
            if value is not None and not self.blocks:
                self.constants[equ_name] = value
        if directive in (".equ", ".set", ".equiv") or assignment:
            name, value_text = (
                (assignment.group(1), rest[assignment.end() :]) if assignment else operands.split(",", 1)
            )
            if "\\" not in name and not _references(value_text) - self.absolute:
                self.absolute.add(name.strip())
        body_lines = [Line(one, loc) for one in [*hoisted, text]] if in_body else []
        for block in blocks:
            if block.macro is not None:
                block.macro.body_refs |= refs
                block.macro.body_labels |= set(plain_labels)
                self.add_to_body(block.macro, body_lines, rest, mnemonic, operands)
            if block.body is not None:
                block.body.extend(body_lines)
        for name in plain_labels:
            self.labels.setdefault(name, _Label(name, loc, conditional=bool(self.blocks)))

        # A hidden position label before each top-level statement that can emit bytes gives
        # Program.lines; bodies of .macro/.rept/.irp are expanded elsewhere (or repeatedly)
        # and are attributed to the statement that expands them.
        position = ""
        emits = (
            directive in _DATA_DIRECTIVES
            or directive in (".rept", ".irp", ".irpc")
            or (not directive and rest and not assignment)
        )
        if emits and (not blocks or all(b.closer == ".endif" for b in blocks)):
            position = f"{_RESERVED_PREFIX}line_{len(self.positions)}"
            self.positions.append((position, loc, bool(self.blocks)))
            if not directive and not assignment and mnemonic not in self.macros:
                check = branch_check(mnemonic.lower(), operands, position, loc, self.absolute)
                if check is not None:
                    self.branch_checks.append(check)
        if mnemonic in self.macros and not in_body:
            self.expanded(Expander(self.macros, self.constants, self.absolute, self.labels, loc, self.keyword_symbols)
                          .call(self.macros[mnemonic], operands, loc), position, loc)

        self.update_blocks(directive, operands, loc, position)
        self.items.append(
            _Item(
                text="\n".join([*([f"{position}:"] if position else []), *hoisted, text]),
                loc=loc,
                mnemonic=mnemonic,
                labels=plain_labels,
                refs=frozenset(refs - defines_here),
                closers=tuple(b.closer for b in reversed(blocks)) if blocks else (),
            )
        )

    def add_to_body(self, macro: _Macro, lines: list[Line], rest: str, mnemonic: str, operands: str) -> None:
        """Keep a statement of `macro`'s body (with its hidden `.equ` lines) for the checks of its
        expansions."""
        macro.body.extend(lines)
        for line in lines:
            defined, emits = body_facts(line.text)
            macro.body_defines.update(defined)
            macro.emits = macro.emits or emits
        if mnemonic and not mnemonic.startswith(".") and not _ASSIGNMENT.match(rest):
            macro.body_calls.append((mnemonic, operands))

    def expanded(self, found: Expansion, position: str, loc: SourceLocation) -> None:
        """Take in what checking an expansion found: its checks for later and of its absolute
        branch targets (at the expanding statement's `position`), and the names it set."""
        self.deferred.extend(found.deferred)
        if position:
            self.span_checks.extend(SpanCheck(position, f"{t.statement} ({t.context})", t.value, loc)
                                    for t in found.targets)
        for name in found.defined:
            self.constants.pop(name, None)
            self.unsettled.add(name)

    def image_note(self, mnemonic: str, operands: str, loc: SourceLocation, in_macro: bool) -> None:
        """Record a GUEST_IMAGE_FEATURE / GUEST_IMAGE_LEGACY note (the image's, for the control
        plane): only where it is surely assembled, at the top level outside .if/.rept blocks."""
        if in_macro or self.blocks:
            raise AsmError(loc.file, loc.line, f"{mnemonic} declares the whole image: write it at the top level, "
                           "outside .macro, .rept and .if blocks")
        if mnemonic == "GUEST_IMAGE_LEGACY":
            if operands:
                raise AsmError(loc.file, loc.line, "GUEST_IMAGE_LEGACY takes no operands")
            self.image_legacy = self.image_legacy or loc
        elif not re.fullmatch(r"[A-Z][A-Z0-9_]*", operands):
            raise AsmError(loc.file, loc.line,
                           "GUEST_IMAGE_FEATURE expects one feature name: GUEST_IMAGE_FEATURE MAP_GPA_RANGE")
        else:
            self.image_features.add(operands)

    def image_feature_list(self) -> tuple[str, ...]:
        """The features the image declares (Program.features): GUEST_IMAGE_LEGACY withdraws
        MAP_GPA_RANGE, whatever the runtime declared."""
        withdrawn = {"MAP_GPA_RANGE"} if self.image_legacy is not None else set()
        return tuple(sorted(self.image_features - withdrawn))

    def references(self, mnemonic: str, directive: str, rest: str, operands: str) -> set[str]:
        """Identifiers a statement may use as symbols, for stubbing and naming missing ones."""
        if m := _ASSIGNMENT.match(rest):
            return _references(rest[m.end() :])
        if directive:
            if directive in (".equ", ".set", ".equiv"):
                return _references(operands.partition(",")[2])
            return _references(operands) if directive in _EXPRESSION_DIRECTIVES else set()
        if mnemonic.lower() in _PREFIXES:
            operands = operands.split(None, 1)[1] if " " in operands else ""
        return _references(operands)

    def check_backslashes(self, text: str, params: frozenset[str], loc: SourceLocation) -> None:
        """`\\name` must name a parameter of an enclosing .macro/.irp/.irpc.

        Hazard: Keystone silently drops a statement with an unknown `\\name`, and a `\\`
        outside any macro can make it hang. Canary: test_unknown_macro_parameter_drops_the_statement.
        """
        for m in _MACRO_PARAM_REF.finditer(_strip_literals(text)):
            if not params:
                raise AsmError(loc.file, loc.line, "'\\' outside a macro body (macro parameters only)")
            name = m.group(1)
            if m.group(3) == "@":
                raise AsmError(loc.file, loc.line, "\\@ is not supported by Keystone 0.9.2")
            if name == "" and m.group(2):
                continue  # \() separates a parameter from the text after it
            if name not in params:
                known = ", ".join(f"\\{p}" for p in sorted(params))
                raise AsmError(loc.file, loc.line, f"unknown macro parameter \\{name} (known: {known})")

    def check_macro_arguments(self, macro: _Macro, operands: str, loc: SourceLocation) -> None:
        """Hazard: Keystone substitutes nothing for a missing argument and then silently drops
        the statements that used it, so arity is checked here.
        Canary: test_missing_macro_argument_drops_the_statement."""
        given = len(_split_top_level(_strip_literals(operands))) if operands else 0
        required = sum(1 for p in macro.params if p.required and not p.vararg)
        vararg = any(p.vararg for p in macro.params)
        if given < required or (given > len(macro.params) and not vararg):
            names = ", ".join(p.name for p in macro.params)
            raise AsmError(
                loc.file,
                loc.line,
                f"macro {macro.name} ({names}, defined at {macro.loc}) takes "
                f"{required if required == len(macro.params) else f'{required} to {len(macro.params)}'}"
                f" comma-separated arguments, {given} given",
            )

    def update_blocks(self, directive: str, operands: str, loc: SourceLocation, position: str = "") -> None:
        if directive in _BLOCK_OPENERS:
            params: frozenset[str] = frozenset()
            macro = None
            repeat = None
            if directive in (".rept", ".irp", ".irpc") and not any(b.closer in (".endm", ".endr") for b in self.blocks):
                repeat = (directive, operands, position, dict(self.constants), frozenset(self.absolute))
            if directive == ".macro":
                name, macro_params = _parse_macro_params(operands, loc.file, loc.line)
                macro = _Macro(name, macro_params, loc, len(self.items))
                if not any(b.closer == ".endm" for b in self.blocks):
                    self.macros[name] = macro
                params = frozenset(p.name for p in macro_params)
            elif directive in (".irp", ".irpc"):
                params = frozenset([operands.split(",", 1)[0].strip()])
            self.blocks.append(_Block(_BLOCK_OPENERS[directive], loc, params, macro, repeat,
                                      [] if repeat is not None else None))
        elif directive in _BLOCK_CLOSERS:
            closer = _BLOCK_CLOSERS[directive]
            if not self.blocks or self.blocks[-1].closer != closer:
                expected = f"expected {self.blocks[-1].closer}" if self.blocks else "no block is open"
                raise AsmError(loc.file, loc.line, f"{directive} does not match ({expected})")
            block = self.blocks.pop()
            if block.repeat is not None and block.body is not None:
                kind, header, at, constants, absolute = block.repeat
                self.expanded(Expander(self.macros, constants, absolute, self.labels, None, self.keyword_symbols)
                              .block(kind, header, block.body), at, block.loc)
        elif directive in (".else", ".elseif") and (not self.blocks or self.blocks[-1].closer != ".endif"):
            raise AsmError(loc.file, loc.line, f"{directive} outside an .if block")
        elif directive == ".purgem" and not any(b.closer == ".endm" for b in self.blocks):
            self.macros.pop(operands.strip(), None)


# --------------------------------------------------------------------------------------------
# Defines
# --------------------------------------------------------------------------------------------

_DEFINE_VALUE = re.compile(r"[A-Za-z0-9_.$@+\-*/%~!&|^<>=() ]+")


#: Defines Keystone accepted alone (a pure function of the text: every front end checks the
#: same ~20 layout defines, one Keystone round trip each). Bounded; a refusal is not kept.
_KEYSTONE_ACCEPTED: set[tuple[str, str]] = set()
_KEYSTONE_ACCEPTED_MAX = 4096


def _check_define(name: str, value: str) -> None:
    if not _IDENTIFIER.fullmatch(name):
        raise UsageError(f"define {name!r}: the name must be an identifier (letters, digits, _)")
    if name.startswith(_RESERVED_PREFIX):
        raise UsageError(f"define {name!r}: names starting {_RESERVED_PREFIX} are reserved")
    # Hazard: Keystone resolves a register-named symbol, or a define whose value is a register,
    # as the register (`-D rax=5` leaves `mov rbx, rax` a register move; `-D FOO=rax` makes FOO
    # "missing"), silently or with a misleading message.
    if _REGISTER.fullmatch(name.lower()):
        raise UsageError(f"define {name}: a register name cannot be a symbol")
    if _REGISTER.fullmatch(value.lower()):
        raise UsageError(f"define {name}={value}: a register is not a value (a define must be a number or "
                         "an expression)")
    if not _DEFINE_VALUE.fullmatch(value) or "//" in value or "/*" in value:
        raise UsageError(f"define {name}={value!r}: the value must be a number or an expression")
    try:
        _check_operands(".equ", f"{name}, {value}", False, SourceLocation("<define>", 1))
    except AsmError as e:
        raise UsageError(f"define {name}={value}: not a valid expression ({e.message})") from None
    # Hazard: Keystone silently drops `.equ X, 1+` when more statements follow, so each value
    # is checked alone, where Keystone does report it.
    # Canary: test_directive_error_followed_by_statements_is_lost.
    if (name, value) in _KEYSTONE_ACCEPTED:
        return
    try:
        _ks_asm(f".equ {name}, {value}\n", 0)
    except _KeystoneError as e:
        raise UsageError(f"define {name}={value}: not a valid expression ({e.message})") from None
    if len(_KEYSTONE_ACCEPTED) >= _KEYSTONE_ACCEPTED_MAX:
        _KEYSTONE_ACCEPTED.clear()
    _KEYSTONE_ACCEPTED.add((name, value))


def _define_items(defines: Mapping[str, int | str]) -> list[_Item]:
    items = []
    for name, raw in defines.items():
        if isinstance(raw, int):
            if not -(2**63) <= raw < 2**64:
                raise UsageError(f"define {name}={raw}: the value does not fit in 64 bits")
            value = str(int(raw))
        else:
            value = str(raw).strip()
        _check_define(name, value)
        loc = SourceLocation(f"<define {name}>", 1)
        refs = frozenset(_references(value) - {name})
        items.append(_Item(f".equ {name}, {value}", loc, refs=refs, define=(name, value)))
    return items


