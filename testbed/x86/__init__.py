"""Architectural x86-64 facts shared by every layer: vectors, registers, MSRs, CPUID leaves.

Nothing here knows about Unicorn; the hardware model maps `Reg` onto the emulator's register
ids, and the kvm layer names registers through `Reg` the way KVM names them (kvm_rax_read...).
"""

from __future__ import annotations

from enum import IntEnum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1


class Reg(IntEnum):
    """General-purpose and control registers, named as in the SDM / KVM's kvm_*_read()."""

    RAX = 0
    RBX = 1
    RCX = 2
    RDX = 3
    RSI = 4
    RDI = 5
    RBP = 6
    RSP = 7
    R8 = 8
    R9 = 9
    R10 = 10
    R11 = 11
    R12 = 12
    R13 = 13
    R14 = 14
    R15 = 15
    RIP = 16
    RFLAGS = 17
    CS = 18
    SS = 19
    DS = 20
    ES = 21
    FS = 22
    GS = 23
    CR0 = 24
    CR2 = 25
    CR3 = 26
    CR4 = 27
    DR6 = 28


GPRS: tuple[Reg, ...] = tuple(Reg(i) for i in range(16))


class Vector(IntEnum):
    """Exception vectors (arch/x86/include/asm/trapnr.h)."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20  # X86_TRAP_VE (TDX)
    CP = 21
    VC = 29  # X86_TRAP_VC (SEV-ES / SEV-SNP)
    SX = 30


#: Vectors whose delivery pushes an error code (SDM vol. 3 table 6-1, plus #VC and #CP).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

#: Faults that are "contributory" for the double-fault rules (SDM vol. 3 table 6-4).
CONTRIBUTORY_VECTORS = frozenset({0, 10, 11, 12, 13})

VECTOR_NAMES = {v.value: f"#{v.name}" for v in Vector}


def vector_name(vector: int) -> str:
    """'#UD' for 6, 'vector 0x80' for a vector without a mnemonic."""
    return VECTOR_NAMES.get(vector, f"vector 0x{vector:x}")


# Page-fault error code bits (SDM vol. 3 4.7).
PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4

# CR bits used by the model.
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
#: DR6.BS: the #DB was a single step (RFLAGS.TF)
DR6_BS = 1 << 14

# CPUID leaf 0x21: the TDX module's signature, EBX:EDX:ECX = "IntelTDX    " (Linux's
# tdx_early_init checks it; the module answers it, the VMM's CPUID table reports leaf 0's maximum).
TDX_CPUID_LEAF_ID = 0x21
TDX_IDENT = "IntelTDX    "

# MSRs.
MSR_EFER = 0xC0000080
MSR_AMD64_SEV_ES_GHCB = 0xC0010130
MSR_AMD64_SEV = 0xC0010131
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08

# RFLAGS bits.
RFLAGS_CF = 1 << 0
RFLAGS_FIXED = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

# Instruction encodings the models recognise (ABI.md sections 2, 5, 7, 9).
VMCALL_BYTES = b"\x0f\x01\xc1"
VMMCALL_BYTES = b"\x0f\x01\xd9"
VMGEXIT_BYTES = b"\xf3\x0f\x01\xd9"  # rep vmmcall
PVALIDATE_BYTES = b"\xf2\x0f\x01\xff"
RMPADJUST_BYTES = b"\xf3\x0f\x01\xfe"
TDCALL_BYTES = b"\x66\x0f\x01\xcc"
UD2_BYTES = b"\x0f\x0b"
