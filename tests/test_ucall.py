"""The ucall channel's host half (testbed/vmm/ucall.py) over plain bytes: the selftests'
command numbers, decoding, the Ucall value's equality, and resolving an abort against the
program's assert-site table (message, values, the helper's caller), hostile input included.
"""

from __future__ import annotations

import struct

import pytest

from testbed.asm import Program, assemble_source
from testbed.errors import GuestMemoryError
from testbed.vmm.ucall import (
    UCALL_MAX_ARGS,
    GuestFailure,
    Ucall,
    UcallCmd,
    UcallError,
    read_ucall,
    resolve_failure,
)

BASE = 0x100000


class Bytes:
    """Guest memory as the host sees it: plain bytes, and an optional unreadable range."""

    def __init__(self, size: int, unreadable: range = range(0)) -> None:
        self.data = bytearray(size)
        self.unreadable = unreadable

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def capacity(self) -> int:
        return len(self.data)

    def read(self, gpa: int, length: int) -> bytes:
        if gpa in self.unreadable:
            raise GuestMemoryError(f"gpa 0x{gpa:x} is private")
        return bytes(self.data[gpa : gpa + length])

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa : gpa + len(data)] = data


def message(memory: Bytes, gpa: int, cmd: int, args: list[int], nargs: int | None = None) -> None:
    count = len(args) if nargs is None else nargs
    memory.write(gpa, struct.pack("<8Q", cmd, count, *(args + [0] * (6 - len(args)))))


def test_commands_are_numbered_as_the_selftests_number_them() -> None:
    """UCALL_NONE 0, SYNC 1, ABORT 2, PRINTF 3, DONE 4, UNHANDLED 5
    (tools/testing/selftests/kvm/include/ucall_common.h, enum { UCALL_NONE, UCALL_SYNC,
    UCALL_ABORT, UCALL_PRINTF, UCALL_DONE, UCALL_UNHANDLED })."""
    assert [(c.name, c.value) for c in UcallCmd] == [
        ("UCALL_NONE", 0), ("UCALL_SYNC", 1), ("UCALL_ABORT", 2), ("UCALL_PRINTF", 3), ("UCALL_DONE", 4),
        ("UCALL_UNHANDLED", 5)]


@pytest.mark.parametrize(("number", "name"), [(0, "none"), (1, "sync"), (2, "abort"), (3, "printf"), (4, "done"),
                                              (5, "unhandled"), (99, "cmd_99")])
def test_read_ucall_names_the_command(number: int, name: str) -> None:
    """A message decodes to its command's name (cmd_<n> for a number the host does not know)."""
    memory = Bytes(0x2000)
    message(memory, 0x1000, number, [7, 8])
    uc = read_ucall(memory, 0x1000)
    assert (uc.cmd, uc.args, uc.gpa, uc.number) == (name, [7, 8], 0x1000, number)


def test_read_ucall_takes_all_six_arguments() -> None:
    """Up to UCALL_MAX_ARGS (6) arguments arrive, in order; arguments past nargs are not read."""
    memory = Bytes(0x2000)
    message(memory, 0x1000, 1, [1, 2, 3, 4, 5, 2**64 - 1])
    assert read_ucall(memory, 0x1000).args == [1, 2, 3, 4, 5, 2**64 - 1]
    message(memory, 0x1000, 1, [1, 2, 3], nargs=2)
    assert read_ucall(memory, 0x1000).args == [1, 2]


def test_ucall_compares_on_command_and_arguments_only() -> None:
    """Ucall(cmd="sync", args=[1, 2]) equals a decoded sync with those arguments, wherever it was."""
    memory = Bytes(0x3000)
    message(memory, 0x2000, 1, [1, 2])
    assert read_ucall(memory, 0x2000) == Ucall(cmd="sync", args=[1, 2])
    assert read_ucall(memory, 0x2000) != Ucall(cmd="sync", args=[1])


@pytest.mark.parametrize(
    ("gpa", "nargs", "unreadable", "reason"),
    [
        (0x1FC8, 1, range(0), "outside guest memory"),
        (-8, 1, range(0), "outside guest memory"),
        (0x1000, UCALL_MAX_ARGS + 1, range(0), "claims 7 arguments"),
        (0x1000, 1, range(0x1000, 0x2000), "is private"),
    ],
)
def test_malformed_ucall_is_a_ucall_error(gpa: int, nargs: int, unreadable: range, reason: str) -> None:
    """A message outside memory, claiming too many arguments, or where the host cannot read is
    a UcallError (the run's outcome bad_ucall), never a host crash."""
    memory = Bytes(0x2000, unreadable)
    if 0 <= gpa <= 0x1000:
        message(memory, gpa, 1, [0], nargs=nargs)
    with pytest.raises(UcallError, match=reason):
        read_ucall(memory, gpa)


# ------------------------------------------------------------------------- resolve_failure

ASSERTS = """\
.macro GUEST_ASSERT_EQ a, b, site
    nop
.endm
.macro GUEST_FAIL msg, site
    nop
.endm
guest_main:
    GUEST_ASSERT_EQ rax, -KVM_ENOSYS
    call helper
after_call:
    GUEST_FAIL "no \\"way\\""
    ret
helper:
    GUEST_ASSERT_EQ rdi, 1
in_helper:
    ret
"""


def program() -> Program:
    return assemble_source(ASSERTS, filename="g.s", base=BASE, defines={"KVM_ENOSYS": 1000})


def test_abort_resolves_to_the_assert_text_and_values() -> None:
    """An abort's site id resolves to the assert's file:line and expression; str() reads
    `file:line: expression failed: a != b`."""
    failure = resolve_failure([1, 0, 0, 0xFFFF, 2**64 - 1000], program())
    assert failure == GuestFailure("g.s", 8, (0xFFFF, 2**64 - 1000), "rax == -KVM_ENOSYS", None, "GUEST_ASSERT_EQ")
    assert str(failure) == "g.s:8: rax == -KVM_ENOSYS failed: 0xffff != 0xfffffffffffffc18"


def test_guest_fail_resolves_to_its_message() -> None:
    """GUEST_FAIL's message comes from the site table, unescaped, with no values."""
    failure = resolve_failure([2, 0, 0], program())
    assert (failure.message, failure.values, str(failure)) == ('no "way"', (), 'g.s:11: no "way"')


def test_caller_is_the_direct_call_into_the_helper() -> None:
    """A return address just after a `call` to the routine holding the assert names that call's line."""
    prog = program()
    failure = resolve_failure([3, prog.symbol("in_helper"), prog.symbol("after_call"), 2, 1], prog)
    assert failure.caller == ("g.s", 9)
    assert str(failure).endswith("(in a helper called from g.s:9)")


@pytest.mark.parametrize(
    "caller",
    [
        lambda p: p.symbol("helper"),  # not after a call instruction
        lambda p: p.symbol("guest_main") + 3,  # inside an instruction
        lambda p: p.end + 0x100,  # outside the program
        lambda p: 2**64 - 1,
        lambda p: 5,
    ],
)
def test_a_return_address_that_is_no_call_names_no_caller(caller: object) -> None:
    """The guest's frame pointer is the guest's word: an address that is not right after a
    direct call in the program (garbage rbp, a hostile guest) names no caller."""
    prog = program()
    address = caller(prog)  # type: ignore[operator]
    failure = resolve_failure([3, prog.symbol("in_helper"), address, 2, 1], prog)
    assert failure.caller is None
    assert (failure.file, failure.line) == ("g.s", 14)


@pytest.mark.parametrize("args", [[], [0], [99, 0, 0, 1, 2], [2**64 - 1]])
def test_unknown_site_resolves_without_crashing(args: list[int]) -> None:
    """A site id the program does not have (a hostile or corrupted guest) becomes a failure
    naming the id."""
    failure = resolve_failure(args, program())
    assert failure.line == 0 and "unknown assert site" in failure.message
    assert "unknown assert site" in str(failure)
