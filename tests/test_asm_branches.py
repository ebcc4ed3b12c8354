"""Branch targets checked after assembly (testbed/asm/branches.py): Keystone 0.9.2 wraps a rel8-only
branch to a target out of its reach, and a JMP/CALL/Jcc to an absolute address whose
displacement does not fit 32 bits signed, without an error."""

from __future__ import annotations

import pytest

from testbed.errors import AsmError
from testbed.machine import VmOptions, build_program


@pytest.mark.parametrize(("text", "message"), [
    ("guest_main:\n    loop L1\n    .space 200\nL1: nop\n    ret\n", "loop L1: the target 0x1000ca is out of"),
    ("guest_main:\nL1: nop\n    .space 126\n    loop L1\n    ret\n", "loop L1: the target 0x100000 is out of"),
    ("guest_main:\n    loopne L1\n    .space 250\nL1: nop\n    ret\n", "loopne L1"),
    ("guest_main:\n    jrcxz L1\n    .space 200\nL1: nop\n    ret\n", "jrcxz L1"),
    ("guest_main:\n    jecxz L1\n    .space 200\nL1: nop\n    ret\n", "jecxz L1"),
    ("guest_main:\n    jmp 0x100000000\n    ret\n", "(Keystone encoded a branch to 0x0)"),
    ("guest_main:\n    je 0xffffffff80000000\n    ret\n", "je 0xffffffff80000000"),
    (".equ T, 0xffffffff80000000\nguest_main:\n    call T\n    ret\n", "call T: the target 0xffffffff80000000"),
], ids=["loop-ahead", "loop-behind", "loopne", "jrcxz", "jecxz", "jmp-abs", "je-abs", "call-const"])
def test_a_branch_keystone_wraps_is_refused_at_its_line(text: str, message: str) -> None:
    """The branch's encoded target is decoded where it was placed and compared with the target
    its source names: a wrapped one is an error at the branch's line."""
    with pytest.raises(AsmError) as info:
        build_program("<t>", VmOptions(), text=text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip().split(" ")[0] in (
        "loop", "loopne", "jrcxz", "jecxz", "jmp", "je", "call"))
    assert str(info.value).startswith(f"<t>:{line}: ") and message in str(info.value)


@pytest.mark.parametrize("text", [
    "guest_main:\n    loop L1\n    .space 125\nL1: nop\n    ret\n",
    "guest_main:\nL1: nop\n    .space 125\n    loop L1\n    ret\n",
    "guest_main:\n1:  nop\n    loop 1b\n    ret\n",
    "guest_main:\n    je L1\n    .space 300\nL1: ret\n",
    "guest_main:\n    jmp 0x200000\n    ret\n",
    ".equ T, 0x7fff0000\nguest_main:\n    call T\n    ret\n",
], ids=["loop-ahead-127", "loop-behind-128", "local-label", "je-relaxed", "jmp-abs", "call-const"])
def test_branches_within_reach_assemble(text: str) -> None:
    """Branches whose targets fit their encoding assemble (and Jcc to a label is relaxed to rel32)."""
    build_program("<t>", VmOptions(), text=text)


@pytest.mark.parametrize(("text", "line", "message"), [
    (".macro FAR_JUMP\n    jmp 0x100000000\n.endm\nguest_main:\n    FAR_JUMP\n    ret\n", 5,
     "jmp 0x100000000 (in macro FAR_JUMP at <t>:2): the target 0x100000000 is out of a branch's reach"),
    ("guest_main:\n.rept 2\n    call 0xffffffff80000000\n.endr\n    ret\n", 2, "call 0xffffffff80000000"),
    (".macro SPIN\n    loopne spin_top\n.endm\nguest_main:\nspin_top:\n    SPIN\n    ret\n", 2,
     "loopne in a .macro, .rept or .irp body"),
], ids=["macro-jmp", "rept-call", "macro-loopne"])
def test_a_branch_in_an_expansion_keystone_would_wrap_is_refused(text: str, line: int, message: str) -> None:
    """A branch inside a macro or .rept expansion has no position of its own: a rel8-only one is
    refused in the body, and one to an absolute address must be within reach of the whole
    expansion (checked after assembly, reported at the statement that expands it)."""
    with pytest.raises(AsmError) as info:
        build_program("<t>", VmOptions(), text=text)
    assert str(info.value).startswith(f"<t>:{line}: ") and message in str(info.value), str(info.value)


def test_a_branch_to_an_absolute_address_in_reach_of_an_expansion_assembles() -> None:
    """An absolute target in reach of every byte of the expansion is accepted."""
    build_program("<t>", VmOptions(), text=".macro NEAR_JUMP\n    jmp 0x200000\n.endm\nguest_main:\n"
                                           "    NEAR_JUMP\n    ret\n")
