"""Error location: which statement made Keystone fail, found by probing and bisection."""

from __future__ import annotations

from collections.abc import Sequence

from testbed.asm.engine import (
    _CRASH,
    _HANG,
    _KS_MNEMONIC,
    _KS_SYMBOL_MISSING,
    _KS_SYMBOL_REDEFINED,
    _KeystoneError,
    _ks_asm,
)
from testbed.asm.frontend import _Preprocessor
from testbed.asm.syntax import _MISSING_MNEMONICS, _Item, _render
from testbed.errors import AsmError, TestbedError, UsageError

# --------------------------------------------------------------------------------------------
# Error location
# --------------------------------------------------------------------------------------------


def _stub_lines(names: Sequence[str]) -> list[str]:
    """Define each name not defined so far as a label: forward references from a prefix of
    the unit then resolve, as they would in the whole unit."""
    return [f".ifndef {name}\n{name}:\n.endif" for name in names]


def _undefined_names(items: Sequence[_Item], base: int, candidates: Sequence[str]) -> set[str] | None:
    """The candidates the whole unit does not define, or None if that does not make it assemble.

    `.ifndef` is true for a name that is referenced but undefined (and for one never mentioned);
    each probe emits one byte saying so and defines the name, so the unit assembles and the
    bytes can be read back. Canary: test_ifndef_is_true_for_a_referenced_undefined_name.
    """
    probes = [f".ifndef {name}\n.byte 1\n{name}:\n.else\n.byte 0\n.endif" for name in candidates]
    try:
        encoding = _ks_asm(_render(items, probes), base)
    except _KeystoneError:
        return None
    flags = encoding[len(encoding) - len(candidates) :]
    return {name for name, flag in zip(candidates, flags, strict=True) if flag == 1}


def _missing_symbols(items: Sequence[_Item], base: int, undefined: set[str]) -> list[str]:
    """The names in `undefined` that the unit really uses: without a definition it fails.

    Group testing: the unit with all undefined names except those in a group defined still
    fails exactly when the group holds a name in use. Usually one name is missing, so this
    takes about log2(len(undefined)) assemblies.
    """

    def uses_one_of(group: list[str]) -> bool:
        others = [name for name in sorted(undefined) if name not in group]
        try:
            _ks_asm(_render(items, _stub_lines(others)), base)
        except _KeystoneError as e:
            return e.code == _KS_SYMBOL_MISSING
        return False

    def search(group: list[str], known_used: bool) -> list[str]:
        if not (known_used or uses_one_of(group)):
            return []
        if len(group) == 1:
            return group
        half = len(group) // 2
        first = search(group[:half], False)
        return first + search(group[half:], not first)

    return search(sorted(undefined), False)


def _locate_error(items: Sequence[_Item], pre: _Preprocessor, base: int, failure: _KeystoneError) -> TestbedError:
    """Find the statement that makes Keystone fail and describe the error there.

    Why not KsError.get_asm_count(): it is 0 for most parse errors (bad mnemonic, bad operand),
    the number of statements before the error for a few (bad expression token), and the count
    of all statements for errors found at the end (missing symbol, invalid fixup); and its
    statements include blank lines, empty `;` statements, comment lines (twice) and every
    statement of every macro and .rept expansion. Canary: test_error_count_*.

    A missing symbol is found at the end of assembly, so it is located by name: the names
    really missing are found by probing, and the first statement using one is reported.
    Everything else is located by bisection: the unit is cut after item k (closing the blocks
    left open) and the first k whose prefix fails is the failing item. Keystone stops at the
    first parse error and reports missing symbols only after parsing everything, so a prefix
    that fails only because it cuts off the definition of a forward reference (`jmp later`,
    or a label that a macro builds from its arguments, which no text scan can find) is not
    counted as failing; stubs defining the names a text scan can find keep such prefixes
    from failing in the first place.
    """
    names = sorted({name for item in items for name in item.refs} | set(pre.labels))
    missing: list[str] = []
    if failure.code == _KS_SYMBOL_MISSING:
        undefined = _undefined_names(items, base, names)
        if undefined is not None:
            missing = _missing_symbols(items, base, undefined)
            # An `.error` is reported where it is assembled: for one in a macro body that is
            # the statement expanding the macro, which only bisection finds.
            user = next((i for i, item in enumerate(items) if item.refs & set(missing)), None)
            if user is not None and not any(name in pre.errors for name in missing):
                return _error_at(items, user, failure, pre, missing)
        # Not found by name (e.g. a name built from macro arguments): bisect; stubs must not
        # define the missing name, but names the probe found defined are safe to stub.
        names = [] if undefined is None else [name for name in names if name not in undefined]

    def counts(error: _KeystoneError | None) -> bool:
        if error is None:
            return False
        return error.code != _KS_SYMBOL_MISSING or failure.code == _KS_SYMBOL_MISSING

    results: dict[tuple[int, int], _KeystoneError | None] = {}

    def prefix_error(k: int, attempt: int) -> _KeystoneError | None:
        if (k, attempt) not in results:
            closers = items[k - 1].closers if k else ()
            text = _render(items[:k], [*closers, *_stub_lines(attempts[attempt])])
            try:
                _ks_asm(text, base, probe=True)
                results[k, attempt] = None
            except _KeystoneError as e:
                results[k, attempt] = e
        return results[k, attempt]

    # Fall back to fewer stubs if the stubs themselves break assembly. (A unit that hangs or
    # crashes is not run again whole: that would only cost another timeout.)
    attempts = [names, sorted(set(names) & set(pre.labels)), []]
    attempt = next(
        (
            i
            for i in range(len(attempts))
            if not counts(prefix_error(0, i))
            and (failure.code in (_HANG, _CRASH) or counts(prefix_error(len(items), i)))
        ),
        len(attempts) - 1,
    )
    low, high = 1, len(items)  # invariant: prefix `high` fails, prefix `low - 1` does not
    while low < high:
        mid = (low + high) // 2
        if counts(prefix_error(mid, attempt)):
            high = mid
        else:
            low = mid + 1
    error = prefix_error(high, attempt)
    if error is not None and error.code == _KS_SYMBOL_MISSING:
        raised = [name for name in missing if name in pre.errors]
        directive_error = _error_directive_at(items, high, base, pre, raised, attempts[attempt]) if raised else None
        if directive_error is not None:
            return directive_error
    return _error_at(items, high - 1, error if counts(error) and error else failure, pre, missing)


def _error_directive_at(
    items: Sequence[_Item], k: int, base: int, pre: _Preprocessor, raised: Sequence[str], stubs: Sequence[str]
) -> TestbedError | None:
    """The error of the `.error` that items[k - 1] assembles (of those in `raised`, the first
    written: the prefix of k items fails with every other one stubbed); None if the prefix
    fails for another reason too."""

    def fails_with(defined: Sequence[str]) -> bool:
        text = _render(items[:k], [*items[k - 1].closers, *_stub_lines([*stubs, *defined])])
        try:
            _ks_asm(text, base, probe=True)
        except _KeystoneError:
            return True
        return False

    order = sorted(raised, key=lambda name: int(name.rsplit("_", 1)[1]))
    if fails_with(order):
        return None
    chosen = next((name for name in order if fails_with([other for other in order if other != name])), order[0])
    item = items[k - 1]
    if item.define is not None:
        name, value = item.define
        return UsageError(f"define {name}={value}: {pre.errors[chosen]}")
    return AsmError(item.loc.file, item.loc.line, pre.errors[chosen])


def _error_at(
    items: Sequence[_Item], index: int, error: _KeystoneError, pre: _Preprocessor, missing: Sequence[str]
) -> TestbedError:
    item = items[index]
    message = _describe(error, item, index, pre, set(missing))
    if item.define is not None:
        name, value = item.define
        return UsageError(f"define {name}={value}: {message}")
    return AsmError(item.loc.file, item.loc.line, message)


def _describe(error: _KeystoneError, item: _Item, index: int, pre: _Preprocessor, missing: set[str]) -> str:
    """Keystone's error made specific to the statement (items[index]) it happened at."""
    macro = pre.macros.get(item.mnemonic)
    if macro is not None and macro.index > index:
        return (
            f"invalid mnemonic: {item.mnemonic} (a macro defined later, at {macro.loc}; "
            "Keystone needs a macro defined before its first use)"
        )
    refs = set(item.refs) | (macro.body_refs if macro else set())
    message = error.message
    if error.code == _HANG:
        message = "Keystone 0.9.2 hangs on this statement (it loops forever on some malformed operands)"
    elif error.code == _CRASH:
        message = f"{error.message} on this statement"
    elif error.code == _KS_SYMBOL_MISSING:
        names = sorted(refs & missing) or sorted(missing)
        message = f"symbol missing: {', '.join(names)}" if names else "symbol missing"
        if "guest_main" in names:
            message += " (the guest defines no guest_main, which the runtime calls)"
    elif error.code == _KS_SYMBOL_REDEFINED:
        names = sorted(set(item.labels) | (macro.body_labels if macro else set()))
        message = f"symbol redefined: {', '.join(names)}" if names else "symbol redefined"
        first = [f"{name} at {pre.labels[name].loc}" for name in names
                 if name in pre.labels and pre.labels[name].loc != item.loc]
        if first:
            message += f" (first defined: {', '.join(first)})"
    elif error.code == _KS_MNEMONIC and not macro and item.mnemonic:
        message = f"invalid mnemonic: {item.mnemonic}"
        if (instead := _MISSING_MNEMONICS.get(item.mnemonic.lower())) is not None:
            message += f" (Keystone 0.9.2 lacks it; write `{instead}`)"
    if macro:
        message += f" (in expansion of macro {macro.name} defined at {macro.loc})"
    return message
