"""Assembly: the public entry points, and the symbol-table trick that reads labels back."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import operator
import os
import re
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from testbed.asm.branches import BranchCheck, SpanCheck, verify_branches, verify_spans
from testbed.asm.engine import _KeystoneError, _ks_asm
from testbed.asm.frontend import IncludeRecord, _check_define, _define_items, _Preprocessor
from testbed.asm.guards import Deferred
from testbed.asm.guest_api import _constant
from testbed.asm.lexer import _decode_source
from testbed.asm.locate_error import _locate_error
from testbed.asm.program import Program, SourceLocation
from testbed.asm.syntax import _OPERAND_KEYWORDS, _RESERVED_PREFIX, _Item, _Label, _Macro, _render, _strip_literals
from testbed.errors import TestbedError, UsageError

_NO_DEFINES: Mapping[str, int | str] = MappingProxyType({})


def parse_define(text: str) -> tuple[str, str]:
    """Split a command-line define `NAME=VALUE`; UsageError if it is not of that form."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise UsageError(f"bad define {text!r}: expected NAME=VALUE, e.g. PAGES=4")
    _check_define(name, value)
    return name, value


def assemble_source(
    text: str,
    *,
    filename: str = "<string>",
    base: int,
    defines: Mapping[str, int | str] = _NO_DEFINES,
    include_dirs: Sequence[Path] = (),
) -> Program:
    """Assemble one source text; `filename` is used in locations and to resolve includes."""
    return _assemble([(filename, text)], base, defines, include_dirs)


def assemble_sources(
    sources: Sequence[tuple[str, str]],
    *,
    base: int,
    defines: Mapping[str, int | str] = _NO_DEFINES,
    include_dirs: Sequence[Path] = (),
) -> Program:
    """Assemble (filename, text) pairs in order as one unit; each keeps its own locations."""
    return _assemble(list(sources), base, defines, include_dirs)


def assemble_files(
    paths: Sequence[Path],
    *,
    base: int,
    defines: Mapping[str, int | str] = _NO_DEFINES,
    include_dirs: Sequence[Path] = (),
) -> Program:
    """Assemble the files in order as one unit; each keeps its own file:line locations."""
    sources = [(str(path), read_source(path)) for path in paths]
    return _assemble(sources, base, defines, include_dirs)


def read_source(path: Path | str) -> str:
    """The text of a guest source file: UsageError if it cannot be read, AsmError naming the
    line if it is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read guest source {path}: {e.strerror or e}") from None
    except ValueError as e:  # e.g. a NUL character in the path
        raise UsageError(f"cannot read guest source {path!r}: {e}") from None
    return _decode_source(data, str(path), None)


def _table_text(name: str, conditional: bool) -> str:
    """One 8-byte entry of the hidden symbol table: the address of `name`, or all-ones."""
    if not conditional:
        return f".quad {name}"
    # A label inside a block may never be defined (an .if branch not taken, a macro never
    # expanded): .ifdef keeps the entry 8 bytes long either way.
    return f".ifdef {name}\n.quad {name}\n.else\n.quad -1\n.endif"


def _table_items(pre: _Preprocessor) -> list[_Item]:
    """The table's entries as items, each at its label's or statement's location: made only
    to locate an error (_locate_error reads items)."""
    return [_Item(_table_text(label.name, label.conditional), label.loc) for label in pre.labels.values()] + [
        _Item(_table_text(name, cond), loc) for name, loc, cond in pre.positions]


def _start(defines: Mapping[str, int | str], include_dirs: Sequence[Path]) -> _Preprocessor:
    """A front end with the defines' `.equ` lines in it."""
    pre = _Preprocessor(include_dirs)
    pre.items.extend(_define_items(defines))
    for item in pre.items:
        if item.define is not None:
            pre.absolute.add(item.define[0])
            pre.equ_defs[item.define[0]] = item.loc
            if item.define[0].lower() in _OPERAND_KEYWORDS:
                pre.keyword_symbols.add(item.define[0].lower())
            if (value := _constant(item.define[1], pre.constants)) is not None:
                pre.constants[item.define[0]] = value
    return pre


def _add(pre: _Preprocessor, file: str, text: str) -> None:
    pre.add_source(file, text, None if file.startswith("<") else Path(file).resolve())


def _front_end_uncached(
    sources: Sequence[tuple[str, str]], defines: Mapping[str, int | str], include_dirs: Sequence[Path]
) -> _Preprocessor:
    """The reference front end: every statement of every source, in order."""
    pre = _start(defines, include_dirs)
    for file, text in sources:
        _add(pre, file, text)
    pre.finish()
    return pre


# Reusing the front end's work within a process. build_program assembles the prelude, the
# guest and the runtime as one unit; the prelude and the runtime are ~97 % of its statements
# and the same for every guest, and the front end is ~85 % of an assembly's cost. So:
#  * the state after the defines and the first source (the prelude) is kept and forked;
#  * the last source (the runtime) is processed once after that state with nothing between
#    (its "record"), and its items replayed after the middle sources (the guest), with the
#    hidden counter-numbered names renumbered, when nothing the middle sources changed can be
#    seen by it (_replayable). The result equals what _front_end_uncached builds, item for
#    item (tests/test_asm_cache.py checks this for every guest in guests/); if the replay's
#    assumptions do not hold, or Keystone refuses the unit, the reference path runs instead.
_MEMO_SIZE = 8
_prefixes: dict[tuple[object, ...], _Preprocessor] = {}
_suffixes: dict[tuple[object, ...], _Suffix | None] = {}
#  * a unit whose defines were not seen yet may replay a runtime recorded under other defines
#    (a "donor": the prefix it was recorded after, and the record), when _replayable finds no
#    name that differs between that prefix and the unit's state in the runtime's text - the
#    test suite's ~200 define sets differ mostly in defines only guests read (HC_NR, SHAPE, ...).
#    Keyed by the include dirs, the prelude and the runtime; the latest _MEMO_SIZE per key.
_donors: dict[tuple[object, ...], list[tuple[_Preprocessor, _Suffix]]] = {}
_COUNTED_NAME = re.compile(re.escape(_RESERVED_PREFIX) + r"(line|expr)_(\d+)")


@dataclass(frozen=True)
class _Suffix:
    """The last source processed right after the cached prefix state."""

    positions: int  # len(pre.positions) before it
    hoisted: int  # pre.hoisted before it
    items: tuple[_Item, ...]
    new_positions: tuple[tuple[str, SourceLocation, bool], ...]
    new_labels: tuple[_Label, ...]
    hoisted_after: int
    included: tuple[IncludeRecord, ...]
    texts: tuple[str, ...]  # its text and its includes', as written and with literals masked
    #: every name _replayable's whole-name match could find in `texts` (_whole_names)
    names: frozenset[str]
    #: how a replay renumbers its items and positions (_plan)
    plan: _Plan
    image_features: frozenset[str] = frozenset()  # its GUEST_IMAGE_FEATURE notes
    image_legacy: SourceLocation | None = None  # its GUEST_IMAGE_LEGACY, if any
    # The checks it added (positions renumbered like the items'), the names it defined by .equ
    # (and where), the names it unsettled, and the constants it changed (None: removed).
    branch_checks: tuple[BranchCheck, ...] = ()
    span_checks: tuple[SpanCheck, ...] = ()
    deferred: tuple[Deferred, ...] = ()
    equ_defs: tuple[tuple[str, SourceLocation], ...] = ()
    unsettled: frozenset[str] = frozenset()
    constants: tuple[tuple[str, int | None], ...] = ()
    keyword_symbols: frozenset[str] = frozenset()


def _remember(memo: dict[tuple[object, ...], Any], key: tuple[object, ...], value: object) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.pop(next(iter(memo)))
    memo[key] = value


#: A file changed less than this long ago is always read again: its ctime may not have moved
#: between two writes of the same size within one clock tick (git's "racy" files).
RACY_NS = 2 * 10**9
_FILE_MEMO_MAX = 1024
_T = TypeVar("_T")
#: What `remembered` keeps: by path, ((ctime_ns, size, inode), value).
FileMemo = dict[str, tuple[tuple[int, int, int], _T]]


def stat_version(path: str | Path) -> tuple[int, int, int] | None:
    """(ctime_ns, size, inode) of the file at `path`, or None when it changed too recently for
    them to tell one version from the next (RACY_NS); OSError if it cannot be read. The inode
    change time, not the modification time: every write moves it and nothing can set it back
    (utime, cp -p and archives set mtimes)."""
    stat = os.stat(path)
    if time.time_ns() - stat.st_ctime_ns < RACY_NS:
        return None
    return stat.st_ctime_ns, stat.st_size, stat.st_ino


def remembered(memo: FileMemo[_T], path: str | Path, load: Callable[[], _T]) -> _T:
    """`load()` of the file at `path`, from `memo` while the file is unchanged (stat_version);
    a racy file is loaded every time. Bounded: `memo` is cleared at _FILE_MEMO_MAX paths (a
    process may build guests from many temporary directories)."""
    version = stat_version(path)
    key = str(path)
    known = memo.get(key)
    if version is not None and known is not None and known[0] == version:
        return known[1]
    value = load()
    if version is not None:
        if len(memo) >= _FILE_MEMO_MAX:
            memo.clear()
        memo[key] = (version, value)
    return value


#: SHA-256 of the files includes found: every build of a guest checks the runtime's includes.
_digests: FileMemo[str] = {}


def _file_digest(path: str) -> str:
    """SHA-256 of the file at `path` (OSError if it cannot be read), remembered while it is unchanged."""
    return remembered(_digests, path, lambda: hashlib.sha256(Path(path).read_bytes()).hexdigest())


def _includes_valid(included: Sequence[IncludeRecord]) -> bool:
    """Whether every include would still resolve to the same file with the same contents (a
    path that cannot be one, e.g. with a NUL in it, is not)."""
    try:
        for _name, absent, found, digest in included:
            if any(Path(p).is_file() for p in absent):
                return False
            if _file_digest(found) != digest:
                return False
    except (OSError, ValueError):
        return False
    return True


def _record_suffix(prefix: _Preprocessor, file: str, text: str) -> _Suffix | None:
    """Process the last source after `prefix`; None if its items cannot be replayed elsewhere."""
    if _RESERVED_PREFIX in text:
        return None
    pre = prefix.fork()
    items, labels, included = len(pre.items), len(pre.labels), len(pre.included)
    before = (dict(pre.local_labels.defined), dict(pre.local_labels.pending), len(pre.asserts), len(pre.errors))
    try:
        _add(pre, file, text)
    except TestbedError:
        return None  # an error is reported by the reference path
    after = (pre.local_labels.defined, pre.local_labels.pending, len(pre.asserts), len(pre.errors))
    new_items = tuple(pre.items[items:])
    hidden = (_RESERVED_PREFIX + "local_", _RESERVED_PREFIX + "error_")
    if (before != after or pre.blocks or any(h in item.text for item in new_items for h in hidden)
            or any(_RESERVED_PREFIX in name for item in new_items for name in (*item.refs, *item.labels))):
        return None
    new_included = tuple(pre.included[included:])
    raw_texts = [text]
    for _name, _absent, found, _digest in new_included:
        try:
            raw_texts.append(Path(found).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    texts = tuple(t for raw in raw_texts for t in (raw, _strip_literals(raw)))
    return _Suffix(
        positions=len(prefix.positions),
        hoisted=prefix.hoisted,
        items=new_items,
        new_positions=tuple(pre.positions[len(prefix.positions):]),
        new_labels=tuple(list(pre.labels.values())[labels:]),
        hoisted_after=pre.hoisted,
        included=new_included,
        texts=texts,
        names=frozenset().union(*map(_whole_names, texts)),
        plan=_plan(new_items, pre.positions[len(prefix.positions):]),
        image_features=frozenset(pre.image_features - prefix.image_features),
        image_legacy=pre.image_legacy if prefix.image_legacy is None else None,
        branch_checks=tuple(pre.branch_checks[len(prefix.branch_checks):]),
        span_checks=tuple(pre.span_checks[len(prefix.span_checks):]),
        deferred=tuple(pre.deferred[len(prefix.deferred):]),
        equ_defs=tuple((name, loc) for name, loc in pre.equ_defs.items() if name not in prefix.equ_defs),
        unsettled=frozenset(pre.unsettled - prefix.unsettled),
        constants=tuple((name, pre.constants.get(name)) for name in _changed(prefix.constants, pre.constants,
                                                                              operator.eq)),
        keyword_symbols=frozenset(pre.keyword_symbols - prefix.keyword_symbols),
    )


def _changed(
    before: Mapping[str, object], after: Mapping[str, object], same: Callable[[object, object], bool]
) -> set[str]:
    missing = object()
    if before is after:
        return set()
    return {k for k in before.keys() | after.keys() if not same(before.get(k, missing), after.get(k, missing))}


def _same_macro(a: object, b: object) -> bool:
    """The same macro for the statements that use it: the very object, or (from a front end
    with other defines) one with the same name, parameters, location and body names. Its
    `index` (where its .macro item sits) is left out: only an error report reads it, from the
    unit's own macros."""
    if a is b:
        return True
    if not isinstance(a, _Macro) or not isinstance(b, _Macro):
        return False
    return (a.name, a.params, a.loc, a.body_refs, a.body_labels) == (b.name, b.params, b.loc, b.body_refs,
                                                                     b.body_labels)


def _replayable(prefix: _Preprocessor, pre: _Preprocessor, suffix: _Suffix) -> bool:
    """Whether processing the suffix after `pre` would give the recorded items (renumbered).

    The front end reads its state only through names written in the statement at hand, so a
    name the middle sources changed (a constant, absolute symbol or macro) that does not occur
    in the suffix's text cannot change how the suffix is processed."""
    if pre.blocks or pre.local_labels.pending:
        return False
    changed = (
        _changed(prefix.constants, pre.constants, operator.eq)
        | _changed(prefix.macros, pre.macros, _same_macro)
        | (prefix.absolute ^ pre.absolute)
        | (pre.equ_defs.keys() - prefix.equ_defs.keys())
        | (prefix.unsettled ^ pre.unsettled)
        | (prefix.keyword_symbols ^ pre.keyword_symbols)
    )
    # Labels are only added (setdefault): the suffix keeps its own unless the middle defined one too.
    if any(label.name in pre.labels or label.name in pre.equ_defs for label in suffix.new_labels):
        return False
    if any(name in pre.labels for name, _loc in suffix.equ_defs):
        return False  # a name both a label and an .equ: the reference path reports it
    # As a whole name: every lookup key is a _REFERENCE match (greedy over [\w.$@], never
    # starting right after [\w.]), a mnemonic, or an operand or name delimited by whitespace,
    # a comma or a colon.
    return not any(_occurs(name, suffix) for name in changed)


#: A maximal run of the characters a name may hold (as the whole-name match reads them).
_NAME_RUN = re.compile(r"[\w.$@]+")


@functools.lru_cache(maxsize=16)
def _whole_names(text: str) -> frozenset[str]:
    """Every string the whole-name match `(?<![\\w.])NAME(?![\\w.$@])` finds in `text`, for
    NAME made of [\\w.$@]: such a match lies in one maximal run of those characters, ends
    where the run ends, and starts where it starts or right after a `$` or `@` in it. Kept for
    the next record of the same text: the runtime and its includes are the same texts under
    every set of defines (~30 ms of a ~0.2 s record)."""
    names: set[str] = set()
    for run in _NAME_RUN.findall(text):
        names.add(run)
        names.update(run[i + 1:] for i, ch in enumerate(run[:-1]) if ch in "$@")
    return frozenset(names)


def _occurs(name: str, suffix: _Suffix) -> bool:
    """Whether `name` occurs as a whole name in the suffix's texts (one set lookup; a name of
    other characters is searched for)."""
    if _NAME_RUN.fullmatch(name):
        return name in suffix.names
    return any(re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.$@])", text) for text in suffix.texts)


#: A text split at its counter-numbered names: the literal pieces and, between them, each
#: name's (kind is "line", its number) -- renumbering is then a join (_fill).
_Template = tuple[tuple[str, ...], tuple[tuple[bool, int], ...]]


def _renumber(text: str, line_shift: int, expr_shift: int) -> str:
    """`text` with each hidden __tb_line_N / __tb_expr_N name's N moved by its counter's shift
    (a replayed check's position: the items and positions go through their _Plan)."""
    return _fill(_split(text), line_shift, expr_shift)


#: Joins the texts a replay renumbers into one template: no item text holds it (the lexer
#: refuses a NUL anywhere in a source, lexer.py, and generated text has none).
_JOIN = "\x00"


@dataclass(frozen=True)
class _Plan:
    """A suffix's renumbering done as two joins: the texts of its items that hold hidden
    names (at `indices`), and its position names, each joined by _JOIN into one template."""

    indices: tuple[int, ...]
    items: _Template
    positions: _Template


def _split(text: str) -> _Template:
    """The template of one text."""
    pieces: list[str] = []
    names: list[tuple[bool, int]] = []
    at = 0
    for m in _COUNTED_NAME.finditer(text):
        pieces.append(text[at : m.start()])
        names.append((m[1] == "line", int(m[2])))
        at = m.end()
    pieces.append(text[at:])
    return tuple(pieces), tuple(names)


def _plan(items: Sequence[_Item], positions: Sequence[tuple[str, SourceLocation, bool]]) -> _Plan:
    indices = tuple(i for i, item in enumerate(items) if _RESERVED_PREFIX in item.text)
    return _Plan(indices, _split(_JOIN.join(items[i].text for i in indices)),
                 _split(_JOIN.join(name for name, _loc, _cond in positions)))


def _fill(template: _Template, line_shift: int, expr_shift: int) -> str:
    """The template's text with each hidden name's number moved by its counter's shift."""
    pieces, names = template
    line, expr = f"{_RESERVED_PREFIX}line_", f"{_RESERVED_PREFIX}expr_"
    parts = [""] * (2 * len(names) + 1)
    parts[0::2] = pieces
    parts[1::2] = [f"{line}{number + line_shift}" if is_line else f"{expr}{number + expr_shift}"
                   for is_line, number in names]
    return "".join(parts)


def _with_text(item: _Item, text: str) -> _Item:
    """dataclasses.replace(item, text=text) without the generic path (a replay renumbers ~2,000
    items): the same frozen instance type, every other field shared."""
    new = object.__new__(_Item)
    new.__dict__.update(item.__dict__)
    new.__dict__["text"] = text
    return new


def _replay(pre: _Preprocessor, suffix: _Suffix) -> None:
    line_shift = len(pre.positions) - suffix.positions
    expr_shift = pre.hoisted - suffix.hoisted
    if line_shift or expr_shift:
        plan = suffix.plan
        items = list(suffix.items)
        texts = _fill(plan.items, line_shift, expr_shift).split(_JOIN) if plan.indices else []
        for i, text in zip(plan.indices, texts, strict=True):
            items[i] = _with_text(items[i], text)
        pre.items.extend(items)
        names = _fill(plan.positions, line_shift, expr_shift).split(_JOIN) if suffix.new_positions else []
        pre.positions.extend((name, loc, cond) for name, (_old, loc, cond) in zip(names, suffix.new_positions,
                                                                                  strict=True))
    else:
        pre.items.extend(suffix.items)
        pre.positions.extend(suffix.new_positions)
    pre.hoisted += suffix.hoisted_after - suffix.hoisted
    for label in suffix.new_labels:
        pre.labels[label.name] = label
    pre.included.extend(suffix.included)
    pre.image_features |= suffix.image_features
    pre.image_legacy = pre.image_legacy or suffix.image_legacy
    if line_shift:
        pre.branch_checks.extend(dataclasses.replace(c, position=_renumber(c.position, line_shift, 0))
                                 for c in suffix.branch_checks)
        pre.span_checks.extend(dataclasses.replace(c, position=_renumber(c.position, line_shift, 0))
                               for c in suffix.span_checks)
    else:
        pre.branch_checks.extend(suffix.branch_checks)
        pre.span_checks.extend(suffix.span_checks)
    pre.deferred.extend(suffix.deferred)
    pre.equ_defs.update(suffix.equ_defs)
    pre.unsettled |= suffix.unsettled
    pre.keyword_symbols |= suffix.keyword_symbols
    for name, value in suffix.constants:
        if value is None:
            pre.constants.pop(name, None)
        else:
            pre.constants[name] = value


def _front_end(
    sources: Sequence[tuple[str, str]], defines: Mapping[str, int | str], include_dirs: Sequence[Path]
) -> tuple[_Preprocessor, bool]:
    """The front end's result for the unit, and whether it reused cached work (see above)."""
    if len(sources) < 2:
        return _front_end_uncached(sources, defines, include_dirs), False
    dirs = tuple(str(d) for d in include_dirs)
    key = (dirs, tuple((k, type(v).__name__, str(v)) for k, v in defines.items()), tuple(sources[0]))
    prefix = _prefixes.get(key)
    if prefix is None or not _includes_valid(prefix.included):
        prefix = _start(defines, include_dirs)
        _add(prefix, *sources[0])
        if prefix.blocks or prefix.include_stack:
            return _front_end_uncached(sources, defines, include_dirs), False
        _remember(_prefixes, key, prefix)
    pre = prefix.fork()
    middle, last = sources[1:-1], sources[-1]
    if not middle:
        for file, text in sources[1:]:
            _add(pre, file, text)
        pre.finish()
        return pre, True
    for file, text in middle:
        _add(pre, file, text)
    suffix_key = (key, tuple(last))
    donor_key = (dirs, tuple(sources[0]), tuple(last))
    recorded = _suffixes.get(suffix_key)
    if suffix_key not in _suffixes or (recorded is not None and not _includes_valid(recorded.included)):
        # Not recorded under these defines: a donor's record, if it replays here, else record one.
        for donor_prefix, donor in reversed(_donors.get(donor_key, ())):
            if _includes_valid(donor.included) and _replayable(donor_prefix, pre, donor):
                _replay(pre, donor)
                pre.finish()
                return pre, True
        recorded = _record_suffix(prefix, *last)
        _remember(_suffixes, suffix_key, recorded)
        if recorded is not None:
            _remember(_donors, donor_key, [*_donors.get(donor_key, ()), (prefix, recorded)][-_MEMO_SIZE:])
    if recorded is not None and _replayable(prefix, pre, recorded):
        _replay(pre, recorded)
    else:
        _add(pre, *last)
    pre.finish()
    return pre, True


def _assemble(
    sources: Sequence[tuple[str, str]],
    base: int,
    defines: Mapping[str, int | str],
    include_dirs: Sequence[Path],
) -> Program:
    return _assemble_unit(sources, base, defines, include_dirs)[0]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while one assembly runs, and on again after (if it was
    on). The front end's objects (items, labels, macro expansions: ~10^5 for the runtime) live
    until the assembly ends, so they survive the young collections and set off full ones over
    the whole process's heap: ~15 % of a cold assembly in a process holding 40 programs, as a
    test worker does. Nothing is lost: a cycle made meanwhile is collected after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _assemble_unit(
    sources: Sequence[tuple[str, str]],
    base: int,
    defines: Mapping[str, int | str],
    include_dirs: Sequence[Path],
    *,
    reuse: bool = True,
) -> tuple[Program, tuple[IncludeRecord, ...]]:
    """The program, and every include it read (see _Preprocessor.included); the collector
    paused meanwhile (_collector_paused)."""
    with _collector_paused():
        return _assemble_unit_now(sources, base, defines, include_dirs, reuse=reuse)


def _assemble_unit_now(
    sources: Sequence[tuple[str, str]],
    base: int,
    defines: Mapping[str, int | str],
    include_dirs: Sequence[Path],
    *,
    reuse: bool,
) -> tuple[Program, tuple[IncludeRecord, ...]]:
    if not 0 <= base < 2**64:
        raise UsageError(f"load address 0x{base:x} is not a 64-bit address")
    if reuse:
        pre, reused = _front_end(sources, defines, include_dirs)
    else:
        pre, reused = _front_end_uncached(sources, defines, include_dirs), False

    # The symbol-table trick. Keystone returns only bytes, so for every label found in the
    # text (plus the hidden per-statement position labels) a `.quad label` is appended after
    # the program. The last 8 * len(table) bytes of the encoding are then the absolute
    # addresses of those labels; they are read back and cut off before the code is returned.
    # The table comes after all code, so it cannot change the encoding of anything before it.
    # Labels inside blocks get `.ifdef` entries (all-ones when not defined), so the table is
    # 8 bytes per entry whatever is assembled. Canaries: test_quad_of_a_label_is_its_absolute_address,
    # test_ifdef_is_false_for_a_label_never_assembled.
    table_names = [label.name for label in pre.labels.values()]
    table = [_table_text(label.name, label.conditional) for label in pre.labels.values()]
    table_names += [name for name, _loc, _cond in pre.positions]
    table += [_table_text(name, cond) for name, _loc, cond in pre.positions]

    included = tuple(pre.included)
    if not pre.items and not table:
        return Program(code=b"", base=base, symbols=MappingProxyType({}), asserts=MappingProxyType({})), included
    try:
        encoding = _ks_asm(_render(pre.items, table), base)
    except _KeystoneError as failure:
        if reused:  # locate the error exactly as the reference path does
            return _assemble_unit(sources, base, defines, include_dirs, reuse=False)
        raise _locate_error([*pre.items, *_table_items(pre)], pre, base, failure) from None

    size = len(encoding) - 8 * len(table)
    if size < 0:
        raise TestbedError(f"internal error: {len(encoding)} bytes cannot hold {len(table)} table entries")
    values = struct.unpack_from(f"<{len(table)}Q", encoding, size)
    addresses = {name: value for name, value in zip(table_names, values, strict=True) if value != 2**64 - 1}

    verify_branches(pre.branch_checks, encoding, base, addresses, pre.constants)
    verify_spans(pre.span_checks, [name for name, _loc, _cond in pre.positions], addresses, base + size)
    # Hidden labels (numeric local labels' names) are not the program's symbols.
    symbols = {
        label: addresses[label]
        for label in pre.labels
        if label in addresses and not label.startswith(_RESERVED_PREFIX)
    }
    end = base + size
    placed = sorted(
        (addresses[name], i, loc) for i, (name, loc, _cond) in enumerate(pre.positions) if name in addresses
    )
    lines = []
    for j, (address, _i, loc) in enumerate(placed):
        following = placed[j + 1][0] if j + 1 < len(placed) else end
        if following > address:  # emitted at least one byte
            lines.append((address, loc))
    return Program(
        code=encoding[:size],
        base=base,
        symbols=MappingProxyType(symbols),
        asserts=MappingProxyType(dict(pre.asserts)),
        lines=tuple(lines),
        features=pre.image_feature_list(),
    ), included


