"""Instruction decoding (testbed/decode.py): the capstone seam."""

from __future__ import annotations

from testbed.decode import decode_one, immediate_target


def test_immediate_target_is_a_branchs_absolute_target() -> None:
    """A relative branch's immediate is its absolute target (rel8 backwards and rel32 forwards);
    an instruction without an immediate, or undecodable bytes, gives None."""
    assert immediate_target(bytes.fromhex("e2c8"), 0x100000) == 0x100000 + 2 - 0x38  # loop: rel8 -0x38
    assert immediate_target(bytes.fromhex("e9fbffefff"), 0x100000) == 0  # jmp rel32 -0x100005
    assert immediate_target(bytes.fromhex("c3"), 0x1000) is None  # ret
    assert immediate_target(b"", 0x1000) is None and decode_one(b"") is None  # nothing to decode
