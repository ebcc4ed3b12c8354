"""Program and the source locations it maps code to (file:line, symbol+offset, assert sites)."""

from __future__ import annotations

import bisect
import difflib
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

from testbed.errors import TestbedError

# --------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceLocation:
    """A line in a guest source file, as shown to users."""

    file: str
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class AssertSite:
    """A GUEST_ASSERT*/GUEST_FAIL call site: where it is written, which macro, and its text.

    `message` is the assert's expression as written (`rax == -KVM_ENOSYS`, `rbx`) or
    GUEST_FAIL's message. It lives only here, on the host: the guest sends the site's id, so
    the text reaches the host even when guest memory is encrypted."""

    file: str
    line: int  # 1-based
    kind: str = ""  # the macro: GUEST_ASSERT_EQ, GUEST_FAIL, ...
    message: str = ""

    @property
    def location(self) -> SourceLocation:
        """Where the site is written."""
        return SourceLocation(self.file, self.line)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class CodeLocation:
    """Where an address in a program comes from: the statement's file:line, and the nearest
    label at or below the address with the offset from it (symbol None if there is none)."""

    file: str
    line: int  # 1-based
    symbol: str | None
    offset: int

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where} ({self.symbol}+0x{self.offset:x})" if self.symbol is not None else where


class LineTable(Sequence[tuple[int, SourceLocation]]):
    """Program.lines: (address, location) pairs by ascending address, held as three arrays of
    numbers and the file names, not as one tuple and one location per statement. A program
    holds thousands (the runtime's), a process keeps dozens of programs (the assembly
    cache's memory), and the collector's full passes visited every one of those objects: a
    table is one object to it. The pairs are built when read; equal tables hold the same
    pairs (and only a table equals a table)."""

    __slots__ = ("_addresses", "_file_ids", "_files", "_line_numbers")

    def __init__(self, addresses: array[int], files: tuple[str, ...], file_ids: array[int],
                 line_numbers: array[int]) -> None:
        # One spelling of each column (equal tables hash alike): u64 addresses and lines, u32
        # file ids; a value out of those ranges is an OverflowError.
        if addresses.typecode != "Q":
            addresses = array("Q", addresses)
        if file_ids.typecode != "I":
            file_ids = array("I", file_ids)
        if line_numbers.typecode != "Q":
            line_numbers = array("Q", line_numbers)
        if not len(addresses) == len(file_ids) == len(line_numbers):
            raise ValueError("a line table's columns differ in length")
        if file_ids and max(file_ids) >= len(files):
            raise ValueError("a line table names a file it does not hold")
        self._addresses = addresses
        self._files = files
        self._file_ids = file_ids
        self._line_numbers = line_numbers

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, SourceLocation]]) -> LineTable:
        """The table of (address, location) pairs."""
        if isinstance(pairs, LineTable):
            return pairs
        ids: dict[str, int] = {}
        addresses, file_ids, line_numbers = array("Q"), array("I"), array("Q")
        for address, location in pairs:
            addresses.append(address)
            file_ids.append(ids.setdefault(location.file, len(ids)))
            line_numbers.append(location.line)
        return cls(addresses, tuple(ids), file_ids, line_numbers)

    def __len__(self) -> int:
        return len(self._addresses)

    @overload
    def __getitem__(self, index: int) -> tuple[int, SourceLocation]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[int, SourceLocation], ...]: ...

    def __getitem__(self, index: int | slice) -> tuple[int, SourceLocation] | tuple[tuple[int, SourceLocation], ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        return (self._addresses[index],
                SourceLocation(self._files[self._file_ids[index]], self._line_numbers[index]))

    def __iter__(self) -> Iterator[tuple[int, SourceLocation]]:
        files = self._files
        for address, file_id, line in zip(self._addresses, self._file_ids, self._line_numbers, strict=True):
            yield address, SourceLocation(files[file_id], line)

    def columns(self) -> tuple[tuple[str, ...], array[int], array[int], array[int]]:
        """(files, addresses, file ids, line numbers) in one spelling for equal tables: the
        files in the order the lines first name them, each name once (what a cache entry and a
        program's digest write)."""
        column = self._file_column()
        names = tuple(dict.fromkeys(column))
        index = {name: i for i, name in enumerate(names)}
        # Copies: the table's own columns stay as they are whatever the caller does with these.
        return (names, array("Q", self._addresses), array("I", [index[name] for name in column]),
                array("Q", self._line_numbers))

    def _file_column(self) -> tuple[str, ...]:
        files = self._files
        return tuple(files[i] for i in self._file_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LineTable):
            return NotImplemented
        return (self._addresses == other._addresses and self._line_numbers == other._line_numbers
                and self._file_column() == other._file_column())

    def __hash__(self) -> int:
        return hash((self._addresses.tobytes(), self._line_numbers.tobytes(), self._file_column()))

    def __repr__(self) -> str:
        return f"LineTable({list(self)!r})"

    def files(self) -> frozenset[str]:
        """The file names the table holds."""
        return frozenset(self._files[i] for i in set(self._file_ids))

    def at_or_below(self, address: int) -> SourceLocation | None:
        """The location of the last statement at or below `address` (None if there is none)."""
        i = bisect.bisect_right(self._addresses, address) - 1
        return self[i][1] if i >= 0 else None


@dataclass(frozen=True)
class Program:
    """Encoded guest code, loaded at `base`, with the source information the host needs."""

    code: bytes
    base: int
    # Every label defined (and actually emitted) in the sources -> absolute address.
    symbols: Mapping[str, int]
    # GUEST_ASSERT*/GUEST_FAIL call-site id -> where that assert is written and its text.
    asserts: Mapping[int, AssertSite]
    # (address, location) of each top-level statement that emits bytes, by ascending address.
    # Statements inside .macro/.rept/.irp bodies are attributed to the invoking line. Held as
    # a LineTable whatever sequence of pairs is given.
    lines: Sequence[tuple[int, SourceLocation]] = ()
    #: The image's note for the control plane: the features it declares it uses, sorted
    #: ("MAP_GPA_RANGE": it tells the host of every conversion with KVM_HC_MAP_GPA_RANGE or
    #: its carrier, GHCB Page State Change / TDX MapGPA). The runtime declares MAP_GPA_RANGE
    #: (GUEST_IMAGE_FEATURE in guests/lib/runtime.s); GUEST_IMAGE_LEGACY withdraws it.
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.lines, LineTable):
            object.__setattr__(self, "lines", LineTable.of(self.lines))

    @property
    def legacy(self) -> bool:
        """Whether the image is legacy: it does not declare KVM_HC_MAP_GPA_RANGE."""
        return "MAP_GPA_RANGE" not in self.features

    @property
    def end(self) -> int:
        """The address just past the code."""
        return self.base + len(self.code)

    def symbol(self, name: str) -> int:
        """The address of label `name`; TestbedError naming it if the sources do not define it."""
        try:
            return self.symbols[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.symbols), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TestbedError(f"symbol {name!r} is not defined in the guest program{hint}") from None

    def location(self, address: int) -> SourceLocation | None:
        """The statement that emitted the byte at `address`, if `lines` covers it."""
        if not self.base <= address < self.end:
            return None
        return LineTable.of(self.lines).at_or_below(address)

    def locate(self, address: int) -> CodeLocation | None:
        """Map an address in the code (e.g. a faulting RIP) back to its source line and symbol;
        None if no statement emitted a byte there. Inside a macro expansion the line is the
        one that invoked the macro."""
        where = self.location(address)
        if where is None:
            return None
        symbol, start = None, self.base
        # Of several labels at one address the last defined is nearest the code (`fault_site`
        # after `guest_main`); sorted() is stable, so definition order breaks ties.
        for name, value in sorted(self.symbols.items(), key=lambda item: item[1]):
            if value > address:
                break
            if self.base <= value:
                symbol, start = name, value
        return CodeLocation(where.file, where.line, symbol, address - start if symbol is not None else 0)

