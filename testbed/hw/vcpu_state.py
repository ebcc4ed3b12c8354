"""A vCPU's architectural state as one record: what KVM_GET_REGS/SREGS/MSRS return for a VM
whose state the host may read, and what the SEV firmware encrypts into the VMSA packet of
SEND_UPDATE_VMSA for one whose state it may not (SEV-ES, SNP).

It holds what the testbed's guests can change and the emulator models: the general-purpose
registers, RIP, RFLAGS, the control registers, the segment selectors, GDTR/IDTR/TR, the MSRs of
`STATE_MSRS`, the GHCB MSR (the VMSA's/VMCB's GHCB GPA), and the x87/SSE state with XCR0 - what
QEMU moves with KVM_GET_XSAVE / KVM_GET_XCRS, and what an SEV-ES/SNP VMSA holds encrypted
(arch/x86/kvm/svm/sev.c sev_es_sync_vmsa copies x87_fcw/fsw/ftw/fop/rip/dp, mxcsr, fpreg_x87,
fpreg_xmm and xcr0 into it: "SEV-ES guests maintain an encrypted version of their FPU state").
That is FCW, FSW (with TOP), the tags, FOP, FIP, FDP, MXCSR, the eight x87 registers, XMM0-15
and XCR0 (hw/unicorn_binding.py `fpu_state`, `xcr0`); no YMM upper halves, which Unicorn's
CPU model (no AVX) gives no guest a way to use. Loading it (`load`) reloads each
segment from the GDT as a selector write does, sets the CPL from CS's RPL and drops the TLB and
the translated code, as a fresh VMRUN from a new VMSA would. It is taken only between runs (an
exit completed), where no event is pending.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from testbed.errors import TestbedError
from testbed.x86 import GPRS, MSR_EFER, Reg

#: MSRs the record carries (EFER first: it is loaded with the control registers)
STATE_MSRS: tuple[int, ...] = (
    MSR_EFER,
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC0000100, 0xC0000101, 0xC0000102,  # FS_BASE, GS_BASE, KERNEL_GS_BASE
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x277,  # PAT
)
_SEGMENTS: tuple[Reg, ...] = (Reg.CS, Reg.SS, Reg.DS, Reg.ES, Reg.FS, Reg.GS)
#: FCW, FSW, FTW, FOP, FIP, FDP, MXCSR
FPU_SCALARS = ("fcw", "fsw", "ftw", "fop", "fip", "fdp", "mxcsr")
_X87_REGS = 8
_XMM_REGS = 16
_FIELDS = (len(GPRS) + 2 + 4 + len(_SEGMENTS) + 4 + 4 + len(STATE_MSRS) + 1
           + len(FPU_SCALARS) + 2 * _X87_REGS + 2 * _XMM_REGS + 1)
#: the serialised record: a version word, then the fields as little-endian u64 (an XMM
#: register as two: low, high; an x87 register as mantissa, sign|exponent)
_LAYOUT = struct.Struct(f"<{1 + _FIELDS}Q")
#: 2: the x87/SSE state and XCR0 were added
STATE_VERSION = 2
STATE_BYTES = _LAYOUT.size


class VcpuStateError(TestbedError):
    """A state record that does not parse (wrong size or version)."""


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's architectural state (see the module comment)."""

    gprs: tuple[int, ...]
    rip: int
    rflags: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    segments: tuple[int, ...]  # CS, SS, DS, ES, FS, GS selectors
    gdt: tuple[int, int]  # base, limit
    idt: tuple[int, int]
    tr: tuple[int, int, int, int]  # selector, base, limit, flags
    msrs: tuple[int, ...]  # values of STATE_MSRS, in order
    ghcb_msr: int
    fpu: tuple[int, ...]  # FPU_SCALARS, in order
    x87: tuple[tuple[int, int], ...]  # R0-R7: (mantissa, sign|exponent)
    xmm: tuple[int, ...]  # XMM0-15, 128 bits each
    xcr0: int

    def to_bytes(self) -> bytes:
        """The record as the firmware encrypts it (the VMSA's plaintext)."""
        mask = (1 << 64) - 1
        values = (STATE_VERSION, *self.gprs, self.rip, self.rflags, self.cr0, self.cr2, self.cr3, self.cr4,
                  *self.segments, *self.gdt, *self.idt, *self.tr, *self.msrs, self.ghcb_msr, *self.fpu,
                  *(v for reg in self.x87 for v in reg), *(v for x in self.xmm for v in (x & mask, x >> 64)),
                  self.xcr0)
        return _LAYOUT.pack(*(v & mask for v in values))

    def differences(self, other: VcpuState) -> list[tuple[str, int, int]]:
        """(field, this value, other's) for each register that differs (`gprs[RBX]`,
        `xmm[3]`, `msrs[0xc0000080]`, ...): the oracle's vCPU comparison."""
        out: list[tuple[str, int, int]] = []
        for (name, mine), (_, theirs) in zip(self._named(), other._named(), strict=True):
            if mine != theirs:
                out.append((name, mine, theirs))
        return out

    def _named(self) -> list[tuple[str, int]]:
        named = [(f"gprs[{r.name}]", v) for r, v in zip(GPRS, self.gprs, strict=True)]
        named += [("rip", self.rip), ("rflags", self.rflags), ("cr0", self.cr0), ("cr2", self.cr2),
                  ("cr3", self.cr3), ("cr4", self.cr4)]
        named += [(f"segments[{r.name}]", v) for r, v in zip(_SEGMENTS, self.segments, strict=True)]
        named += [("gdt.base", self.gdt[0]), ("gdt.limit", self.gdt[1]), ("idt.base", self.idt[0]),
                  ("idt.limit", self.idt[1])]
        named += [(f"tr[{i}]", v) for i, v in enumerate(self.tr)]
        named += [(f"msrs[0x{m:x}]", v) for m, v in zip(STATE_MSRS, self.msrs, strict=True)]
        named += [("ghcb_msr", self.ghcb_msr)]
        named += list(zip(FPU_SCALARS, self.fpu, strict=True))
        named += [(f"x87[{i}]", (e << 64) | m) for i, (m, e) in enumerate(self.x87)]
        named += [(f"xmm[{i}]", v) for i, v in enumerate(self.xmm)]
        named += [("xcr0", self.xcr0)]
        return named

    @classmethod
    def from_bytes(cls, data: bytes) -> VcpuState:
        """Parse `to_bytes`'s output; VcpuStateError for anything else."""
        if len(data) != STATE_BYTES:
            raise VcpuStateError(f"vCPU state of {len(data)} bytes, expected {STATE_BYTES}")
        values = _LAYOUT.unpack(data)
        if values[0] != STATE_VERSION:
            raise VcpuStateError(f"vCPU state version {values[0]}, expected {STATE_VERSION}")
        it = iter(values[1:])

        def take(n: int) -> tuple[int, ...]:
            return tuple(next(it) for _ in range(n))

        gprs = take(len(GPRS))
        rip, rflags, cr0, cr2, cr3, cr4 = take(6)
        segments = take(len(_SEGMENTS))
        gdt = take(2)
        idt = take(2)
        tr = take(4)
        msrs = take(len(STATE_MSRS))
        (ghcb_msr,) = take(1)
        fpu = take(len(FPU_SCALARS))
        x87 = tuple((m, e) for m, e in (take(2) for _ in range(_X87_REGS)))
        xmm = tuple(lo | (hi << 64) for lo, hi in (take(2) for _ in range(_XMM_REGS)))
        (xcr0,) = take(1)
        return cls(gprs, rip, rflags, cr0, cr2, cr3, cr4, segments, (gdt[0], gdt[1]), (idt[0], idt[1]),
                   (tr[0], tr[1], tr[2], tr[3]), msrs, ghcb_msr, fpu, x87, xmm, xcr0)


def save(hw: Any) -> VcpuState:
    """The state of `hw` (a UnicornVcpu, between runs)."""
    return VcpuState(
        gprs=tuple(hw.read_reg(r) for r in GPRS), rip=hw.read_reg(Reg.RIP), rflags=hw.read_reg(Reg.RFLAGS),
        cr0=hw.read_reg(Reg.CR0), cr2=hw.read_reg(Reg.CR2), cr3=hw.read_reg(Reg.CR3), cr4=hw.read_reg(Reg.CR4),
        segments=tuple(hw.read_reg(r) for r in _SEGMENTS), gdt=hw.descriptor_table("gdt"),
        idt=hw.descriptor_table("idt"), tr=hw.task_register(), msrs=tuple(hw.get_msr(m) for m in STATE_MSRS),
        ghcb_msr=hw.ghcb_msr_value(), **_fpu(hw),
    )


def _fpu(hw: Any) -> dict[str, Any]:
    scalars, x87, xmm = hw.fpu_state()
    return {"fpu": scalars, "x87": x87, "xmm": xmm, "xcr0": hw.xcr0()}


def load(hw: Any, state: VcpuState) -> None:
    """Put `state` into `hw` (a UnicornVcpu, between runs), in the order a VMRUN loads a VMSA:
    descriptor tables and control registers, then the segments (reloaded from the new GDT),
    the MSRs, XCR0 and the x87/SSE state, the GPRs and RIP/RFLAGS; then TLB and translated
    code are dropped."""
    hw.set_descriptor_table("gdt", *state.gdt)
    hw.set_descriptor_table("idt", *state.idt)
    hw.write_reg(Reg.CR3, state.cr3)
    hw.write_reg(Reg.CR4, state.cr4)
    hw.set_msr(MSR_EFER, state.msrs[0])
    hw.write_reg(Reg.CR0, state.cr0)
    for reg, selector in zip(_SEGMENTS, state.segments, strict=True):
        hw.write_reg(reg, selector)
    hw.set_tr(*state.tr)
    for msr, value in zip(STATE_MSRS[1:], state.msrs[1:], strict=True):
        hw.set_msr(msr, value)
    hw.set_xcr0(state.xcr0)
    hw.set_fpu_state(state.fpu, state.x87, state.xmm)
    for reg, value in zip(GPRS, state.gprs, strict=True):
        hw.write_reg(reg, value)
    hw.write_reg(Reg.CR2, state.cr2)
    hw.write_reg(Reg.RFLAGS, state.rflags)
    hw.write_reg(Reg.RIP, state.rip)
    hw._set_cpl(state.segments[0] & 3)
    hw.set_ghcb_msr(state.ghcb_msr)
    hw.flush_code()
