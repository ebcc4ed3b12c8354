"""Instruction decoding with capstone: what KVM's emulator and the diagnostics "see".

The only module that imports capstone. KVM's instruction emulator decodes the bytes it reads
from guest memory through the host's view; the testbed uses capstone for the same question
("what instruction is this?"), on plaintext for the guest's view and on ciphertext for the
host's view of an SEV guest.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


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


def describe(code: bytes, address: int = 0) -> str:
    """One-line decode of the first instruction, or "undecodable"."""
    insn = decode_one(code, address)
    return "undecodable" if insn is None else insn.text
