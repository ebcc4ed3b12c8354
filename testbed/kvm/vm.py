"""The VM as KVM keeps it: VM type, capabilities userspace enabled, quirks, CPUID, encryption.

Userspace (the vmm layer) configures it through the same verbs as the real ioctls
(`enable_cap`, `check_extension`, `set_cpuid`); invalid arguments raise KvmIoctlError with the
errno the ioctl would return.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from testbed.hw.exits import VcpuHardware, Vendor
from testbed.hw.memory import HostMemory, StagePrivacy
from testbed.kvm.dirty_log import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_USER_MEM_SLOTS,
    DirtyLog,
    DirtyMarkingMemory,
)
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.memattr import MemoryAttributes, validate_attributes
from testbed.kvm.msr import (
    KVM_CAP_X86_MSR_FILTER,
    KVM_CAP_X86_USER_SPACE_MSR,
    KVM_MSR_EXIT_REASON_VALID_MASK,
    MsrFilter,
)
from testbed.kvm.page_enc import PageEncBitmap
from testbed.kvm.uapi import (
    KVM_CAP_DISABLE_QUIRKS,
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
    KVM_CAP_EXIT_HYPERCALL,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO,
    KVM_CAP_USER_MEMORY,
    KVM_CAP_VM_TYPES,
    KVM_CPUID_FEATURES,
    KVM_CPUID_SIGNATURE,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    TESTBED_EXIT_HYPERCALL_VALID_MASK,
    KvmVmType,
)
from testbed.kvm.version import REFERENCE, KvmVersion
from testbed.x86 import U64
from testbed.x86.addr import Gfn, Gpa

__all__ = ["CpuidEntry", "CpuidTable", "KvmIoctlError", "KvmVm"]

#: KVM_X86_VALID_QUIRKS (arch/x86/include/asm/kvm_host.h): KVM_X86_QUIRK_LINT0_REENABLED (bit 0)
#: through KVM_X86_QUIRK_VMCS12_FREEZE_IN_SMM_CC (bit 10, kvm-x86 2026), as
#: arch/x86/include/uapi/asm/kvm.h defines them. The testbed models the effect of
#: FIX_HYPERCALL_INSN only; the others are accepted and recorded.
KVM_X86_VALID_QUIRKS = (1 << 11) - 1
KVM_X86_QUIRK_IGNORE_GUEST_PAT = 1 << 9
#: "KVMKVMKVM\0\0\0" as EBX, ECX, EDX of the signature leaf (KVM_SIGNATURE)
KVM_SIGNATURE_REGS = tuple(int.from_bytes(b"KVMKVMKVM\0\0\0"[i : i + 4], "little") for i in (0, 4, 8))


def supported_quirks(vendor: Vendor) -> int:
    """kvm_caps.supported_quirks: KVM_X86_VALID_QUIRKS less IGNORE_GUEST_PAT where KVM cannot
    ignore guest PAT (kvm_mmu_may_ignore_guest_pat() is false without EPT, i.e. on AMD)."""
    quirks = KVM_X86_VALID_QUIRKS
    if vendor is Vendor.AMD:
        quirks &= ~KVM_X86_QUIRK_IGNORE_GUEST_PAT
    return quirks


def _vendor_regs(name: bytes) -> tuple[int, int, int]:
    return (int.from_bytes(name[0:4], "little"), int.from_bytes(name[4:8], "little"),
            int.from_bytes(name[8:12], "little"))


#: CPUID.0 EBX, EDX, ECX of the vendors is_guest_vendor_amd()/is_guest_vendor_hygon() match:
#: no out-of-range redirection for them (cpuid.c get_out_of_range_cpuid_entry).
_AMD_LIKE_VENDORS = frozenset({_vendor_regs(b"AuthenticAMD"), _vendor_regs(b"HygonGenuine")})


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

    def find(self, function: int, index: int) -> CpuidEntry | None:
        """kvm_find_cpuid_entry_index(): the entry for (function, index); the index counts only
        for functions whose result depends on ECX."""
        return self.entries.get((function, index if function in self.indexed else 0))

    def lookup(self, function: int, index: int) -> tuple[int, int, int, int]:
        """kvm_cpuid(..., exact_only=false) (cpuid.c), what a guest's CPUID returns: the entry's
        registers; for a function above its class's range (basic, 0x400000xx, 0x80000000 or
        0xc0000000) on a guest whose vendor is not AMD or Hygon, the highest basic leaf's entry
        at the same index (get_out_of_range_cpuid_entry); otherwise zeros, but for leaves 0xB and
        0x1F, which keep ECX[7:0] and the x2APIC ID in EDX from index 1 when that exists."""
        e = self.find(function, index)
        if e is None:
            redirected = self._out_of_range(function)
            if redirected is not None:
                function = redirected
                e = self.find(function, index)
        if e is not None:
            return (e.eax, e.ebx, e.ecx, e.edx)
        if function in (0xB, 0x1F):
            one = self.find(function, 1)
            if one is not None:
                return (0, 0, index & 0xFF, one.edx)
        return (0, 0, 0, 0)

    def _out_of_range(self, function: int) -> int | None:
        """get_out_of_range_cpuid_entry(): the highest basic leaf, when `function` lies beyond
        its class's maximum (or its class has no entry) and the guest's vendor (leaf 0) is
        neither AuthenticAMD nor HygonGenuine; None otherwise."""
        basic = self.entries.get((0, 0))
        if basic is None or (basic.ebx, basic.edx, basic.ecx) in _AMD_LIKE_VENDORS:
            return None
        if 0x40000000 <= function <= 0x4FFFFFFF:
            cls = self.entries.get((function & 0xFFFFFF00, 0))
        elif function >= 0xC0000000:
            cls = self.entries.get((0xC0000000, 0))
        else:
            cls = self.entries.get((function & 0x80000000, 0))
        if cls is not None and function <= cls.eax:
            return None
        return basic.eax

    def eax(self, function: int) -> int:
        """EAX of a leaf as KVM reads its own table (kvm_find_cpuid_entry: exact, 0 if absent)."""
        e = self.find(function, 0)
        return e.eax if e is not None else 0

    def kvm_cpuid_base(self) -> int:
        """kvm_get_hypervisor_cpuid(vcpu, KVM_SIGNATURE) (arch/x86/kvm/cpuid.c): the first base
        0x40000000, 0x40000100, ... 0x4000ff00 whose leaf holds "KVMKVMKVM\0\0\0" in EBX/ECX/EDX
        (for_each_possible_cpuid_base_hypervisor); 0 if none does."""
        for base in range(KVM_CPUID_SIGNATURE, 0x40010000, 0x100):
            e = self.entries.get((base, 0))
            if e is not None and (e.ebx, e.ecx, e.edx) == KVM_SIGNATURE_REGS:
                return base
        return 0

    def pv_features(self) -> int:
        """kvm_apply_cpuid_pv_features_quirk() (cpuid.c): EAX of base | KVM_CPUID_FEATURES at the
        KVM signature's base; no signature, or no features leaf there, means no PV features."""
        base = self.kvm_cpuid_base()
        if not base:
            return 0
        e = self.entries.get((base | (KVM_CPUID_FEATURES & 0xFF), 0))
        return e.eax if e is not None else 0


_ULONG_MAX = (1 << 64) - 1
_INT_MAX = 0x7FFFFFFF


def _npages(addr: int, size: int) -> int:
    """The pages [addr, addr + size) covers (sev_pin_memory: the range need not be aligned)."""
    return ((addr + size - 1) >> 12) - (addr >> 12) + 1


def host_totalram_pages() -> int:
    """This host's RAM in 4 KiB pages (sysconf _SC_PHYS_PAGES, the kernel's totalram_pages()
    as /proc/meminfo MemTotal shows it): a value for `KvmVm(totalram_pages=...)`."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 12


class KvmVm:
    """One VM: what KVM_CREATE_VM returns and its VM-wide state."""

    def __init__(self, vm_type: KvmVmType, vendor: Vendor, memory: HostMemory, c_bit: int = 51,
                 kvm_version: KvmVersion = REFERENCE, *, ghcb_version: int = 2,
                 page_enc_status_protocol: bool = False, gpaw: int = 48, ram_hva: int | None = None,
                 memlock_limit_pages: int | None = None, totalram_pages: int | None = None) -> None:
        self.type = vm_type
        #: TDX: the guest physical address width, 48 or 52 (KVM_TDX_INIT_VM's CPUID
        #: 0x80000008.EAX[23:16]); the shared bit is GPA bit gpaw - 1 (kvm->arch.gfn_direct_bits)
        self.gpaw = gpaw
        #: kvm_vm_dead(): every later KVM_RUN fails with EIO (kvm/tdx.py, "Guest access before
        #: accepting")
        self.dead = False
        self.c_bit = c_bit
        #: which KVM is modelled where the reference tree and the release differ (kvm/version.py)
        self.kvm_version = kvm_version
        #: GHCB protocol version for SEV-ES/SNP (KVM_SEV_INIT2's ghcb_version, default 2)
        self.ghcb_version = ghcb_version
        self.vendor = vendor
        #: the hardware's RAM shrinks to this many bytes when the topmost slot is deleted (set by
        #: the composition root: GuestMemory.unplug)
        self.unplug_ram: Callable[[int], None] | None = None
        #: the RAM's dirty log (KVM_MEM_LOG_DIRTY_PAGES, KVM_GET/CLEAR_DIRTY_LOG), sized for the
        #: memory the VM can grow to (the testbed logs hotplugged RAM in the same bitmap)
        self.dirty_log = DirtyLog(memory.capacity >> 12, flush=self._flush_remote_tlbs, slots=lambda: self.memslots,
                                  nr_as_ids=1 if self.guest_memfd else 2)
        #: KVM's accessors of guest memory: a write marks the page dirty (kvm_write_guest)
        self.memory: DirtyMarkingMemory = DirtyMarkingMemory(memory, self.dirty_log)
        self.hypercall_exit_mask = 0
        self.disabled_quirks = 0
        self.cpuid = CpuidTable()
        #: vcpu->arch.pv_cpuid.features, computed at KVM_SET_CPUID2 (kvm_vcpu_after_set_cpuid)
        self.pv_features = 0
        self.enforce_pv_feature_cpuid = False
        #: KVM_CAP_X86_USER_SPACE_MSR's reasons (kvm->arch.user_space_msr_mask)
        self.user_space_msr_mask = 0
        #: KVM_X86_SET_MSR_FILTER (kvm->arch.msr_filter); None = no filter (allow all)
        self.msr_filter: MsrFilter | None = None
        # Sized for the memory the VM can grow to (memory hotplug: `capacity`).
        guest_pages = self.memory.capacity >> 12
        # VMs with private memory keep attributes; they start private where the VMM's
        # launch flow makes all RAM private (sev, sev-snp), shared otherwise (sw-protected).
        # The seed-era KVM (page_enc_status_protocol) had no memory attributes: the in-kernel
        # bitmap was all it kept.
        self.mem_attrs: MemoryAttributes | None = None
        if self.has_private_mem and not page_enc_status_protocol:
            # A TD's RAM is private from the start too (QEMU sets the attribute on all of a
            # TD's guest_memfd-backed RAM; what KVM_TDX_INIT_MEM_REGION did not add is pending).
            self.mem_attrs = MemoryAttributes(guest_pages, initially_private=self.sev
                                              or vm_type == KvmVmType.KVM_X86_TDX_VM)
        #: seed-era protocol: KVM_HC_PAGE_ENC_STATUS handled in the kernel into a bitmap
        self.page_enc_status_protocol = page_enc_status_protocol
        #: sev->page_enc_bmap (kvm/page_enc.py); userspace reads it with get_page_enc_bitmap
        self.page_enc_bitmap = PageEncBitmap(guest_pages)
        #: the hardware of each vCPU (KVM_CREATE_VCPU): told when stage-2 mappings change,
        #: and driven by the launch commands
        self._vcpu_hw: list[VcpuHardware] = []
        #: the vCPUs whose state is the guest's (guest_state_protected)
        self._protected_vcpus: list[VcpuHardware] = []
        #: KVM_MEMORY_ENCRYPT_REG_REGION: the (userspace address, size) ranges registered and
        #: pinned (sev->regions_list), in order
        self.enc_regions: list[tuple[int, int]] = []
        #: sev->pages_locked: the pages sev_pin_memory() holds pinned for this VM now - every
        #: registered region, plus a LAUNCH_UPDATE_DATA range while that command runs. A page
        #: pinned twice counts twice, as the kernel counts it.
        self.pages_locked = 0
        #: told of every change of pages_locked (the delta): the VMM's pin accounting
        #: (vmm/pinning.py) listens, set by the composition root; KVM imports nothing of it
        self.on_pages_locked: Callable[[int], None] | None = None
        #: the VMM's userspace address of guest RAM: [ram_hva, ram_hva + capacity) is what the
        #: modelled VMM has mapped (its only mapping the model knows), so what sev_pin_memory()
        #: can pin; None: nothing is mapped (a bare KvmVm), every REG_REGION fails to pin
        self.ram_hva = ram_hva
        #: rlimit(RLIMIT_MEMLOCK) >> PAGE_SHIFT of the VMM, checked by sev_check_pin_count();
        #: None: the VMM has CAP_IPC_LOCK (no limit), the default (README: deliberate deviations)
        self.memlock_limit_pages = memlock_limit_pages
        #: totalram_pages() of the modelled host, checked by sev_check_pin_count(); None: not
        #: checked, the default (README: deliberate deviations - the testbed's backing is sparse,
        #: so a legacy guest larger than this host runs); `host_totalram_pages()` is this host's
        self.totalram_pages = totalram_pages
        #: KVM_SET_USER_MEMORY_REGION: slot -> (guest_phys_addr, memory_size); slot 0 is the RAM
        #: the VM was created with, later slots are hotplugged RAM (vmm/hotplug.py)
        self.memslots: dict[int, tuple[int, int]] = {0: (0, memory.size)}

    # -- KVM_CHECK_EXTENSION / KVM_ENABLE_CAP --------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM: KVM's answer for the capabilities whose ioctls and
        exits the testbed models; 0 for the rest (README, Deliberate deviations: e.g.
        KVM_CAP_USER_MEMORY2 and KVM_CAP_GUEST_MEMFD, whose ioctls it has not)."""
        if cap in (KVM_CAP_USER_MEMORY, KVM_CAP_DISABLE_QUIRKS, KVM_CAP_MEMORY_FAULT_INFO):
            # kvm_vm_ioctl_check_extension_generic() / x86.c kvm_vm_ioctl_check_extension(): 1
            return 1
        if cap == KVM_CAP_EXIT_HYPERCALL:
            # KVM's mask plus the testbed's donation hypercall (uapi.py; a deliberate deviation)
            return TESTBED_EXIT_HYPERCALL_VALID_MASK
        if cap == KVM_CAP_DISABLE_QUIRKS2:
            return supported_quirks(self.vendor)
        if cap == KVM_CAP_X86_USER_SPACE_MSR:
            return 1
        if cap == KVM_CAP_X86_MSR_FILTER:
            return 1
        if cap == KVM_CAP_ENFORCE_PV_FEATURE_CPUID:
            return 1
        if cap == KVM_CAP_MEMORY_ATTRIBUTES:
            return KVM_MEMORY_ATTRIBUTE_PRIVATE if self.mem_attrs is not None else 0
        if cap == KVM_CAP_VM_TYPES:
            # kvm_caps.supported_vm_types: DEFAULT and SW_PROTECTED everywhere; the SEV types from
            # sev_hardware_setup() on AMD, TDX from vt_init() on Intel.
            everywhere = (KvmVmType.KVM_X86_DEFAULT_VM, KvmVmType.KVM_X86_SW_PROTECTED_VM)
            amd = self.vendor is Vendor.AMD
            return sum(1 << t for t in KvmVmType if t in everywhere or (t == KvmVmType.KVM_X86_TDX_VM) != amd)
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return KVM_DIRTY_LOG_MANUAL_CAPS
        return 0

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP; raises KvmIoctlError(EINVAL) exactly where KVM does."""
        arg0 = args[0] if args else 0
        if cap == KVM_CAP_EXIT_HYPERCALL:
            if arg0 & ~TESTBED_EXIT_HYPERCALL_VALID_MASK:
                raise KvmIoctlError("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)", errno.EINVAL, f"mask 0x{arg0:x}")
            self.hypercall_exit_mask = arg0
        elif cap == KVM_CAP_DISABLE_QUIRKS2:
            # kvm_vm_ioctl_enable_cap(): any subset of kvm_caps.supported_quirks, else -EINVAL.
            if arg0 & ~supported_quirks(self.vendor):
                raise KvmIoctlError("KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2)", errno.EINVAL, f"quirks 0x{arg0:x}")
            self.disabled_quirks |= arg0
        elif cap == KVM_CAP_DISABLE_QUIRKS:
            # The same without the check: "disabled_quirks |= cap->args[0] &
            # kvm_caps.supported_quirks" - unknown bits are dropped, never an error.
            self.disabled_quirks |= arg0 & supported_quirks(self.vendor)
        elif cap == KVM_CAP_X86_USER_SPACE_MSR:
            # kvm_vm_ioctl_enable_cap(): reasons outside KVM_MSR_EXIT_REASON_VALID_MASK -> -EINVAL.
            if arg0 & ~KVM_MSR_EXIT_REASON_VALID_MASK:
                raise KvmIoctlError("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)", errno.EINVAL, f"reasons 0x{arg0:x}")
            self.user_space_msr_mask = arg0
        elif cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            self.dirty_log.enable_manual_protect(arg0)
        elif cap == KVM_CAP_ENFORCE_PV_FEATURE_CPUID:
            # A vCPU capability in KVM; the testbed has one vCPU, so it lives here.
            self.enforce_pv_feature_cpuid = bool(arg0)
        else:
            raise KvmIoctlError("KVM_ENABLE_CAP", errno.EINVAL, f"capability {cap} not supported")

    def set_msr_filter(self, msr_filter: MsrFilter | None) -> None:
        """KVM_X86_SET_MSR_FILTER (None removes the filter); EINVAL for a malformed filter."""
        if msr_filter is not None:
            msr_filter.validate()
        self.msr_filter = msr_filter

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES: kvm_vm_ioctl_set_mem_attributes() validates flags,
        attributes (against kvm_supported_mem_attributes(): PRIVATE on VMs with private memory,
        nothing on the others), size, wrap-around and alignment on every VM."""
        if self.mem_attrs is None:
            # Valid (attributes 0) on a VM without private memory: nothing to change.
            validate_attributes(address, size, attributes, flags, supported=0)
            return
        attrs = self.mem_attrs
        updates = attrs.updates
        first = (address & U64) >> 12
        last = min(((address & U64) + (size & U64)) >> 12, attrs.guest_pages)
        before = bytes(attrs.private[first:last]) if first < last else b""
        attrs.set(address, size, attributes, flags)
        if attrs.updates == updates:
            return
        # kvm_vm_set_mem_attributes() zaps the stage-2 mappings of what changed; on SNP KVM makes
        # gmem pages private in the RMP when it maps them and shared again when they are freed
        # (sev_gmem_prepare / sev_gmem_invalidate): the hardware does both, for the GFNs whose
        # attribute changed only - a GFN already private keeps its RMP entry, Validated included
        # (its "conversion" frees and prepares nothing).
        private = bool(attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE)
        changed, kept = (b"\x00", b"\x01") if private else (b"\x01", b"\x00")
        pos = before.find(changed)
        while pos >= 0:
            end = before.find(kept, pos)
            end = len(before) if end < 0 else end
            for hw in self._vcpu_hw:
                hw.stage2_changed(Gfn(first + pos), Gfn(first + end), private)
            pos = before.find(changed, end)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int) -> None:
        """KVM_SET_USER_MEMORY_REGION adding a RAM slot (kvm_set_memory_region, virt/kvm/kvm_main.c:
        EINVAL for an unaligned address or size or a slot id out of range, EEXIST for a range
        overlapping another slot; memory_size 0 deletes a slot). Testbed limits (README "Memory
        hotplug"): only the topmost slot may be deleted, and a new one must start where RAM ends
        now (RAM stays one contiguous range from GPA 0) and end within the capacity the VM
        reserved at creation; SEV-SNP and TDX VMs take none (their new RAM would need RMP /
        Secure-EPT state). The caller (vmm/hotplug.py) then grows the hardware's RAM to the new end."""
        name = "KVM_SET_USER_MEMORY_REGION"
        if not 0 <= slot < KVM_USER_MEM_SLOTS or guest_phys_addr % 4096 or memory_size < 0 or memory_size % 4096:
            raise KvmIoctlError(name, errno.EINVAL,
                                f"slot {slot} at 0x{guest_phys_addr:x} size 0x{memory_size:x}")
        old = self.memslots.get(slot)
        if memory_size == 0:
            # memory_size 0 deletes the slot (kvm_set_memory_region: KVM_MR_DELETE; EINVAL if
            # there is none); the testbed keeps RAM contiguous, so only the topmost slot goes.
            if old is None:
                raise KvmIoctlError(name, errno.EINVAL, f"slot {slot} does not exist: nothing to delete")
            base, size = old
            if slot == 0 or base + size != max(b + n for b, n in self.memslots.values()):
                raise KvmIoctlError(name, errno.EINVAL, f"testbed: only the topmost slot above slot 0 can be "
                                    f"deleted, not {slot}")
            del self.memslots[slot]
            if self.unplug_ram is not None and self.memory.size > base:
                self.unplug_ram(base)  # the GPAs have no memslot any more: the MMU refuses them
                self._flush_remote_tlbs()
            return
        end = guest_phys_addr + memory_size
        if old is not None:
            # Modify an existing slot (kvm_set_memory_region): a guest_memfd slot is immutable, a
            # new size is EINVAL, the same region is "nothing to change", a new base a move.
            if self.guest_memfd:
                raise KvmIoctlError(name, errno.EINVAL, f"slot {slot} is a guest_memfd slot: it can only be deleted")
            if memory_size != old[1]:
                raise KvmIoctlError(name, errno.EINVAL, f"slot {slot} exists with 0x{old[1]:x} bytes: its size "
                                    "cannot change")
            if guest_phys_addr == old[0]:
                return
        for other, (base, size) in self.memslots.items():
            if other != slot and guest_phys_addr < base + size and base < end:
                raise KvmIoctlError(name, errno.EEXIST,
                                    f"0x{guest_phys_addr:x}+0x{memory_size:x} overlaps slot {other}")
        if old is not None:
            raise KvmIoctlError(name, errno.EINVAL, f"testbed: slot {slot} cannot move (RAM stays one range "
                                "from GPA 0)")
        top = max(base + size for base, size in self.memslots.values())
        capacity = self.memory.capacity
        if guest_phys_addr != top or end > capacity:
            raise KvmIoctlError(name, errno.EINVAL,
                                f"testbed: a new slot must start at the end of RAM (0x{top:x}) and end within the "
                                f"reserved 0x{capacity:x} bytes, not 0x{guest_phys_addr:x}-0x{end:x}")
        if self.snp or self.tdx:
            raise KvmIoctlError(name, errno.EINVAL, "testbed: no memory hotplug on SEV-SNP or TDX VMs")
        self.memslots[slot] = (guest_phys_addr, memory_size)

    def gmem_invalidated(self, gfns: list[Gfn]) -> None:
        """guest_memfd freed the private pages of `gfns` (kvm_gmem_punch_hole ->
        kvm_gmem_invalidate_start): every vCPU zaps them (hw.gmem_invalidated)."""
        for hw in self._vcpu_hw:
            hw.gmem_invalidated(gfns)

    def get_page_enc_bitmap(self, start_gfn: int, num_pages: int) -> bytes:
        """KVM_GET_PAGE_ENC_BITMAP of the seed-era series (svm_get_page_enc_bitmap): the
        page-encryption bits of [start_gfn, start_gfn + num_pages), bit set = encrypted
        (kvm/page_enc.py). ENOTTY on a KVM without that protocol, EINVAL outside the bitmap."""
        if not self.page_enc_status_protocol:
            raise KvmIoctlError("KVM_GET_PAGE_ENC_BITMAP", errno.ENOTTY,
                                "the page-encryption bitmap is the seed-era page-enc-status KVM's")
        return self.page_enc_bitmap.get(start_gfn, num_pages)

    # -- dirty logging (kvm/dirty_log.py) -------------------------------------------------
    def set_dirty_logging(self, enabled: bool) -> None:
        """KVM_SET_USER_MEMORY_REGION2 on the RAM slot with KVM_MEM_LOG_DIRTY_PAGES set or
        cleared: logging starts with a clean bitmap and all RAM write-protected, or stops.
        (KVM refuses the flag on a guest_memfd slot; the testbed logs those too: README.)"""
        log = self.dirty_log
        log.set_logging(enabled)
        for hw in self._vcpu_hw:
            hw.set_dirty_log(log.bitmap if log.enabled else None)
        log.flush()

    def get_dirty_log(self, slot: int = 0) -> bytes:
        """KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect): the slot's dirty bits, one per page,
        LSB first, collected and write-protected again (without manual protection)."""
        return self.dirty_log.get(slot)

    def clear_dirty_log(self, first_page: int, num_pages: int, bitmap: bytes, slot: int = 0) -> None:
        """KVM_CLEAR_DIRTY_LOG (kvm_clear_dirty_log_protect)."""
        self.dirty_log.clear(first_page, num_pages, bytes(bitmap), slot)

    def _flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs_memslot(): every vCPU drops its translations."""
        for hw in self._vcpu_hw:
            hw.flush_tlb()

    # -- vCPUs and the stage-2 view ------------------------------------------------------
    def add_vcpu(self, hw: VcpuHardware) -> None:
        """KVM_CREATE_VCPU's VM side: the vCPU's hardware follows this VM's stage-2 changes
        (and its dirty log, if logging is on)."""
        self._vcpu_hw.append(hw)
        if self.dirty_log.enabled:
            hw.set_dirty_log(self.dirty_log.bitmap)

    def vcpu_state_protected(self, hw: VcpuHardware) -> bool:
        """vcpu->arch.guest_state_protected on a VM with protected state: KVM_GET/SET_REGS and
        their kin are EINVAL (kvm_arch_vcpu_ioctl_get_regs) once the VMSA is encrypted."""
        return self.protected_state and any(h is hw for h in self._protected_vcpus)

    def protect_vcpu_state(self, hw: VcpuHardware) -> None:
        """The vCPU's state became the guest's: KVM_SEV_LAUNCH_UPDATE_VMSA (SNP: LAUNCH_FINISH,
        TDX: KVM_TDX_INIT_VCPU) or RECEIVE_UPDATE_VMSA set guest_state_protected."""
        if self.protected_state and not self.vcpu_state_protected(hw):
            self._protected_vcpus.append(hw)

    def stage2(self) -> StagePrivacy | None:
        """What the hardware asks about a GFN (kvm_mem_is_private()); None on a VM without
        private memory, whose stage 2 maps every GFN one way."""
        return self.mem_attrs

    # -- launch (KVM_MEMORY_ENCRYPT_OP) --------------------------------------------------
    def _platform(self, command: str) -> VcpuHardware:
        if not self.sev:
            raise KvmIoctlError(command, errno.ENOTTY, "not an SEV VM")
        if not self._vcpu_hw:
            raise KvmIoctlError(command, errno.EINVAL, "no vCPU: the testbed's firmware runs on its hardware")
        return self._vcpu_hw[0]

    def memory_encrypt_reg_region(self, addr: int, size: int) -> int:
        """KVM_MEMORY_ENCRYPT_REG_REGION (svm/sev.c sev_mem_enc_register_region): pin the
        userspace range [addr, addr + size) for the VM's lifetime (sev_pin_memory, FOLL_LONGTERM)
        and record it in the regions list. ENOTTY unless an SEV VM (sev_guest()); the errors of
        `_pin_memory` (EINVAL, ENOMEM). Returns the number of pages pinned (region->npages)."""
        name = "KVM_MEMORY_ENCRYPT_REG_REGION"
        if not self.sev:
            raise KvmIoctlError(name, errno.ENOTTY, "not an SEV VM")
        npages = self._pin_memory(name, addr, size, self._vmm_maps(addr, size))
        self.enc_regions.append((addr, size))
        return npages

    def memory_encrypt_unreg_region(self, addr: int, size: int) -> None:
        """KVM_MEMORY_ENCRYPT_UNREG_REGION (svm/sev.c sev_mem_enc_unregister_region): unpin the
        first registered region with exactly this address and size (find_enc_region), as QEMU's
        sev_ram_block_removed() asks when a RAM block goes. ENOTTY unless an SEV VM; EINVAL when
        no region matches exactly (a part or a superset of one is not a match)."""
        name = "KVM_MEMORY_ENCRYPT_UNREG_REGION"
        if not self.sev:
            raise KvmIoctlError(name, errno.ENOTTY, "not an SEV VM")
        try:
            index = self.enc_regions.index((addr, size))
        except ValueError:
            raise KvmIoctlError(name, errno.EINVAL, f"no registered region 0x{addr:x}+0x{size:x}") from None
        del self.enc_regions[index]
        self._locked(-_npages(addr, size))  # __unregister_enc_region_locked -> sev_unpin_memory

    def _vmm_maps(self, addr: int, size: int) -> bool:
        """Whether every page of [addr, addr + size) lies in the VMM's mapping of guest RAM."""
        if self.ram_hva is None or size <= 0:
            return False
        return (self.ram_hva >> 12 <= addr >> 12
                and (addr + size - 1) >> 12 < (self.ram_hva + self.memory.capacity) >> 12)

    def _pin_memory(self, name: str, addr: int, size: int, mapped: bool) -> int:
        """sev_pin_memory() (svm/sev.c): EINVAL for an empty or wrapping range, more than
        INT_MAX pages, or more pages locked than the host has (sev_check_pin_count:
        totalram_pages()); ENOMEM above the VMM's RLIMIT_MEMLOCK without CAP_IPC_LOCK
        (sev_check_pin_count) or when pin_user_pages_fast() pins fewer pages than asked
        (sev_pin_user_pages: `mapped` False, a page the VMM has not mapped). On success
        pages_locked grows by the pages covered; returns that count."""
        if addr < 0 or size < 0 or addr > _ULONG_MAX or size > _ULONG_MAX:
            raise KvmIoctlError(name, errno.EINVAL, f"address 0x{addr:x} or size 0x{size:x} out of range")
        if size == 0 or addr + size > _ULONG_MAX:
            raise KvmIoctlError(name, errno.EINVAL, f"empty or wrapping range 0x{addr:x}+0x{size:x}")
        npages = _npages(addr, size)
        if npages > _INT_MAX:
            raise KvmIoctlError(name, errno.EINVAL, f"{npages} pages: more than INT_MAX")
        total = self.pages_locked + npages
        if self.totalram_pages is not None and total > self.totalram_pages:
            raise KvmIoctlError(name, errno.EINVAL, f"{total} pages locked would exceed the host's "
                                f"{self.totalram_pages} pages of RAM (totalram_pages)")
        if self.memlock_limit_pages is not None and total > self.memlock_limit_pages:
            raise KvmIoctlError(name, errno.ENOMEM, f"SEV: {total} total pages would exceed the lock limit "
                                f"of {self.memlock_limit_pages}")
        if not mapped:
            raise KvmIoctlError(name, errno.ENOMEM, f"SEV: Failure locking {npages} pages (0x{addr:x}+0x{size:x} "
                                "is not mapped by the VMM)")
        self._locked(npages)
        return npages

    def _locked(self, delta: int) -> None:
        self.pages_locked += delta
        if self.on_pages_locked is not None:
            self.on_pages_locked(delta)

    def sev_launch_update_data(self, gpa: Gpa, length: int) -> None:
        """KVM_SEV_LAUNCH_UPDATE_DATA (sev.c sev_launch_update_data): the firmware encrypts
        [gpa, gpa + length) in place and adds it to the measurement. The VMM's buffer is its
        mapping of that RAM (the testbed's launch encrypts in place): KVM pins it first
        (sev_pin_memory, counted in pages_locked and checked as for REG_REGION; ENOMEM outside
        the RAM the VMM mapped) and unpins it before returning, whatever the firmware said."""
        name = "KVM_SEV_LAUNCH_UPDATE_DATA"
        hw = self._platform(name)
        uaddr = (self.ram_hva or 0) + gpa
        mapped = gpa >= 0 and gpa + length <= self.memory.capacity
        npages = self._pin_memory(name, uaddr, length, mapped)
        try:
            hw.launch_update_data(gpa, length)
        finally:
            self._locked(-npages)  # sev_unpin_memory

    def sev_snp_launch_start(self) -> None:
        """KVM_SEV_SNP_LAUNCH_START: all RAM starts private (guest_memfd, attributes PRIVATE),
        so every GFN is assigned in the RMP, not validated (the testbed assigns at launch what
        KVM assigns at each gmem fault, sev_gmem_prepare)."""
        hw = self._platform("KVM_SEV_SNP_LAUNCH_START")
        hw.stage2_changed(Gfn(0), Gfn(self.memory.size >> 12), True)

    def sev_snp_launch_update(self, gpa: Gpa, length: int) -> None:
        """KVM_SEV_SNP_LAUNCH_UPDATE (sev.c snp_launch_update): the VMM's pages are copied into
        guest_memfd (or encrypted in place without it) and enter the guest validated."""
        self._platform("KVM_SEV_SNP_LAUNCH_UPDATE").snp_launch_update(gpa, length)

    def tdx_init_mem_region(self, gpa: Gpa, length: int) -> None:
        """KVM_TDX_INIT_MEM_REGION (vmx/tdx.c tdx_vcpu_init_mem_region -> tdx_gmem_post_populate):
        the VMM's pages are copied into guest_memfd by TDH.MEM.PAGE.ADD and enter the TD
        accepted (and measured with TDH.MR.EXTEND, not modelled)."""
        name = "KVM_TDX_INIT_MEM_REGION"
        if self.type != KvmVmType.KVM_X86_TDX_VM:
            raise KvmIoctlError(name, errno.ENOTTY, "not a TDX VM")
        if not self._vcpu_hw:
            raise KvmIoctlError(name, errno.EINVAL, "no vCPU: the TDX module runs on its hardware")
        if gpa % 4096 or length <= 0 or length % 4096 or gpa + length > self.memory.size:
            raise KvmIoctlError(name, errno.EINVAL, f"region 0x{gpa:x}+0x{length:x}: not page aligned or "
                                "outside guest memory")
        self._vcpu_hw[0].tdx_mem_page_add(gpa, length)

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
    def guest_memfd(self) -> bool:
        """The VM types whose RAM slots are guest_memfd slots (KVM_MEM_GUEST_MEMFD)."""
        return self.type in (KvmVmType.KVM_X86_SW_PROTECTED_VM, KvmVmType.KVM_X86_SNP_VM, KvmVmType.KVM_X86_TDX_VM)

    @property
    def tdx(self) -> bool:
        """A TDX VM (KVM_X86_TDX_VM)."""
        return self.type == KvmVmType.KVM_X86_TDX_VM

    @property
    def tdx_shared_mask(self) -> int:
        """gfn_to_gpa(kvm_gfn_direct_bits()): the TD's shared bit, BIT(gpaw - 1); 0 elsewhere
        (tdx.c tdx_td_init: TDX_SHARED_BIT_PWL_4 / _PWL_5)."""
        return 1 << (self.gpaw - 1) if self.tdx else 0

    @property
    def maxphyaddr(self) -> int:
        """cpuid_query_maxphyaddr() (cpuid.c): CPUID 0x80000008.EAX[7:0] when the extended range
        reaches that leaf and userspace set it, else 36."""
        top = self.cpuid.entries.get((0x80000000, 0))
        leaf = self.cpuid.entries.get((0x80000008, 0))
        if top is None or top.eax < 0x80000008 or leaf is None:
            return 36
        return leaf.eax & 0xFF

    @property
    def snp(self) -> bool:
        """An SEV-SNP VM."""
        return self.type == KvmVmType.KVM_X86_SNP_VM

    def quirk_enabled(self, quirk: int) -> bool:
        """kvm_check_has_quirk()."""
        return not self.disabled_quirks & quirk

    def set_cpuid(self, table: CpuidTable) -> None:
        """KVM_SET_CPUID2; kvm_vcpu_after_set_cpuid() caches the PV features found through the
        KVM signature leaf."""
        self.cpuid = table
        self.pv_features = table.pv_features()

    def close(self) -> None:
        """Unmap the VM's per-page arrays (the memory attributes, whose mapping holds a file
        descriptor, and the dirty bitmap): the machine is closed. The regions still registered
        are unpinned, as sev_vm_destroy() does for a VMM that never unregistered them."""
        for addr, size in self.enc_regions:
            self._locked(-_npages(addr, size))
        self.enc_regions.clear()
        if self.mem_attrs is not None:
            self.mem_attrs.close()
        self.dirty_log.close()

    @property
    def in_kernel_lapic(self) -> bool:
        """KVM emulates the local APIC (an APIC map exists): only for a TD here, which KVM
        refuses to create without a split irqchip (tdx_vcpu_create); the VMM creates none for
        the other VM types (README: no local APIC is modelled)."""
        return self.type == KvmVmType.KVM_X86_TDX_VM

    @property
    def protected_state(self) -> bool:
        """Guest register state is encrypted (SEV-ES, SNP, TDX): KVM cannot read it."""
        return self.type in (KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM, KvmVmType.KVM_X86_TDX_VM)

    @property
    def sev(self) -> bool:
        """Any SEV flavour."""
        return self.type in (KvmVmType.KVM_X86_SEV_VM, KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM)

