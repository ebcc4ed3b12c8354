"""ucall: the guest -> host message channel, as KVM selftests' lib/ucall_common.c.

The guest writes a `struct ucall` into the shared ucall page and signals it with an OUT to
UCALL_PORT carrying the page's GPA. The host reads the message through its own view of guest
memory, so the channel keeps working when guest registers are hidden (SEV-ES, SNP, TDX) —
which is why the message is in memory and not in registers.

    struct ucall { u64 cmd; u64 nargs; u64 args[6]; }
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from testbed.errors import GuestMemoryError
from testbed.hw.memory import HostMemory

UCALL_SIZE = 8 * 8
UCALL_MAX_ARGS = 6
_LAYOUT = struct.Struct("<8Q")


class UcallCmd(IntEnum):
    """ucall commands (guests/lib/prelude.s uses the same numbers)."""

    UCALL_SYNC = 1
    UCALL_DONE = 2
    UCALL_ABORT = 3
    UCALL_UNHANDLED = 4


@dataclass(frozen=True)
class Ucall:
    """One decoded ucall message."""

    cmd: int
    args: tuple[int, ...]
    gpa: int

    @property
    def name(self) -> str:
        """"sync", "done", "abort", "unhandled" or "cmd_<n>" for a value the host does not know."""
        try:
            return UcallCmd(self.cmd).name.removeprefix("UCALL_").lower()
        except ValueError:
            return f"cmd_{self.cmd}"


class UcallError(ValueError):
    """A ucall the host cannot read: the guest gets the blame, the host does not crash."""


def read_ucall(memory: HostMemory, gpa: int) -> Ucall:
    """Decode the ucall at `gpa` through the host's view of memory.

    Raises UcallError for a message the host cannot take: one that does not lie wholly inside
    guest memory, claims more than UCALL_MAX_ARGS arguments, or sits where the host may not
    read. An unknown command decodes (`Ucall.name` is "cmd_<n>"); the VMM rejects it. Either
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
    return Ucall(cmd=cmd, args=tuple(args[:nargs]), gpa=gpa)
