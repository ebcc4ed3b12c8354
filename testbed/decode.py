"""Instruction decoding with capstone: what KVM's emulator and the diagnostics "see".

The only module that imports capstone. KVM's instruction emulator decodes the bytes it reads
from guest memory through the host's view; the testbed uses capstone for the same question
("what instruction is this?"), on plaintext for the guest's view and on ciphertext for the
host's view of an SEV guest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import capstone

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS_DETAIL = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS_DETAIL.detail = True

_PUSHES = {"push", "pushfq", "call"}
_POPS = {"pop", "popfq", "ret", "iretq", "leave"}


@dataclass(frozen=True)
class Insn:
    """One decoded instruction."""

    address: int
    size: int
    mnemonic: str
    op_str: str
    raw: bytes

    @property
    def text(self) -> str:
        """`mnemonic op_str` as a disassembler prints it."""
        return f"{self.mnemonic} {self.op_str}".strip()


def decode_one(code: bytes, address: int = 0) -> Insn | None:
    """Decode the first instruction of `code`, or None if the bytes are not an instruction."""
    for insn in _CS.disasm(code, address, 1):
        return Insn(insn.address, insn.size, insn.mnemonic, insn.op_str, bytes(insn.bytes))
    return None


def disassemble(code: bytes, address: int = 0, limit: int = 0) -> list[Insn]:
    """Decode `code` linearly; undecodable bytes appear as `(bad)` entries of one byte."""
    out: list[Insn] = []
    pos = 0
    while pos < len(code) and (not limit or len(out) < limit):
        insn = decode_one(code[pos : pos + 16], address + pos)
        if insn is None:
            out.append(Insn(address + pos, 1, "(bad)", "", code[pos : pos + 1]))
            pos += 1
        else:
            out.append(insn)
            pos += insn.size
    return out


def immediate_target(code: bytes, address: int) -> int | None:
    """The immediate operand of the first instruction of `code` at `address` - a relative
    branch's absolute target - or None (no instruction, or no immediate)."""
    for insn in _CS_DETAIL.disasm(code[:16], address, 1):
        for op in insn.operands:
            if op.type == capstone.x86.X86_OP_IMM:
                return int(op.imm) & ((1 << 64) - 1)
    return None


def describe(code: bytes, address: int = 0) -> str:
    """One-line decode of the first instruction, or "undecodable"."""
    insn = decode_one(code, address)
    return "undecodable" if insn is None else insn.text


def effective_addresses(code: bytes, address: int, read_reg: Callable[[str], int]) -> list[int]:
    """Linear addresses the first instruction of `code` accesses in memory, in operand order.

    `read_reg` gives a register's value by capstone's name ("rax", "rip" is handled here), and
    "fs_base" / "gs_base" the FS and GS bases. Explicit memory operands come from the decode, with
    an FS or GS override's base added (the only segment bases 64-bit mode uses); the stack
    accesses of push/pop/call/ret are implicit.
    """
    mask = (1 << 64) - 1
    for insn in _CS_DETAIL.disasm(code, address, 1):
        out: list[int] = []
        for op in insn.operands:
            if op.type != capstone.x86.X86_OP_MEM:
                continue
            mem = op.mem
            value = mem.disp
            if mem.base:
                base = insn.reg_name(mem.base)
                value += address + insn.size if base == "rip" else read_reg(base)
            if mem.index:
                value += read_reg(insn.reg_name(mem.index)) * mem.scale
            if mem.segment:
                segment = insn.reg_name(mem.segment)
                if segment in ("fs", "gs"):
                    value += read_reg(f"{segment}_base")
            out.append(value & mask)
        if insn.mnemonic in _PUSHES:
            out.append((read_reg("rsp") - 8) & mask)
        elif insn.mnemonic in _POPS:
            out.append(read_reg("rsp") & mask)
        return out
    return []
