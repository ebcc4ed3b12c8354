"""KVM's hypercall dispatch: ____kvm_emulate_hypercall() of arch/x86/kvm/x86.c.

Pure logic over plain values, so it can be tested without a CPU. The caller (kvm/vcpu.py)
reads the registers, calls `emulate_hypercall`, and either completes at once (RAX = ret,
RIP past the instruction) or exits to userspace with the returned HypercallExit and completes
when userspace answers (complete_hypercall_exit()).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from testbed.hw.exits import Vendor
from testbed.kvm.page_enc import PageEncBitmap
from testbed.kvm.uapi import (
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EOPNOTSUPP,
    KVM_EPERM,
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_FEATURE_PV_SCHED_YIELD,
    KVM_FEATURE_PV_SEND_IPI,
    KVM_FEATURE_PV_UNHALT,
    KVM_HC_CLOCK_PAIRING,
    KVM_HC_KICK_CPU,
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_SCHED_YIELD,
    KVM_HC_SEND_IPI,
    KVM_HC_TESTBED_DONATE_ENC_STATUS,
    KVM_HC_VAPIC_POLL_IRQ,
    HypercallExit,
)
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE, U32, U64

#: ICR bits kvm_pv_send_ipi() refuses (arch/x86/include/asm/apicdef.h): logical destination
#: mode and the destination shorthand field.
APIC_DEST_MASK = 0x800
APIC_SHORT_MASK = 0xC0000


@dataclass(frozen=True, slots=True)
class PvCpuid:
    """The guest's KVM PV features (CPUID 0x40000001.EAX) and whether KVM enforces them.

    guest_pv_has() is true for every feature unless userspace enabled
    KVM_CAP_ENFORCE_PV_FEATURE_CPUID on the vCPU (arch/x86/kvm/cpuid.h).
    """

    features: int = 0
    enforce: bool = False

    def has(self, feature: int) -> bool:
        """guest_pv_has(vcpu, feature)."""
        return not self.enforce or bool(self.features & (1 << feature))


class HypercallOutcome(NamedTuple):
    """Either an in-kernel result (`ret`) or a user exit to complete later; `not_modelled`
    names what KVM would do next that the testbed does not model (the run ends there).

    A NamedTuple rather than a frozen dataclass: it is built on every hypercall."""

    ret: int
    user_exit: HypercallExit | None = None
    not_modelled: str | None = None


def neg(errno: int) -> int:
    """-errno as the unsigned long KVM stores in RAX."""
    return (-errno) & U64


#: The numbers ____kvm_emulate_hypercall()'s switch has a case for; any other is -KVM_ENOSYS.
_SWITCH_CASES = frozenset({KVM_HC_VAPIC_POLL_IRQ, KVM_HC_KICK_CPU, KVM_HC_CLOCK_PAIRING, KVM_HC_SEND_IPI,
                           KVM_HC_SCHED_YIELD, KVM_HC_MAP_GPA_RANGE, KVM_HC_TESTBED_DONATE_ENC_STATUS})
_EPERM = HypercallOutcome(neg(KVM_EPERM))
_ENOSYS = HypercallOutcome(neg(KVM_ENOSYS))


def emulate_hypercall(
    nr: int,
    a0: int,
    a1: int,
    a2: int,
    a3: int,
    cpl: int,
    op_64_bit: bool,
    pv: PvCpuid,
    exit_mask: int,
    apic_map: bool = False,
) -> HypercallOutcome:
    """Dispatch hypercall `nr` as ____kvm_emulate_hypercall() does.

    (No keyword-only parameters: the native-hypercall fastpath calls it positionally, which
    CPython does measurably faster than with keywords.)

    `exit_mask` is the VM's KVM_CAP_EXIT_HYPERCALL bitmask; `apic_map`: the VM has an in-kernel
    local APIC, so KVM has an APIC map (a TD: tdx_vcpu_create requires a split irqchip). The
    returned `ret` is not yet truncated for 32-bit callers: the completion does that (as KVM's
    does).
    """
    if not op_64_bit:
        nr &= U32
        a0 &= U32
        a1 &= U32
        a2 &= U32
        a3 &= U32
    # The CPL check comes before the switch, for every hypercall number.
    if cpl != 0:
        return _EPERM
    if nr not in _SWITCH_CASES:
        return _ENOSYS  # the switch's default (a prebuilt outcome: the hot path of an unknown nr)
    # The switch's cases, MAP_GPA_RANGE first: the most frequent (one per conversion), and an
    # if-chain, unlike the switch's jump table, pays for every case tested before the one taken.
    if nr == KVM_HC_MAP_GPA_RANGE:
        gpa, npages, attrs = a0, a1, a2
        if not exit_mask & (1 << KVM_HC_MAP_GPA_RANGE):
            return HypercallOutcome(neg(KVM_ENOSYS))
        gfn = gpa >> PAGE_SHIFT
        if gpa & (PAGE_SIZE - 1) or not npages or ((gfn + npages) & U64) <= gfn:
            return HypercallOutcome(neg(KVM_EINVAL))
        flags = KVM_EXIT_HYPERCALL_LONG_MODE if op_64_bit else 0
        # run->hypercall.ret is pre-set to 0: QEMU <= 9.2 assumed KVM never changes it.
        run = HypercallExit(KVM_HC_MAP_GPA_RANGE, (gpa, npages, attrs, 0, 0, 0), 0, flags)  # nr, args, ret, flags
        return HypercallOutcome(0, run)
    ret = _ENOSYS.ret
    if nr == KVM_HC_VAPIC_POLL_IRQ:
        ret = 0
    elif nr == KVM_HC_KICK_CPU:
        if pv.has(KVM_FEATURE_PV_UNHALT):
            ret = 0  # kvm_pv_kick_cpu_op() + kvm_sched_yield(): nothing to wake in a 1-vCPU VM
    elif nr == KVM_HC_CLOCK_PAIRING:
        # kvm_pv_clock_pairing(): a clock type other than KVM_CLOCK_PAIRING_WALLCLOCK, or a
        # host clocksource that is not TSC-based (the testbed's never is), -> -KVM_EOPNOTSUPP.
        ret = neg(KVM_EOPNOTSUPP)
    elif nr == KVM_HC_SEND_IPI:
        if pv.has(KVM_FEATURE_PV_SEND_IPI):
            # kvm_pv_send_ipi(kvm, a0 = ipi_bitmap_low, a1 = ipi_bitmap_high, a2 = min, a3 = icr)
            # (arch/x86/kvm/lapic.c): an ICR with destination-mode or shorthand bits is
            # -KVM_EINVAL, checked before the APIC map; without an in-kernel local APIC the map
            # is NULL and the count stays -EOPNOTSUPP; with one, the count of IPIs delivered.
            if a3 & (APIC_DEST_MASK | APIC_SHORT_MASK):
                ret = neg(KVM_EINVAL)
            elif not apic_map:
                ret = neg(KVM_EOPNOTSUPP)
            elif pv_send_ipi_count(a0, a2):
                return HypercallOutcome(1, None, "KVM_HC_SEND_IPI to this vCPU (APIC ID 0): KVM delivers "
                                                 f"the interrupt (vector 0x{a3 & 0xFF:x}), which the testbed "
                                                 "does not model")
            else:
                ret = 0
    elif nr == KVM_HC_SCHED_YIELD:
        if pv.has(KVM_FEATURE_PV_SCHED_YIELD):
            ret = 0
    elif nr == KVM_HC_TESTBED_DONATE_ENC_STATUS:
        # Testbed extension (uapi.py): no such case in KVM's switch. Forwarded untouched, as
        # user_exit_on_hypercall() forwards MAP_GPA_RANGE, when the VMM enabled its bit; the
        # VMM validates everything (vmm/donate.py). Without the bit it is what KVM answers for
        # an unknown number, -KVM_ENOSYS.
        if not exit_mask & (1 << KVM_HC_TESTBED_DONATE_ENC_STATUS):
            return _ENOSYS
        flags = KVM_EXIT_HYPERCALL_LONG_MODE if op_64_bit else 0
        run = HypercallExit(nr=KVM_HC_TESTBED_DONATE_ENC_STATUS, args=(a0, a1, a2, 0, 0, 0), ret=0, flags=flags)
        return HypercallOutcome(0, run)
    return HypercallOutcome(ret)


def pv_send_ipi_count(ipi_bitmap_low: int, min_id: int) -> int:
    """__pv_send_ipi() over the APIC map of a VM with one vCPU, APIC ID 0 (max_apic_id 0): a
    `min` (u32) above 0 reaches nothing, and the high bitmap starts a cluster above it; else
    bit 0 of the low bitmap is the IPI to vCPU 0."""
    if min_id & U32:
        return 0
    return ipi_bitmap_low & 1


def complete_ret(ret: int, op_64_bit: bool) -> int:
    """The value written to RAX: truncated to u32 for a 32-bit caller."""
    return ret & U32 if not op_64_bit else ret & U64


#: The seed-era number: the same 12 that KVM_HC_MAP_GPA_RANGE later took.
KVM_HC_PAGE_ENC_STATUS = 12


class PageEncStatusVm(Protocol):
    """What the seed-era handler needs from the VM: whether it is an SEV guest (sev_guest()),
    its vendor (kvm_x86_ops.page_enc_status_hc exists on SVM only) and its page-encryption
    bitmap (kvm/page_enc.py)."""

    @property
    def sev(self) -> bool: ...

    @property
    def vendor(self) -> Vendor: ...

    @property
    def page_enc_bitmap(self) -> PageEncBitmap: ...


def page_enc_status_hc(vm: PageEncStatusVm, gpa: int, npages: int, enc: int) -> HypercallOutcome:
    """KVM_HC_PAGE_ENC_STATUS(a0 = gpa, a1 = npages, a2 = enc) as the SEV live-migration series
    v9 (Ashish Kalra, 8 Dec 2020; never merged) handles it: patch 08/18 "KVM: X86: Introduce
    KVM_HC_PAGE_ENC_STATUS hypercall" (x86.c's case and svm_page_enc_status_hc() in
    arch/x86/kvm/svm/sev.c), with the bitmap sized by 12/18 (kvm/page_enc.py). Its
    Documentation/virt/kvm/hypercalls.rst: "a0: the guest physical address of the start page /
    a1: the number of pages / a2: encryption attribute ... 1: Encryption attribute is set /
    0: Encryption attribute is cleared".

    Handled inside KVM, in the order v9 tests:

    * x86.c: ``ret = -KVM_ENOSYS; if (kvm_x86_ops.page_enc_status_hc) ret = ...`` - VMX sets
      ``.page_enc_status_hc = NULL``, so an Intel VM gets -KVM_ENOSYS;
    * ``if (!sev_guest(kvm)) return -EINVAL;`` - a VM that is not SEV;
    * ``if (!npages) return 0;`` - zero pages: success, nothing changes;
    * ``gfn_start = gpa_to_gfn(gpa); gfn_end = gfn_start + npages;`` - an unaligned GPA is
      truncated to its frame, not refused; the sum is a u64 (gfn_t);
    * ``if (gfn_end <= gfn_start) return -EINVAL;`` - only a range that wraps is -EINVAL;
    * ``gfn_to_pfn()`` of gfn_start and gfn_end: -EINVAL only for an error pfn that is not
      "no slot" (a GFN outside every memslot is allowed: guest MMIO). Every testbed memslot is
      backed, so this never fails here;
    * ``if (sev->page_enc_bmap_size < gfn_end) goto unlock; ... return 0;`` - a range reaching
      past the bitmap is dropped whole and the guest is told 0;
    * else ``__bitmap_set`` (any nonzero enc: ``if (enc)``) or ``__bitmap_clear`` of
      [gfn_start, gfn_end), and 0.

    The caller (kvm/vcpu.py) applies the CPL check of kvm_emulate_hypercall() first.
    """
    if vm.vendor is not Vendor.AMD:
        return _ENOSYS  # vmx_x86_ops.page_enc_status_hc = NULL
    if not vm.sev:
        return HypercallOutcome(neg(KVM_EINVAL))
    if not npages:
        return HypercallOutcome(0)
    gfn_start = (gpa & U64) >> PAGE_SHIFT
    gfn_end = (gfn_start + npages) & U64
    if gfn_end <= gfn_start:
        return HypercallOutcome(neg(KVM_EINVAL))
    bitmap = vm.page_enc_bitmap
    if bitmap.guest_pages < gfn_end:
        return HypercallOutcome(0)  # goto unlock: ignored, and 0
    bitmap.set_encrypted(gfn_start, gfn_end - gfn_start, bool(enc))
    return HypercallOutcome(0)
