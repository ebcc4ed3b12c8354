"""The VM as KVM keeps it: VM type, capabilities userspace enabled, quirks, CPUID, encryption.

Userspace (the vmm layer) configures it through the same verbs as the real ioctls
(`enable_cap`, `check_extension`, `set_cpuid`); invalid arguments raise KvmIoctlError with the
errno the ioctl would return.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from testbed.hw.exits import Vendor
from testbed.hw.memory import HostMemory
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.memattr import MemoryAttributes
from testbed.kvm.uapi import (
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
    KVM_CAP_EXIT_HYPERCALL,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_VM_TYPES,
    KVM_EXIT_HYPERCALL_VALID_MASK,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_QUIRK_FIX_HYPERCALL_INSN,
    KvmVmType,
)
from testbed.tracker.bitmap import BitmapTracker

__all__ = ["CpuidEntry", "CpuidTable", "KvmIoctlError", "KvmVm"]

#: Quirks KVM_CAP_DISABLE_QUIRKS2 accepts (the subset the testbed models).
KVM_X86_VALID_QUIRKS = KVM_X86_QUIRK_FIX_HYPERCALL_INSN


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One kvm_cpuid_entry2: the registers the guest reads for (function, index)."""

    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass
class CpuidTable:
    """KVM_SET_CPUID2: the guest's CPUID, as userspace set it."""

    entries: dict[tuple[int, int], CpuidEntry] = field(default_factory=dict)
    #: functions whose result depends on ECX (the others ignore the subleaf)
    indexed: set[int] = field(default_factory=set)

    def set(self, entry: CpuidEntry, indexed: bool = False) -> None:
        """Add or replace an entry."""
        self.entries[(entry.function, entry.index if indexed else 0)] = entry
        if indexed:
            self.indexed.add(entry.function)

    def lookup(self, function: int, index: int) -> tuple[int, int, int, int]:
        """kvm_cpuid(): the entry's registers, or zeros for a leaf userspace did not set.

        (KVM's out-of-range rule for Intel, returning the highest basic leaf, is not modelled:
        every leaf the testbed's guests read is set explicitly.)
        """
        key = (function, index if function in self.indexed else 0)
        e = self.entries.get(key)
        if e is None:
            return (0, 0, 0, 0)
        return (e.eax, e.ebx, e.ecx, e.edx)

    def eax(self, function: int) -> int:
        """EAX of a leaf (e.g. the PV feature word)."""
        return self.lookup(function, 0)[0]


class KvmVm:
    """One VM: what KVM_CREATE_VM returns and its VM-wide state."""

    def __init__(self, vm_type: KvmVmType, vendor: Vendor, memory: HostMemory, c_bit: int = 51) -> None:
        self.type = vm_type
        self.c_bit = c_bit
        #: GHCB protocol version for SEV-ES/SNP (KVM_SEV_INIT2's ghcb_version, default 2)
        self.ghcb_version = 2
        self.vendor = vendor
        self.memory = memory
        self.hypercall_exit_mask = 0
        self.disabled_quirks = 0
        self.cpuid = CpuidTable()
        self.enforce_pv_feature_cpuid = False
        guest_pages = memory.size >> 12
        # VMs with private memory keep attributes; they start private where the VMM's
        # launch flow makes all RAM private (sev, sev-snp), shared otherwise (sw-protected).
        self.mem_attrs: MemoryAttributes | None = None
        if self.has_private_mem:
            self.mem_attrs = MemoryAttributes(guest_pages, initially_private=self.sev)
        #: called with (first_gfn, end_gfn, private) for every attribute change (the RMP follows)
        self.on_attributes_range: Callable[[int, int, bool], None] | None = None
        #: seed-era protocol: KVM_HC_PAGE_ENC_STATUS handled in the kernel into a bitmap
        self.page_enc_status_protocol = False
        self.page_enc_bitmap = BitmapTracker(guest_pages, 1)
        #: called after attributes change (stage-2 mappings are zapped)
        self.on_attributes_changed: Callable[[], None] | None = None

    # -- KVM_CHECK_EXTENSION / KVM_ENABLE_CAP --------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM."""
        if cap == KVM_CAP_EXIT_HYPERCALL:
            return KVM_EXIT_HYPERCALL_VALID_MASK
        if cap == KVM_CAP_DISABLE_QUIRKS2:
            return KVM_X86_VALID_QUIRKS
        if cap == KVM_CAP_ENFORCE_PV_FEATURE_CPUID:
            return 1
        if cap == KVM_CAP_MEMORY_ATTRIBUTES:
            return KVM_MEMORY_ATTRIBUTE_PRIVATE if self.mem_attrs is not None else 0
        if cap == KVM_CAP_VM_TYPES:
            return sum(1 << t for t in KvmVmType if t != KvmVmType.KVM_X86_TDX_VM)
        return 0

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP; raises KvmIoctlError(EINVAL) exactly where KVM does."""
        arg0 = args[0] if args else 0
        if cap == KVM_CAP_EXIT_HYPERCALL:
            if arg0 & ~KVM_EXIT_HYPERCALL_VALID_MASK:
                raise KvmIoctlError("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)", errno.EINVAL, f"mask 0x{arg0:x}")
            self.hypercall_exit_mask = arg0
        elif cap == KVM_CAP_DISABLE_QUIRKS2:
            if arg0 & ~KVM_X86_VALID_QUIRKS:
                raise KvmIoctlError("KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2)", errno.EINVAL, f"quirks 0x{arg0:x}")
            self.disabled_quirks |= arg0
        elif cap == KVM_CAP_ENFORCE_PV_FEATURE_CPUID:
            # A vCPU capability in KVM; the testbed has one vCPU, so it lives here.
            self.enforce_pv_feature_cpuid = bool(arg0)
        else:
            raise KvmIoctlError("KVM_ENABLE_CAP", errno.EINVAL, f"capability {cap} not supported")

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES."""
        if self.mem_attrs is None:
            if attributes:
                raise KvmIoctlError("KVM_SET_MEMORY_ATTRIBUTES", errno.EINVAL,
                                    f"VM type {self.type.name} supports no memory attributes")
            return
        before = self.mem_attrs.updates
        self.mem_attrs.set(address, size, attributes, flags)
        if self.mem_attrs.updates != before:
            if self.on_attributes_range is not None:
                # KVM makes gmem pages private in the RMP when it maps them, and shared again
                # when they are freed (sev_gmem_prepare / sev_gmem_invalidate).
                self.on_attributes_range(address >> 12, (address + size) >> 12,
                                         bool(attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE))
            if self.on_attributes_changed is not None:
                self.on_attributes_changed()

    @property
    def has_private_mem(self) -> bool:
        """kvm_arch_has_private_mem(): the VM types with memory attributes.

        Testbed extension: the legacy KVM_X86_SEV_VM has no attributes in KVM; the testbed
        gives it the same attribute tracking as SNP, so a guest whose C-bit disagrees with
        what it told the host is caught (as KVM_EXIT_MEMORY_FAULT) instead of silently
        desynchronising the host's view (the live-migration hazard of the seed threads).
        """
        return self.type in (KvmVmType.KVM_X86_SW_PROTECTED_VM, KvmVmType.KVM_X86_SEV_VM, KvmVmType.KVM_X86_SNP_VM,
                             KvmVmType.KVM_X86_TDX_VM)

    @property
    def snp(self) -> bool:
        """An SEV-SNP VM."""
        return self.type == KvmVmType.KVM_X86_SNP_VM

    def quirk_enabled(self, quirk: int) -> bool:
        """kvm_check_has_quirk()."""
        return not self.disabled_quirks & quirk

    def set_cpuid(self, table: CpuidTable) -> None:
        """KVM_SET_CPUID2."""
        self.cpuid = table

    @property
    def protected_state(self) -> bool:
        """Guest register state is encrypted (SEV-ES, SNP, TDX): KVM cannot read it."""
        return self.type in (KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM, KvmVmType.KVM_X86_TDX_VM)

    @property
    def sev(self) -> bool:
        """Any SEV flavour."""
        return self.type in (KvmVmType.KVM_X86_SEV_VM, KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM)

