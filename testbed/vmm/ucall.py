"""ucall: the guest -> host message channel, as KVM selftests' lib/ucall_common.c.

The guest writes a `struct ucall` into the shared ucall page and signals it with an OUT to
UCALL_PORT carrying the page's GPA. The host reads the message through its own view of guest
memory, so the channel keeps working when guest registers are hidden (SEV-ES, SNP, TDX) —
which is why the message is in memory and not in registers.

    struct ucall { u64 cmd; u64 nargs; u64 args[6]; }

Commands are numbered as the selftests number them (tools/testing/selftests/kvm/include/
ucall_common.h): UCALL_NONE 0, UCALL_SYNC 1, UCALL_ABORT 2, UCALL_PRINTF 3, UCALL_DONE 4,
UCALL_UNHANDLED 5. guests/lib/prelude.s defines the same numbers and layout;
tests/test_constants.py checks that both sides agree. UCALL_PRINTF is refused by name (a
bad ucall): the testbed's struct ucall has no string buffer, which would sit in encrypted guest
memory under SEV.

An abort carries no text: strings would sit in guest memory, encrypted under SEV. The guest
sends the call-site id of the failed assert (testbed/asm.py numbers them) with the values, and
the host resolves the id against the program's assert-site table (`resolve_failure`):

    UCALL_ABORT args: [site id, assert address, caller's return address or 0, values...]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from testbed.errors import GuestMemoryError
from testbed.hw.memory import HostMemory

if TYPE_CHECKING:
    from testbed.asm import Program

UCALL_SIZE = 8 * 8
UCALL_MAX_ARGS = 6
# struct ucall's field offsets (prelude.s: UCALL_CMD, UCALL_NARGS, UCALL_ARGS)
UCALL_CMD = 0
UCALL_NARGS = 8
UCALL_ARGS = 16
_LAYOUT = struct.Struct("<8Q")
_U64 = (1 << 64) - 1


class UcallCmd(IntEnum):
    """ucall commands, numbered as KVM selftests' lib/ucall_common.h (prelude.s agrees)."""

    UCALL_NONE = 0
    UCALL_SYNC = 1
    UCALL_ABORT = 2
    UCALL_PRINTF = 3
    UCALL_DONE = 4
    UCALL_UNHANDLED = 5


def cmd_name(cmd: int) -> str:
    """"none", "sync", "abort", "printf", "done", "unhandled", or "cmd_<n>" for a number the host does not know."""
    try:
        return UcallCmd(cmd).name.removeprefix("UCALL_").lower()
    except ValueError:
        return f"cmd_{cmd}"


# The abort's fixed arguments before the values.
ABORT_SITE, ABORT_ADDRESS, ABORT_CALLER = 0, 1, 2
ABORT_VALUES = 3

# The failed relation each two-value assert reports (the negation of what it asserts).
_FAILED_RELATION = {
    "GUEST_ASSERT_EQ": "!=",
    "GUEST_ASSERT_NE": "==",
    "GUEST_ASSERT_LT": ">=",
    "GUEST_ASSERT_LE": ">",
    "GUEST_ASSERT_GT": "<=",
    "GUEST_ASSERT_GE": "<",
    "GUEST_ASSERT_SLT": ">=",
    "GUEST_ASSERT_SLE": ">",
    "GUEST_ASSERT_SGT": "<=",
    "GUEST_ASSERT_SGE": "<",
}


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


@dataclass(frozen=True)
class GuestFailure:
    """A failed GUEST_ASSERT* or a GUEST_FAIL, resolved to where it is written.

    str() reads like the selftests' REPORT_GUEST_ASSERT:
    `guest.s:12: rax == -KVM_ENOSYS failed: 0xffffffffffffffff != 0xfffffffffffffc18`.
    """

    file: str
    line: int
    values: tuple[int, ...]
    #: the assert's expression as written (`rax == -KVM_ENOSYS`), or GUEST_FAIL's message
    message: str
    #: where the helper holding the assert was called from (a GUEST_HELPER_ENTER frame)
    caller: tuple[str, int] | None = None
    #: the macro: GUEST_ASSERT_EQ, GUEST_ASSERT, GUEST_FAIL, ... ("" if the site is unknown)
    kind: str = ""

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}: {self.message}"
        if self.kind != "GUEST_FAIL":
            text += " failed"
            relation = _FAILED_RELATION.get(self.kind)
            signed = self.kind.startswith("GUEST_ASSERT_S")
            shown = [f"{_signed(v):#x}" if signed else f"0x{v:x}" for v in self.values]
            if relation is not None and len(shown) == 2:
                text += f": {shown[0]} {relation} {shown[1]}"
            elif shown:
                text += ": " + ", ".join(shown)
        if self.caller is not None:
            text += f" (in a helper called from {self.caller[0]}:{self.caller[1]})"
        return text


@dataclass(frozen=True)
class Ucall:
    """One decoded ucall message. Compares on (cmd, args) only, so a test can write
    `assert uc == Ucall(cmd="sync", args=[1, 2])`."""

    #: "sync", "done", "abort", "unhandled", "none", or "cmd_<n>" for an unknown number
    cmd: str
    args: list[int]
    gpa: int = field(default=0, compare=False)
    #: for an abort resolved against the program (resolve_failure): what failed, and where
    failure: GuestFailure | None = field(default=None, compare=False)
    #: the command's number as the guest wrote it
    number: int = field(default=-1, compare=False)

    @property
    def name(self) -> str:
        """The command's name (the same as `cmd`)."""
        return self.cmd


class UcallError(ValueError):
    """A ucall the host cannot read: the guest gets the blame, the host does not crash."""


def read_ucall(memory: HostMemory, gpa: int) -> Ucall:
    """Decode the ucall at `gpa` through the host's view of memory.

    Raises UcallError for a message the host cannot take: one that does not lie wholly inside
    guest memory, claims more than UCALL_MAX_ARGS arguments, or sits where the host may not
    read. An unknown command decodes (`Ucall.cmd` is "cmd_<n>"); the VMM rejects it. Either
    way the run ends with outcome `bad_ucall` (vmm.py).
    """
    if gpa < 0 or gpa + UCALL_SIZE > memory.size:
        raise UcallError(f"ucall address 0x{gpa:x} is outside guest memory")
    try:
        raw = memory.read(gpa, UCALL_SIZE)
    except GuestMemoryError as exc:  # e.g. a private page of a guest_memfd VM: not mappable
        raise UcallError(f"ucall at 0x{gpa:x}: {exc}") from None
    cmd, nargs, *args = _LAYOUT.unpack(raw)
    if nargs > UCALL_MAX_ARGS:
        raise UcallError(f"ucall at 0x{gpa:x} claims {nargs} arguments (at most {UCALL_MAX_ARGS}); cmd 0x{cmd:x}")
    return Ucall(cmd=cmd_name(cmd), args=list(args[:nargs]), gpa=gpa, number=cmd)


def _caller(program: Program, assert_address: int, return_address: int) -> tuple[str, int] | None:
    """The file:line of the call that `return_address` returns to, if it is a direct call in
    the program to a routine at or below the assert (the helper holding it); None otherwise.

    The guest's frame pointer is the guest's word: a value that is not such a call (no
    GUEST_HELPER_ENTER frame, rbp used for something else, a hostile guest) names no caller.
    The runtime's call of guest_main names none either: guest_main has no caller to report."""
    call = return_address - 5
    if not (program.base <= call and return_address <= program.end and program.base <= assert_address < program.end):
        return None
    offset = call - program.base
    if program.code[offset] != 0xE8:  # call rel32
        return None
    target = (return_address + int.from_bytes(program.code[offset + 1 : offset + 5], "little", signed=True)) & _U64
    if not program.base <= target <= assert_address or target == program.symbols.get("guest_main"):
        return None
    where = program.location(call)
    return (where.file, where.line) if where is not None else None


def resolve_failure(args: list[int] | tuple[int, ...], program: Program | None) -> GuestFailure:
    """The failure an abort ucall reports: its call-site id resolved against the program's
    assert-site table, its values, and the caller of the helper it failed in, if any.

    A site id the program does not know (a hostile or corrupted guest) resolves to a failure
    naming the id, never an exception."""
    site = args[ABORT_SITE] if len(args) > ABORT_SITE else 0
    values = tuple(args[ABORT_VALUES:])
    where = program.asserts.get(site) if program is not None else None
    if where is None:
        return GuestFailure(file="<guest>", line=0, values=values, message=f"unknown assert site {site}")
    caller = None
    if program is not None and len(args) > ABORT_CALLER and args[ABORT_CALLER]:
        caller = _caller(program, args[ABORT_ADDRESS], args[ABORT_CALLER])
    return GuestFailure(file=where.file, line=where.line, values=values, message=where.message or where.kind,
                        caller=caller, kind=where.kind)
