"""Assembly: the public entry points, and the symbol-table trick that reads labels back."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from testbed.asm.engine import _KeystoneError, _ks_asm
from testbed.asm.frontend import _check_define, _define_items, _Preprocessor
from testbed.asm.guest_api import _constant
from testbed.asm.lexer import _decode_source
from testbed.asm.locate_error import _locate_error
from testbed.asm.program import Program, SourceLocation
from testbed.asm.syntax import _RESERVED_PREFIX, _Item, _render
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


def _table_item(name: str, loc: SourceLocation, conditional: bool) -> _Item:
    """One 8-byte entry of the hidden symbol table: the address of `name`, or all-ones."""
    if not conditional:
        return _Item(f".quad {name}", loc)
    # A label inside a block may never be defined (an .if branch not taken, a macro never
    # expanded): .ifdef keeps the entry 8 bytes long either way.
    return _Item(f".ifdef {name}\n.quad {name}\n.else\n.quad -1\n.endif", loc)


def _assemble(
    sources: Sequence[tuple[str, str]],
    base: int,
    defines: Mapping[str, int | str],
    include_dirs: Sequence[Path],
) -> Program:
    if not 0 <= base < 2**64:
        raise UsageError(f"load address 0x{base:x} is not a 64-bit address")
    pre = _Preprocessor(include_dirs)
    pre.items.extend(_define_items(defines))
    for item in pre.items:
        if item.define is not None:
            pre.absolute.add(item.define[0])
            if (value := _constant(item.define[1], pre.constants)) is not None:
                pre.constants[item.define[0]] = value
    for file, text in sources:
        pre.add_source(file, text, None if file.startswith("<") else Path(file).resolve())
    pre.finish()

    # The symbol-table trick. Keystone returns only bytes, so for every label found in the
    # text (plus the hidden per-statement position labels) a `.quad label` is appended after
    # the program. The last 8 * len(table) bytes of the encoding are then the absolute
    # addresses of those labels; they are read back and cut off before the code is returned.
    # The table comes after all code, so it cannot change the encoding of anything before it.
    # Labels inside blocks get `.ifdef` entries (all-ones when not defined), so the table is
    # 8 bytes per entry whatever is assembled. Canaries: test_quad_of_a_label_is_its_absolute_address,
    # test_ifdef_is_false_for_a_label_never_assembled.
    table_names = [label.name for label in pre.labels.values()]
    table = [_table_item(label.name, label.loc, label.conditional) for label in pre.labels.values()]
    table_names += [name for name, _loc, _cond in pre.positions]
    table += [_table_item(name, loc, cond) for name, loc, cond in pre.positions]
    items = [*pre.items, *table]

    if not items:
        return Program(code=b"", base=base, symbols=MappingProxyType({}), asserts=MappingProxyType({}))
    try:
        encoding = _ks_asm(_render(items), base)
    except _KeystoneError as failure:
        raise _locate_error(items, pre, base, failure) from None

    size = len(encoding) - 8 * len(table)
    if size < 0:
        raise TestbedError(f"internal error: {len(encoding)} bytes cannot hold {len(table)} table entries")
    values = struct.unpack_from(f"<{len(table)}Q", encoding, size)
    addresses = {name: value for name, value in zip(table_names, values, strict=True) if value != 2**64 - 1}

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
    )


