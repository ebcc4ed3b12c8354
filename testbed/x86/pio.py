"""Port I/O instructions decoded from their bytes (IN, OUT, INS, OUTS), shared by the hardware
model, which intercepts them, and KVM's emulator, which decodes a string I/O instruction again
from guest memory as x86_emulate_instruction() does."""

from __future__ import annotations

from typing import NamedTuple

#: IN/OUT with an imm8 port (E4-E7), with DX (EC-EF), and the string forms INS/OUTS (6C-6F, DX)
IMM8_PORT_OPCODES = frozenset({0xE4, 0xE5, 0xE6, 0xE7})
STRING_IO_OPCODES = frozenset({0x6C, 0x6D, 0x6E, 0x6F})
IO_OPCODES = IMM8_PORT_OPCODES | frozenset({0xEC, 0xED, 0xEE, 0xEF}) | STRING_IO_OPCODES
IN_OPCODES = frozenset({0xE4, 0xE5, 0xEC, 0xED, 0x6C, 0x6D})
BYTE_IO_OPCODES = frozenset({0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E})
#: The legacy prefixes (LOCK, REP/REPNE, segment overrides, operand and address size).
LEGACY_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
#: REX, a prefix in 64-bit code only (INC/DEC in compatibility mode).
REX_PREFIXES = frozenset(range(0x40, 0x50))
#: Segment-override prefixes, numbered as the SVM IOIO SEG field numbers segments (ES 0 ... GS 5).
SEGMENT_PREFIXES = {0x26: 0, 0x2E: 1, 0x36: 2, 0x3E: 3, 0x64: 4, 0x65: 5}
SEG_ES, SEG_DS, SEG_FS, SEG_GS = 0, 3, 4, 5
#: An instruction is at most 15 bytes (longer is #GP: the SDM's instruction-length limit, QEMU's
#: X86_MAX_INSN_LENGTH): 14 prefixes before a one-byte IN/OUT DX, 13 before a two-byte opcode.
MAX_INSN_LENGTH = 15
MAX_PREFIXES = MAX_INSN_LENGTH - 1
REP_PREFIXES = frozenset({0xF2, 0xF3})


class IoInsn(NamedTuple):
    """An IN/OUT decoded from its bytes: the port (imm8 or DX), the operand size (opcode and
    66; REX.W changes nothing in IN/OUT), its length with the prefixes, the direction, and for
    INS/OUTS the REP prefix (F3 or F2), the address size (8 in 64-bit code, 4 in 32-bit code;
    67 halves it) and the segment it reads (OUTS: the last override, else DS) or writes (INS:
    always ES)."""

    port: int
    size: int
    length: int
    is_in: bool
    string: bool = False
    rep: bool = False
    addr_size: int = 8
    segment: int = SEG_DS


def decode_io(insn: bytes, prefixes: int, long_mode: bool, dx: int) -> IoInsn:
    """The IN/OUT whose bytes are `insn` (from its first; its opcode, in IO_OPCODES, after
    `prefixes` prefix bytes), in 64-bit code when `long_mode`, with DX = `dx`."""
    op = insn[prefixes]
    before = insn[:prefixes]
    size = 1 if op in BYTE_IO_OPCODES else 2 if 0x66 in before else 4
    if op in IMM8_PORT_OPCODES:
        return IoInsn(insn[prefixes + 1], size, prefixes + 2, op in IN_OPCODES)
    port = dx & 0xFFFF
    if op not in STRING_IO_OPCODES:
        return IoInsn(port, size, prefixes + 1, op in IN_OPCODES)
    is_in = op in IN_OPCODES
    overrides = [SEGMENT_PREFIXES[b] for b in before if b in SEGMENT_PREFIXES]
    return IoInsn(port, size, prefixes + 1, is_in, string=True, rep=any(b in REP_PREFIXES for b in before),
                  addr_size=(8 if long_mode else 4) // (2 if 0x67 in before else 1),
                  segment=SEG_ES if is_in else overrides[-1] if overrides else SEG_DS)


def prefix_count(code: bytes, prefixes: frozenset[int], most: int = MAX_PREFIXES) -> int:
    """How many of `code`'s first bytes (at most `most`) are in `prefixes`."""
    n = 0
    while n < min(len(code), most) and code[n] in prefixes:
        n += 1
    return n
