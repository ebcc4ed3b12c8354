"""Program and the source locations it maps code to (file:line, symbol+offset, assert sites)."""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    # Statements inside .macro/.rept/.irp bodies are attributed to the invoking line.
    lines: Sequence[tuple[int, SourceLocation]] = ()
    #: The image's note for the control plane: the features it declares it uses, sorted
    #: ("MAP_GPA_RANGE": it tells the host of every conversion with KVM_HC_MAP_GPA_RANGE or
    #: its carrier, GHCB Page State Change / TDX MapGPA). The runtime declares MAP_GPA_RANGE
    #: (GUEST_IMAGE_FEATURE in guests/lib/runtime.s); GUEST_IMAGE_LEGACY withdraws it.
    features: tuple[str, ...] = ()

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
        i = bisect.bisect_right(self.lines, address, key=lambda entry: entry[0]) - 1
        return self.lines[i][1] if i >= 0 else None

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

