"""KVM's MSR rules: which MSRs it emulates, the PV MSRs' feature gating, and userspace exits.

Pure logic over plain values (like kvm/hypercall.py), so it can be tested without a CPU. It
follows arch/x86/kvm/x86.c:

- kvm_emulate_rdmsr()/kvm_emulate_wrmsr() (and msr_interception() for SEV-ES/SNP guests,
  whose MSR accesses arrive through the GHCB) call kvm_get_msr_with_filter() /
  kvm_set_msr_with_filter(): an MSR the VM's filter (KVM_X86_SET_MSR_FILTER) denies fails
  with KVM_MSR_RET_FILTERED; otherwise kvm_get_msr_common()/kvm_set_msr_common() decide.
- The KVM PV MSRs (MSR_KVM_*) exist only while their PV feature is in the guest's CPUID when
  KVM_CAP_ENFORCE_PV_FEATURE_CPUID is on (guest_pv_has()); without it they fail with 1, which
  kvm_msr_reason() reports as KVM_MSR_EXIT_REASON_INVAL. An MSR KVM does not know at all is
  KVM_MSR_RET_UNSUPPORTED (KVM_MSR_EXIT_REASON_UNKNOWN); MSR_KVM_MIGRATION_CONTROL is one of
  those: KVM never emulates it, userspace must (Documentation/virt/kvm/x86/hypercalls.rst).
- A failed access becomes a KVM_EXIT_X86_RDMSR/WRMSR user exit when userspace enabled that
  reason with KVM_CAP_X86_USER_SPACE_MSR (kvm_msr_user_space()); otherwise #GP(0)
  (kvm_complete_insn_gp(), or the GHCB's "issue exception" for SEV-ES/SNP).

Deliberate deviation: KVM emulates many architectural MSRs (EFER, PAT, APIC_BASE, MTRRs, ...)
and passes others through to the hardware (FS_BASE, LSTAR, ...). The testbed lets the
emulator's own implementation hold the architectural MSRs it models (`PASSTHROUGH_MSRS`: the
hardware model does not exit for them), and every other index reaches these rules.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from testbed.kvm.ioctl import KvmIoctlError
from testbed.x86 import U32, U64

# -- MSR indices (arch/x86/include/uapi/asm/kvm_para.h) ---------------------------------------
MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_STEAL_TIME = 0x4B564D03
MSR_KVM_PV_EOI_EN = 0x4B564D04
MSR_KVM_POLL_CONTROL = 0x4B564D05
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK = 0x4B564D07
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
KVM_MIGRATION_READY = 1 << 0

# -- PV feature bits of CPUID 0x40000001.EAX (kvm_para.h) --------------------------------------
KVM_FEATURE_CLOCKSOURCE = 0
KVM_FEATURE_CLOCKSOURCE2 = 3
KVM_FEATURE_ASYNC_PF = 4
KVM_FEATURE_STEAL_TIME = 5
KVM_FEATURE_PV_EOI = 6
KVM_FEATURE_POLL_CONTROL = 12
KVM_FEATURE_ASYNC_PF_INT = 14

#: The PV MSRs and the feature guest_pv_has() checks for each, in kvm_get_msr_common() and
#: kvm_set_msr_common() alike (the table of tools/testing/selftests/kvm/x86/kvm_pv_test.c).
PV_MSR_FEATURES: dict[int, int] = {
    MSR_KVM_SYSTEM_TIME: KVM_FEATURE_CLOCKSOURCE,
    MSR_KVM_SYSTEM_TIME_NEW: KVM_FEATURE_CLOCKSOURCE2,
    MSR_KVM_WALL_CLOCK: KVM_FEATURE_CLOCKSOURCE,
    MSR_KVM_WALL_CLOCK_NEW: KVM_FEATURE_CLOCKSOURCE2,
    MSR_KVM_ASYNC_PF_EN: KVM_FEATURE_ASYNC_PF,
    MSR_KVM_STEAL_TIME: KVM_FEATURE_STEAL_TIME,
    MSR_KVM_PV_EOI_EN: KVM_FEATURE_PV_EOI,
    MSR_KVM_POLL_CONTROL: KVM_FEATURE_POLL_CONTROL,
    MSR_KVM_ASYNC_PF_INT: KVM_FEATURE_ASYNC_PF_INT,
    MSR_KVM_ASYNC_PF_ACK: KVM_FEATURE_ASYNC_PF_INT,
}

#: Architectural MSRs whose state the emulator holds (see the module docstring): the hardware
#: model runs them natively. EFER, STAR, LSTAR, CSTAR, SFMASK, FS/GS/KERNEL_GS_BASE,
#: SYSENTER_CS/ESP/EIP, TSC, PAT, APIC_BASE.
PASSTHROUGH_MSRS = frozenset({
    0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102,
    0x174, 0x175, 0x176, 0x10, 0x277, 0x1B,
})

# -- KVM_CAP_X86_USER_SPACE_MSR / KVM_X86_SET_MSR_FILTER (include/uapi/linux/kvm.h) ---------------
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK = KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_RANGE_VALID_MASK = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1
KVM_MSR_FILTER_VALID_MASK = KVM_MSR_FILTER_DEFAULT_DENY
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600  # bytes

# -- results of the MSR helpers (arch/x86/kvm/x86.h) --------------------------------------------
MSR_OK = 0
KVM_MSR_RET_ERR = 1  # "return 1": the MSR exists but the access is invalid (#GP)
KVM_MSR_RET_UNSUPPORTED = 2
KVM_MSR_RET_FILTERED = 3
#: svm_get_msr()/svm_set_msr() for an MSR sev_es_prevent_msr_access() refuses on a VM with
#: protected state: -EINVAL (a read is then #GP; a write fails KVM_RUN: __kvm_emulate_wrmsr
#: "Signal all other negative errors to userspace")
KVM_MSR_RET_EINVAL = -errno.EINVAL

# -- MSRs by VM type ------------------------------------------------------------------------------
MSR_IA32_APICBASE = 0x1B
MSR_IA32_FEAT_CTL = 0x3A
FEAT_CTL_LOCKED = 1 << 0
MSR_IA32_MCG_EXT_CTL = 0x4D0
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_AMD64_SEV_ES_GHCB = 0xC0010130
#: KVM_MAX_MCE_BANKS (kvm_host.h): the MCx_CTL..MCx_MISC and MCx_CTL2 ranges
_MCE_BANKS = 32


#: The x2APIC MSR range (APIC_BASE_MSR .. APIC_BASE_MSR + 0xff, lapic.h): kvm_get_msr_common() /
#: kvm_set_msr_common() hand it to kvm_x2apic_msr_read()/_write(), which fail with 1 when KVM
#: has no in-kernel local APIC.
X2APIC_MSR_FIRST = 0x800
X2APIC_MSR_LAST = 0x8FF


def _x2apic(reg: int) -> int:
    return 0x800 + (reg >> 4)


#: tdx_has_emulated_msr() (arch/x86/kvm/vmx/tdx.c): the MSRs KVM emulates for a TD. A TD's
#: TDVMCALL<RDMSR/WRMSR> of any other fails with 1 (tdx_get_msr/tdx_set_msr), i.e. KVM_MSR_RET_ERR,
#: whose user-exit reason is INVAL, not UNKNOWN.
TDX_EMULATED_MSRS = frozenset({
    0x8B,  # MSR_IA32_UCODE_REV
    0x10A,  # MSR_IA32_ARCH_CAPABILITIES
    0x1FC,  # MSR_IA32_POWER_CTL
    MSR_IA32_CR_PAT,
    0xFE,  # MSR_MTRRcap
    *range(0x200, 0x26F + 1),  # MTRRphysBase_MSR(0) ... MSR_MTRRfix4K_F8000
    0x2FF,  # MSR_MTRRdefType
    0x6E0,  # MSR_IA32_TSC_DEADLINE
    0x1A0,  # MSR_IA32_MISC_ENABLE
    0xCE,  # MSR_PLATFORM_INFO
    0x140,  # MSR_MISC_FEATURES_ENABLES
    MSR_IA32_APICBASE,
    MSR_EFER,
    MSR_IA32_FEAT_CTL,
    0x179, 0x17A, 0x17B,  # MSR_IA32_MCG_CAP, _STATUS, _CTL
    MSR_IA32_MCG_EXT_CTL,
    *range(0x400, 0x400 + 4 * _MCE_BANKS),  # MSR_IA32_MC0_CTL ... MSR_IA32_MCx_CTL(banks) - 1
    *range(0x280, 0x280 + _MCE_BANKS),  # MSR_IA32_MC0_CTL2 ... MSR_IA32_MCx_CTL2(banks) - 1
    MSR_KVM_POLL_CONTROL,
    # the x2APIC registers KVM emulates for TDX as for other guests (not the CPU-virtualised ones)
    *(_x2apic(r) for r in (0x20, 0x30, 0xD0, 0xF0, 0x280, 0x2F0, 0x300, 0x320, 0x330, 0x340, 0x350, 0x360,
                           0x370, 0x380, 0x390, 0x3E0)),
})
#: tdx_is_read_only_msr(): a TD's write fails with 1
TDX_READ_ONLY_MSRS = frozenset({MSR_IA32_APICBASE, MSR_EFER, MSR_IA32_FEAT_CTL})

#: The MSRs whose accesses KVM does not intercept for an SEV-ES/SNP guest: svm_recalc_msr_intercepts()
#: passes STAR, LSTAR, CSTAR, SYSCALL_MASK, FS/GS/KERNEL_GS_BASE and SYSENTER_CS through for every
#: guest, sev_es_recalc_msr_intercepts() the GHCB MSR, EFER and PAT (TSC_AUX and XSS only with
#: RDTSCP/RDPID and XSAVES in the guest's CPUID, which the testbed's CPUID does not advertise).
#: Asked for through the GHCB, sev_es_prevent_msr_access() refuses them (KVM_MSR_RET_EINVAL).
SEV_ES_UNINTERCEPTED_MSRS = frozenset({
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, SYSCALL_MASK
    0xC0000100, 0xC0000101, 0xC0000102,  # FS_BASE, GS_BASE, KERNEL_GS_BASE
    0x174,  # MSR_IA32_SYSENTER_CS
    MSR_AMD64_SEV_ES_GHCB, MSR_EFER, MSR_IA32_CR_PAT,
})


def kvm_msr_reason(ret: int) -> int:
    """kvm_msr_reason(): the run->msr.reason a failed access reports."""
    if ret == KVM_MSR_RET_UNSUPPORTED:
        return KVM_MSR_EXIT_REASON_UNKNOWN
    if ret == KVM_MSR_RET_FILTERED:
        return KVM_MSR_EXIT_REASON_FILTER
    return KVM_MSR_EXIT_REASON_INVAL


@dataclass(frozen=True, slots=True)
class MsrFilterRange:
    """One struct kvm_msr_filter_range: bitmap bit i set = access to base + i allowed."""

    flags: int
    base: int
    nmsrs: int
    bitmap: bytes

    def covers(self, index: int, access: int) -> bool | None:
        """None if the range does not apply to (index, access); else whether it allows it."""
        if not self.flags & access or not self.base <= index < self.base + self.nmsrs:
            return None
        bit = index - self.base
        return bool(self.bitmap[bit // 8] >> (bit % 8) & 1)


@dataclass(frozen=True, slots=True)
class MsrFilter:
    """struct kvm_msr_filter as KVM keeps it (kvm_vm_ioctl_set_msr_filter())."""

    flags: int = KVM_MSR_FILTER_DEFAULT_ALLOW
    ranges: tuple[MsrFilterRange, ...] = ()

    @classmethod
    def deny(cls, *indices: int, access: int = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE) -> MsrFilter:
        """A default-allow filter that denies `indices` (one range of one MSR each)."""
        return cls(KVM_MSR_FILTER_DEFAULT_ALLOW, tuple(MsrFilterRange(access, i, 1, b"\x00") for i in indices))

    def validate(self) -> None:
        """kvm_vm_ioctl_set_msr_filter() / kvm_add_msr_filter(): EINVAL for bad flags, too many
        ranges, a range with no or unknown flags, or a bitmap that is empty, too large or shorter
        than nmsrs bits."""
        name = "KVM_X86_SET_MSR_FILTER"
        if self.flags & ~KVM_MSR_FILTER_VALID_MASK:
            raise KvmIoctlError(name, errno.EINVAL, f"flags 0x{self.flags:x}")
        if len(self.ranges) > KVM_MSR_FILTER_MAX_RANGES:
            raise KvmIoctlError(name, errno.EINVAL, f"{len(self.ranges)} ranges (at most {KVM_MSR_FILTER_MAX_RANGES})")
        for r in self.ranges:
            if not r.flags or r.flags & ~KVM_MSR_FILTER_RANGE_VALID_MASK:
                raise KvmIoctlError(name, errno.EINVAL, f"range flags 0x{r.flags:x}")
            size = (r.nmsrs + 7) // 8
            if not r.nmsrs or size > KVM_MSR_FILTER_MAX_BITMAP_SIZE or len(r.bitmap) < size:
                raise KvmIoctlError(name, errno.EINVAL, f"range at 0x{r.base:x}: {r.nmsrs} MSRs")

    def allowed(self, index: int, access: int) -> bool:
        """kvm_msr_allowed(): the x2APIC MSRs are never filtered ("x2APIC MSRs do not support
        filtering"); otherwise the first range that covers the access decides, else the default."""
        if X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST:
            return True
        for r in self.ranges:
            verdict = r.covers(index, access)
            if verdict is not None:
                return verdict
        return not self.flags & KVM_MSR_FILTER_DEFAULT_DENY


@dataclass
class PvMsrState:
    """The per-vCPU state behind the PV MSRs (what a read of each returns)."""

    #: MSR_KVM_POLL_CONTROL starts at 1 (kvm_arch_vcpu_create(): msr_kvm_poll_control = 1)
    values: dict[int, int] = field(default_factory=lambda: {MSR_KVM_POLL_CONTROL: 1})

    def get(self, index: int, has_feature: bool) -> tuple[int, int]:
        """kvm_get_msr_common() for one index: (ret, value)."""
        feature = PV_MSR_FEATURES.get(index)
        if feature is None:
            return KVM_MSR_RET_UNSUPPORTED, 0
        if not has_feature:
            return KVM_MSR_RET_ERR, 0
        if index == MSR_KVM_ASYNC_PF_ACK:
            return MSR_OK, 0  # "msr_info->data = 0"
        return MSR_OK, self.values.get(index, 0)

    def set(self, index: int, value: int, has_feature: bool) -> int:
        """kvm_set_msr_common() for one index: the return value.

        The value checks modelled are the ones that need no host state: POLL_CONTROL accepts
        only bit 0 and ASYNC_PF_ACK only acknowledges. The others are stored (KVM also maps
        the guest pages they name, which the testbed does not model).
        """
        feature = PV_MSR_FEATURES.get(index)
        if feature is None:
            return KVM_MSR_RET_UNSUPPORTED
        if not has_feature:
            return KVM_MSR_RET_ERR
        if index == MSR_KVM_POLL_CONTROL and value & (U64 ^ 1):
            return KVM_MSR_RET_ERR  # "only enable bit supported"
        if index != MSR_KVM_ASYNC_PF_ACK:
            self.values[index] = value & U64
        return MSR_OK


def msr_value(eax: int, edx: int) -> int:
    """EDX:EAX as WRMSR reads them."""
    return (eax & U32) | ((edx & U32) << 32)
