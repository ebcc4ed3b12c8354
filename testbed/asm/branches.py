"""Branch targets Keystone 0.9.2 encodes wrongly without an error, checked after assembly.

Hazard (a review, 2026-12-01; canaries in tests/test_keystone_canary.py): LOOP, LOOPE/LOOPNE and
JRCXZ/JECXZ have only a rel8 form, and a target 128 to ~255 bytes away wraps silently (`loop L`
to a label 200 bytes ahead jumps backwards; only further away is it an "invalid fixup" error);
JMP, CALL and Jcc to an absolute address whose displacement fits 32 bits unsigned but not signed
wrap too (`jmp 0x100000000` from the image is `jmp 0`). The front end cannot know addresses, so
it records such branches (`BranchCheck`: the statement's hidden position label and its target)
and the assembler decodes each one where it was placed and compares the target it encodes with
the one the source names: a difference is an error at the statement's line.

A branch inside a macro, .rept or .irp expansion has no position of its own: a rel8-only one is
refused in a body (frontend.py, expand.py), and for one to an absolute address the statement
that expands it is checked (`SpanCheck`): the target must be within rel32 reach of every byte
the statement placed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testbed.asm.program import SourceLocation
from testbed.asm.syntax import _integer_value
from testbed.decode import immediate_target
from testbed.errors import AsmError

#: branches with only a rel8 form: any target is checked
REL8_ONLY = frozenset({"loop", "loope", "loopz", "loopne", "loopnz", "jrcxz", "jecxz"})
#: branches with a rel32 form (Keystone relaxes them right for labels): absolute targets are checked
REL32 = frozenset({"jmp", "call", "ja", "jae", "jb", "jbe", "jc", "je", "jz", "jg", "jge", "jl", "jle", "jna",
                   "jnae", "jnb", "jnbe", "jnc", "jne", "jng", "jnge", "jnl", "jnle", "jno", "jnp", "jns", "jnz",
                   "jo", "jp", "jpe", "jpo", "js"})
_TARGET = re.compile(r"\s*(-?)\s*([A-Za-z_.$][\w.$@]*|0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH]|[0-9]+)\s*$")
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class BranchCheck:
    """A branch whose encoded target the assembler verifies: `position` is the hidden label
    placed at the statement, `target` the name or literal its operand names."""

    position: str
    mnemonic: str
    target: str
    loc: SourceLocation


def branch_check(mnemonic: str, operands: str, position: str, loc: SourceLocation,
                 absolute: frozenset[str] | set[str]) -> BranchCheck | None:
    """The check for this statement, or None when it needs none: a rel8-only branch to a name or
    literal, or a rel32 branch to a literal or a constant defined before."""
    m = _TARGET.match(operands)
    if not position or m is None:
        return None
    name = m.group(2)
    literal = _integer_value(name) is not None
    if mnemonic in REL8_ONLY or (mnemonic in REL32 and (literal or name in absolute)):
        return BranchCheck(position, mnemonic, m.group(1) + name, loc)
    return None


def verify_branches(checks: list[BranchCheck], code: bytes, base: int, addresses: Mapping[str, int],
                    constants: Mapping[str, int]) -> None:
    """AsmError at the first branch whose encoded target is not the one its source names."""
    for check in checks:
        address = addresses.get(check.position)
        if address is None:
            continue  # not assembled (a false .if branch)
        negative = check.target.startswith("-")
        name = check.target.lstrip("-")
        value = _integer_value(name)
        expected = value if value is not None else addresses.get(name, constants.get(name))
        if expected is None:
            continue
        expected = (-expected if negative else expected) & _U64
        encoded = immediate_target(code[address - base:], address)
        if encoded is not None and encoded != expected:
            raise AsmError(check.loc.file, check.loc.line,
                           f"{check.mnemonic} {check.target}: the target 0x{expected:x} is out of the branch's "
                           f"reach from 0x{address:x} (Keystone encoded a branch to 0x{encoded:x})")


@dataclass(frozen=True)
class SpanCheck:
    """An absolute branch target inside the expansion a top-level statement places at `position`."""

    position: str
    statement: str  # the branch as expanded, and where it comes from, for the message
    target: int
    loc: SourceLocation


def verify_spans(checks: Sequence[SpanCheck], positions: Sequence[str], addresses: Mapping[str, int],
                 end: int) -> None:
    """AsmError at the first expansion with a branch whose absolute target a rel32 displacement
    from somewhere in its bytes cannot reach; `positions` in source order, `end` the code's."""
    if not checks:
        return
    order = {name: i for i, name in enumerate(positions)}
    for check in checks:
        start = addresses.get(check.position)
        if start is None:
            continue  # not assembled
        following = next((addresses[name] for name in positions[order[check.position] + 1:] if name in addresses),
                         end)
        for after in (start + 2, max(following, start + 2)):  # where the branch ends: rel32 counts from there
            offset = (check.target - after) & _U64
            if (1 << 31) <= offset < (1 << 64) - (1 << 31):
                raise AsmError(check.loc.file, check.loc.line,
                               f"{check.statement}: the target 0x{check.target & _U64:x} is out of a branch's reach "
                               f"from the expansion at 0x{start:x}..0x{following:x} (Keystone wraps a rel32 "
                               "displacement silently)")
