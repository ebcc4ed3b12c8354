"""The CPUID the VMM gives the guest (KVM_SET_CPUID2), as QEMU builds it for each VM type."""

from __future__ import annotations

from testbed.errors import UsageError
from testbed.hw.exits import Vendor
from testbed.kvm.msr import (
    KVM_FEATURE_ASYNC_PF,
    KVM_FEATURE_ASYNC_PF_INT,
    KVM_FEATURE_CLOCKSOURCE,
    KVM_FEATURE_CLOCKSOURCE2,
    KVM_FEATURE_POLL_CONTROL,
    KVM_FEATURE_PV_EOI,
    KVM_FEATURE_STEAL_TIME,
)
from testbed.kvm.uapi import (
    KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_FEATURE_PV_SCHED_YIELD,
    KVM_FEATURE_PV_SEND_IPI,
    KVM_FEATURE_PV_UNHALT,
)
from testbed.kvm.vm import CpuidEntry, CpuidTable
from testbed.x86 import TDX_CPUID_LEAF_ID, TDX_IDENT

#: PV features advertised unless the user chooses: the ones the hypercall model implements.
DEFAULT_PV_FEATURES = (1 << KVM_FEATURE_PV_UNHALT) | (1 << KVM_FEATURE_PV_SEND_IPI) | (1 << KVM_FEATURE_PV_SCHED_YIELD)

PV_FEATURE_NAMES = {
    "pv_unhalt": KVM_FEATURE_PV_UNHALT,
    "pv_send_ipi": KVM_FEATURE_PV_SEND_IPI,
    "pv_sched_yield": KVM_FEATURE_PV_SCHED_YIELD,
    "hc_map_gpa_range": KVM_FEATURE_HC_MAP_GPA_RANGE,
    "migration_control": KVM_FEATURE_MIGRATION_CONTROL,
    "clocksource": KVM_FEATURE_CLOCKSOURCE,
    "clocksource2": KVM_FEATURE_CLOCKSOURCE2,
    "async_pf": KVM_FEATURE_ASYNC_PF,
    "steal_time": KVM_FEATURE_STEAL_TIME,
    "pv_eoi": KVM_FEATURE_PV_EOI,
    "poll_control": KVM_FEATURE_POLL_CONTROL,
    "async_pf_int": KVM_FEATURE_ASYNC_PF_INT,
}

#: Where KVM looks for its signature (kvm_get_hypervisor_cpuid(): 0x40000000 + n * 0x100)
KVM_CPUID_BASES = range(KVM_CPUID_SIGNATURE, 0x40010000, 0x100)

# CPUID 0x8000001F.EAX bits (ABI.md section 6).
SEV_BIT = 1 << 1
SEV_ES_BIT = 1 << 3
SEV_SNP_BIT = 1 << 4
PHYS_ADDR_REDUCTION = 5
#: CPUID 0x80000008.EAX: the guest's MAXPHYADDR (the MMU's, hw: PagingMode(phys_bits=48)) and
#: linear-address width
MAXPHYADDR = 48
VIRTUAL_ADDRESS_BITS = 48
# CPUID 0x80000001.EDX bits.
EXT_EDX_PAGE1GB = 1 << 26
EXT_EDX_LM = 1 << 29


def _regs(text: str) -> tuple[int, int, int]:
    raw = text.encode()
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


def build_cpuid(
    vendor: Vendor,
    pv_features: int,
    sev_features: int = 0,
    c_bit: int = 51,
    kvm_base: int | None = KVM_CPUID_SIGNATURE,
    tdx_gpaw: int | None = None,
) -> CpuidTable:
    """Leaves 0, 1, base/base+1 (KVM signature and PV features), 0x80000000, 0x80000001, 0x80000008,
    0x8000001F.

    `kvm_base` places the KVM leaves (QEMU moves them to 0x40000100 when it also exposes
    Hyper-V at 0x40000000); None leaves the signature out, so KVM finds no PV features.
    """
    if kvm_base is not None and kvm_base not in KVM_CPUID_BASES:
        raise UsageError(f"KVM CPUID base 0x{kvm_base:x}: expected 0x40000000 + n * 0x100 up to 0x4000ff00, "
                         "or none")
    table = CpuidTable()
    vendor_text = "AuthenticAMD" if vendor is Vendor.AMD else "GenuineIntel"
    ebx, edx, ecx = _regs(vendor_text)
    table.set(CpuidEntry(0, 0, 0xD, ebx, ecx, edx))
    family = 0x00A00F11 if vendor is Vendor.AMD else 0x000806F8  # Genoa / Sapphire Rapids
    table.set(CpuidEntry(1, 0, family, 0, 1 << 31, 0))  # ECX[31]: hypervisor present
    if kvm_base is not None:
        kb, kc, kd = _regs("KVMKVMKVM\0\0\0")
        table.set(CpuidEntry(kvm_base, 0, kvm_base | (KVM_CPUID_FEATURES & 0xFF), kb, kc, kd))
        table.set(CpuidEntry(kvm_base | (KVM_CPUID_FEATURES & 0xFF), 0, pv_features, 0, 0, 0))
    max_ext = 0x8000001F if vendor is Vendor.AMD else 0x80000008
    table.set(CpuidEntry(0x80000000, 0, max_ext, 0, 0, 0))
    # EDX: LM, and Page1GB (1 GiB pages, which the MMU walks and the runtime's identity map
    # uses), as QEMU's EPYC-Genoa and SapphireRapids models have them.
    table.set(CpuidEntry(0x80000001, 0, 0, 0, 0, EXT_EDX_PAGE1GB | EXT_EDX_LM))
    # Address sizes, as QEMU's cpu_x86_cpuid() always fills them: EAX[7:0] MAXPHYADDR (48, the
    # MMU's), [15:8] the linear-address width (48: 4-level paging); a TD's GPAW in [23:16] below.
    table.set(CpuidEntry(0x80000008, 0, MAXPHYADDR | (VIRTUAL_ADDRESS_BITS << 8), 0, 0, 0))
    if vendor is Vendor.AMD:
        sev_ebx = (c_bit & 0x3F) | (PHYS_ADDR_REDUCTION << 6) if sev_features else 0
        table.set(CpuidEntry(0x8000001F, 0, sev_features, sev_ebx, 0, 0))
    if tdx_gpaw is not None:
        # A TD: leaf 0x21 is the TDX module's ("IntelTDX    ", which the module answers
        # itself: hw/tdx_module.py), so the base range reaches it; 0x80000008.EAX[23:16] is the
        # GPA width KVM_TDX_INIT_VM configures (and [7:0] the MAXPHYADDR KVM checks GPAs with).
        table.set(CpuidEntry(0, 0, TDX_CPUID_LEAF_ID, ebx, ecx, edx))
        tb, tc, td = _regs(TDX_IDENT)
        table.set(CpuidEntry(TDX_CPUID_LEAF_ID, 0, 0, tb, tc, td))
        table.set(CpuidEntry(0x80000008, 0, tdx_gpaw | (VIRTUAL_ADDRESS_BITS << 8) | (tdx_gpaw << 16), 0, 0, 0))
    return table
