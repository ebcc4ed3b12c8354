"""Assembling a machine: hardware, KVM and the VMM wired together for one guest run.

This is the composition root (and the Python API most tests use): it is the one place that
knows every layer, so the layers themselves only know their neighbours' narrow interfaces.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from testbed import options as opt
from testbed.asm import Program
from testbed.asm.assembler import FileMemo, remembered
from testbed.asm.cache import assemble_sources_cached
from testbed.decode import describe
from testbed.errors import GuestBootError, MachineClosedError, UsageError
from testbed.hw.cipher import FrameCipher
from testbed.hw.cpu import UnicornVcpu
from testbed.hw.exits import RunStop, StopReason, Vendor
from testbed.hw.memory import GuestMemory, UnmappableMemoryError
from testbed.kvm.hypercall import neg
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.migration import MIGRATABLE_TYPES
from testbed.kvm.msr import KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER
from testbed.kvm.uapi import (
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
    KVM_CAP_EXIT_HYPERCALL,
    KVM_EINVAL,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_TESTBED_DONATE_ENC_STATUS,
    KVM_X86_QUIRK_FIX_HYPERCALL_INSN,
    KvmVmType,
)
from testbed.kvm.vcpu import KvmVcpu
from testbed.kvm.version import REFERENCE, KvmVersion
from testbed.kvm.vm import KvmVm
from testbed.layout import IMAGE_GPA, RT_GDT, RT_REGION_END, Layout
from testbed.options import AMD_ONLY_VM_TYPES, GUEST_MEMFD_VM_TYPES, VM_TYPES
from testbed.trace import Tracer
from testbed.tracker import DEFAULT_TRACKER, DonatedTracker, make_tracker
from testbed.vmm import boot
from testbed.vmm.cpuid import DEFAULT_PV_FEATURES, SEV_BIT, SEV_ES_BIT, SEV_SNP_BIT, build_cpuid
from testbed.vmm.donate import DonateHandler
from testbed.vmm.map_gpa import MapGpaHandler
from testbed.vmm.msr import MsrHandler
from testbed.vmm.page_enc import PageEncBitmapSource
from testbed.vmm.pinning import PinAccounting
from testbed.vmm.vmm import RunReport, VmEnd, Vmm
from testbed.x86 import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    MSR_EFER,
    Reg,
)
from testbed.x86.addr import Gfn, Gpa, Gva
from testbed.x86.paging import PagingMode

SEV_STATUS_SEV = 1 << 0
SEV_STATUS_SEV_ES = 1 << 1
SEV_STATUS_SNP = 1 << 2

GUESTS_DIR = Path(__file__).resolve().parent.parent / "guests"
LIB_DIR = GUESTS_DIR / "lib"



@dataclass
class VmOptions:
    """Everything a run can be configured with (the `testbed run` flags).

    Fields take the CLI's spellings as well as the Python values: `vendor="amd"` or
    `Vendor.AMD`, `vm_type="sev-es"` or `KvmVmType.KVM_X86_SEV_ES_VM`, `memory="64M"` or a
    byte count, `pv_features="pv_unhalt,pv_send_ipi"` or a mask, `refuse_conversions=
    ["0x600000:4:private"]` or tuples. `__post_init__` normalises each to the type annotated
    here (testbed/options.py) and raises UsageError naming the field and the value for
    anything else; `validate()` does it again (fields may be assigned after construction)
    and checks the combinations.
    """

    vendor: Vendor = Vendor.AMD
    vm_type: str = "default"
    memory: int = 64 << 20
    fix_hypercall: bool = True
    map_gpa_exit: bool = True
    pv_features: int | None = None
    enforce_pv_cpuid: bool = True
    timeout: float = 10.0
    seed: int | None = None
    c_bit: int = 51
    #: TDX: the TD's guest physical address width, 48 or 52 (`--gpaw`): the shared bit is GPA
    #: bit gpaw - 1
    gpaw: int = 52
    tracker: str = DEFAULT_TRACKER
    defines: dict[str, int | str] = field(default_factory=dict)
    trace: IO[str] | None = None
    record_exits: bool = True
    hc_protocol: str = "map-gpa-range"
    #: the GHCB protocol version KVM offers (KVM_SEV_INIT2's ghcb_version; 1 = legacy KVM_SEV_INIT)
    ghcb_version: int = 2
    implicit_conversion: str = "convert"
    max_ranges: int | None = None
    #: VMM fault injection: (gpa, npages, to_private: True/False/None for both) ranges whose
    #: conversions the VMM refuses
    refuse_conversions: list[tuple[int, int, bool | None]] = field(default_factory=list)
    #: the KVM modelled where the reference tree and the release differ: "kvm-x86" (default) or
    #: "7.1" (testbed/kvm/version.py, `--kvm-version`)
    kvm_version: KvmVersion = REFERENCE
    #: where the VMM puts KVM's CPUID leaves ("KVMKVMKVM" and the PV features): 0x40000000,
    #: 0x40000100, ...; None leaves the signature out (KVM then sees no PV features)
    kvm_cpuid_base: int | None = 0x40000000
    #: VMM-side control (`--pending-event-every N`): after every N-th MAP_GPA_RANGE exit it
    #: answers, the VMM makes an event pending on the vCPU, so KVM stops a TD's MapGPA with
    #: RETRY (kvm/tdx.py); None or 0: never
    pending_event_every: int | None = None
    #: memory hotplug (vmm/hotplug.py): the most guest RAM may grow to during the run (QEMU's
    #: `-m SIZE,maxmem=MAX`); None: memory cannot grow. The runtime is built for this size.
    max_memory: int | None = None

    def __post_init__(self) -> None:
        self.normalise()

    def normalise(self) -> None:
        """Turn every field into its canonical value; UsageError naming the field otherwise."""
        self.vendor = opt.parse_vendor(self.vendor)
        self.vm_type = opt.parse_vm_type(self.vm_type)
        self.memory = opt.parse_size(self.memory, "memory size")
        for name in ("fix_hypercall", "map_gpa_exit", "enforce_pv_cpuid", "record_exits"):
            setattr(self, name, opt.parse_bool(getattr(self, name), name))
        self.pv_features = opt.parse_pv_features(self.pv_features)
        self.timeout = opt.parse_timeout(self.timeout)
        self.seed = opt.parse_seed(self.seed)
        self.c_bit = opt.parse_int(self.c_bit, "C-bit position", opt.C_BIT_RANGE)
        self.gpaw = opt.parse_int(self.gpaw, "GPA width (gpaw)")
        if self.gpaw not in opt.GPAW_VALUES:
            raise UsageError(f"GPA width (gpaw) {self.gpaw}: expected 48 or 52 (shared bit 47 or 51)")
        self.tracker = opt.parse_tracker(self.tracker)
        self.defines = opt.parse_defines(self.defines)
        if self.trace is not None and not callable(getattr(self.trace, "write", None)):
            raise UsageError(f"trace {self.trace!r}: expected a text file open for writing, or None")
        self.hc_protocol = opt.parse_choice(self.hc_protocol, "hypercall protocol", opt.HC_PROTOCOLS)
        self.ghcb_version = opt.parse_int(self.ghcb_version, "GHCB version", range(1, 3))
        self.implicit_conversion = opt.parse_choice(
            self.implicit_conversion, "implicit-conversion policy", opt.IMPLICIT_CONVERSION_POLICIES)
        self.max_ranges = opt.parse_max_ranges(self.max_ranges)
        self.refuse_conversions = opt.parse_refuse_conversions(self.refuse_conversions)
        self.kvm_version = KvmVersion.parse(self.kvm_version)
        self.kvm_cpuid_base = opt.parse_kvm_cpuid_base(self.kvm_cpuid_base)
        if self.pending_event_every is not None:
            self.pending_event_every = opt.parse_int(self.pending_event_every, "pending-event-every",
                                                     range(0, 1 << 32))
        if self.max_memory is not None:
            self.max_memory = opt.parse_size(self.max_memory, "max memory size")

    def validate(self) -> None:
        """Raise UsageError for values and combinations that do not exist."""
        self.normalise()
        if self.vm_type in AMD_ONLY_VM_TYPES and self.vendor is not Vendor.AMD:
            raise UsageError(f"VM type {self.vm_type} needs an AMD vCPU (--vendor amd), not {self.vendor.value}")
        if self.vm_type in opt.INTEL_ONLY_VM_TYPES and self.vendor is not Vendor.INTEL:
            raise UsageError(f"VM type {self.vm_type} needs an Intel vCPU (--vendor intel), not {self.vendor.value}")
        if self.hc_protocol == "page-enc-status" and self.vm_type in GUEST_MEMFD_VM_TYPES:
            # The seed-era protocol kept an in-kernel bitmap and no memory attributes; the
            # guest_memfd VM types exist only with attributes (KVM_SET_MEMORY_ATTRIBUTES).
            raise UsageError(f"hypercall protocol page-enc-status is the seed-era SEV protocol, without memory "
                             f"attributes; VM type {self.vm_type} needs them (use map-gpa-range)")
        if self.tracker == DonatedTracker.name and self.hc_protocol == "page-enc-status":
            raise UsageError("the donated tracker reads the guest's own structure; with the page-enc-status "
                             "protocol KVM keeps the status (use map-gpa-range)")
        if self.tracker == DonatedTracker.name and not self.map_gpa_exit:
            raise UsageError("the donated tracker needs the donation hypercall's user exit, which the VMM enables "
                             "with KVM_HC_MAP_GPA_RANGE's (--no-map-gpa-exit leaves the tracker without a donation)")
        Layout(self.memory)
        if self.max_memory is not None:
            from testbed.vmm.hotplug import check_max_memory

            check_max_memory(self)
        opt.check_host_memory(self.memory if self.max_memory is None else self.max_memory, self.vm_type)


def guest_defines(options: VmOptions) -> dict[str, int | str]:
    """Layout defines plus the user's (-D NAME=VALUE), which may not name a layout define."""
    # With memory hotplug the runtime is built for the largest memory (its identity map and
    # conversion bound reach max_memory), as Linux reserves its direct map for hotpluggable RAM.
    defines: dict[str, int | str] = dict(Layout(options.max_memory or options.memory).defines())
    clash = sorted(set(options.defines) & set(defines))
    if clash:
        # The runtime is built from these: a -D of one would silently build another layout.
        raise UsageError(f"define {clash[0]}: the testbed sets it from the VM's layout (--memory), a guest "
                         "cannot redefine it")
    if options.hc_protocol == "page-enc-status":
        defines["HC_PROTOCOL_PAGE_ENC_STATUS"] = 1
    defines.update(options.defines)
    return defines


#: The runtime's sources as last read: one string object per version, so the assembler's keyed
#: lookups hash it once, and a build reads no file when none changed.
_lib_texts: FileMemo[str] = {}


def _lib_text(path: Path) -> str:
    """The text of one of the runtime's files (guests/lib), read again only when it changed."""
    return remembered(_lib_texts, path, lambda: path.read_text(encoding="utf-8"))


def build_program(source: Path | str, options: VmOptions, *, text: str | None = None) -> Program:
    """Assemble prelude + guest + runtime at IMAGE_GPA (`text` instead of reading `source`).

    Results are cached in this process and across processes on the sources' contents, their
    includes and the defines (testbed/asm/cache.py: $TESTBED_CACHE_DIR, off disables it)."""
    defines = guest_defines(options)
    if not LIB_DIR.is_dir():
        raise UsageError(f"the guest runtime is not at {LIB_DIR}: testbed runs from its source checkout "
                         "(install it with `pip install -e .`, as the README says)")
    if text is None:
        text = opt.read_source_file(source)
    sources = (
        (str(LIB_DIR / "prelude.s"), _lib_text(LIB_DIR / "prelude.s")),
        (str(source), text),
        (str(LIB_DIR / "runtime.s"), _lib_text(LIB_DIR / "runtime.s")),
    )
    return assemble_sources_cached(
        sources, base=IMAGE_GPA, defines=dict(sorted((k, str(v)) for k, v in defines.items())),
        include_dirs=[LIB_DIR, GUESTS_DIR])


def _locate(program: Program, address: int) -> dict[str, Any] | None:
    """file, line, symbol, offset of `address` in `program` (for the report), or None."""
    where = program.locate(address)
    if where is None:
        return None
    return {"file": where.file, "line": where.line, "symbol": where.symbol, "offset": where.offset}


class GuestMemfdRam:
    """guest_memfd RAM as the VMM discards it (vmm/map_gpa.py RamDiscard): the VMM's own pages
    are freed (ram_block_discard_range); a private discard is fallocate(PUNCH_HOLE) on the
    guest_memfd, which KVM sees - kvm_gmem_punch_hole zaps the freed pages from stage 2 and,
    on SNP, the freed folios go back to shared in the RMP (sev_gmem_invalidate)."""

    def __init__(self, memory: GuestMemory, kvm_vm: KvmVm) -> None:
        self.memory = memory
        self.kvm_vm = kvm_vm

    def discard_shared(self, first_gfn: int, npages: int) -> None:
        """QEMU's ram_block_discard_range() of the VMM's pages."""
        self.memory.discard_shared(first_gfn, npages)

    def discard_private(self, first_gfn: int, npages: int) -> None:
        """fallocate(PUNCH_HOLE) on the guest_memfd (ram_block_discard_guest_memfd_range)."""
        memory = self.memory
        end = min(first_gfn + npages, memory.nframes)
        freed = [Gfn(g) for g in range(max(first_gfn, 0), end) if memory.private_allocated(g)]
        memory.discard_private(first_gfn, npages)
        if freed:
            self.kvm_vm.gmem_invalidated(freed)


class Machine:
    """One VM ready to run `program`.

    A context manager: `with Machine(program, options) as machine:` releases the emulator and
    all guest memory at the end (close()). Without close() they are released when the machine
    is garbage-collected (no reference cycle escapes the collector), but a process running
    many machines should not wait for that: each holds its whole guest memory.
    """

    def __init__(self, program: Program, options: VmOptions, *, incoming: bool = False) -> None:
        self._closed = False
        #: an incoming migration target (testbed/migrate): built, never launched or booted
        self.incoming = incoming
        try:
            self._build(program, options)
        except BaseException:
            self.close()  # a half-built machine releases what it already holds
            raise

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether close() released the machine."""
        return self._closed

    def close(self) -> None:
        """Release the emulator (Unicorn engine, hooks, mappings) and every guest memory buffer,
        and break the references between the layers. Idempotent; reports already returned stay
        valid; running the machine afterwards raises MachineClosedError."""
        if self._closed:
            return
        self._closed = True
        cpu: UnicornVcpu | None = getattr(self, "cpu", None)
        if cpu is not None:
            cpu.close()  # first: the engine maps the memory released next
        memory: GuestMemory | None = getattr(self, "memory", None)
        if memory is not None:
            memory.close()
        kvm_vm: KvmVm | None = getattr(self, "kvm_vm", None)
        if kvm_vm is not None:
            kvm_vm.close()

    def _check_open(self) -> None:
        if self._closed:
            raise MachineClosedError("this machine is closed: its emulator and guest memory were released")

    def _build(self, program: Program, options: VmOptions) -> None:
        options.validate()
        self.options = options
        self.program = program
        self.tracer = Tracer(options.trace) if options.trace is not None else Tracer.disabled()
        self.layout = Layout(options.memory)
        vm_type = VM_TYPES[options.vm_type]
        self.sev = vm_type in (KvmVmType.KVM_X86_SEV_VM, KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM)
        self.c_bit_mask = (1 << options.c_bit) if self.sev else 0
        # MAXPHYADDR 48 (bits 51:48 of an entry are reserved), the C-bit excepted: also with a
        # C-bit below 48 (EPYC 7001/7002: C-bit 47, MAXPHYADDR 48), where the C-bit is one of
        # the address bits the CPU takes out (APM vol. 2 15.34.1).
        self.paging = PagingMode(phys_bits=48, enc_mask=self.c_bit_mask)
        self.tdx = vm_type == KvmVmType.KVM_X86_TDX_VM
        if self.tdx:
            # TDX: the shared bit is GPA bit GPAW - 1 and means *shared* (the inverse of the
            # C-bit); GPAW is the TD's MAXPHYADDR (coco/tdx/tdx.c tdx_shared_mask).
            self.paging = PagingMode(phys_bits=options.gpaw, enc_mask=1 << (options.gpaw - 1),
                                     enc_means_private=False)
        # The guest_memfd VM types keep private pages in a backing the host cannot map, shared
        # ones in the VMM's memory (hw/memory.py); legacy SEV has one frame per page, read by
        # the host as ciphertext. Without memory attributes (the seed-era page-enc-status
        # protocol) there is no guest_memfd: such runs keep the legacy model.
        guest_memfd = (vm_type in (KvmVmType.KVM_X86_SW_PROTECTED_VM, KvmVmType.KVM_X86_SNP_VM,
                                   KvmVmType.KVM_X86_TDX_VM)
                       and options.hc_protocol != "page-enc-status")
        cipher = FrameCipher.from_seed(options.seed) if self.sev and not guest_memfd else None
        self.memory = GuestMemory(options.memory, cipher, guest_memfd=guest_memfd, capacity=options.max_memory)
        self.sev_es = vm_type in (KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM)
        self.snp = vm_type == KvmVmType.KVM_X86_SNP_VM
        # KVM reads guest memory through the memslot's userspace mapping (kvm_read_guest,
        # kvm_vcpu_map): on a guest_memfd VM that is the VMM's page, never guest_memfd. The
        # seed-era page-enc-status protocol means a KVM without memory attributes.
        self.kvm_vm = KvmVm(vm_type, options.vendor, self.memory.userspace_view(), c_bit=options.c_bit,
                            kvm_version=options.kvm_version, ghcb_version=options.ghcb_version,
                            page_enc_status_protocol=options.hc_protocol == "page-enc-status",
                            gpaw=options.gpaw, ram_hva=self.memory.dram_address())
        self.kvm_vm.unplug_ram = self.memory.unplug  # KVM deleting the topmost RAM slot
        # SEV_STATUS (MSR 0xC0010131) is the hardware's, read-only in the guest.
        status = SEV_STATUS_SEV | (SEV_STATUS_SEV_ES if self.sev_es else 0) | (SEV_STATUS_SNP if self.snp else 0)
        self.ud_explanations: list[dict[str, object]] = []
        # The hardware asks KVM's memory attributes (stage 2) whether a GFN is private.
        self.cpu = UnicornVcpu(self.memory, options.vendor, self.paging, self.tracer, sev_es=self.sev_es,
                               snp=self.snp, stage2=self.kvm_vm.stage2(), sev_status=status if self.sev else None,
                               on_guest_ud=self._explain_guest_ud,
                               tdx_gpaw=options.gpaw if self.tdx else None)
        host = self.memory.host_view()
        # KVM_CREATE_VCPU: the vCPU attaches itself to the hardware's exits and the VM.
        self.kvm_vcpu = KvmVcpu(self.kvm_vm, self.cpu, self.tracer, self.paging)
        self._configure_kvm()
        extra = {} if options.max_ranges is None else {"max_ranges": options.max_ranges}
        tracker = make_tracker(options.tracker, guest_pages=self.layout.nframes, **extra)
        # The refusal the completion path accepts: positive EINVAL for SNP's PSC completions,
        # the hypercall ABI's -KVM_EINVAL where the guest's own hypercall reads it (map_gpa.py).
        #: the guest_memfd RAM the VMM discards on conversions (None: no guest_memfd)
        self.gmem_ram = GuestMemfdRam(self.memory, self.kvm_vm) if self.memory.guest_memfd else None
        self.map_gpa = MapGpaHandler(tracker, self.layout.nframes, vm=self.kvm_vm,
                                     ram=self.gmem_ram,
                                     refusal=KVM_EINVAL if self.snp or self.kvm_vm.tdx else neg(KVM_EINVAL),
                                     refused=[(gpa >> 12, (gpa >> 12) + n, to)
                                              for gpa, n, to in options.refuse_conversions])
        # The seed-era protocol keeps the shared pages in KVM: the VMM reads KVM's bitmap
        # (KVM_GET_PAGE_ENC_BITMAP) into a tracker of its kind when it reports them.
        shared_source = (PageEncBitmapSource(self.kvm_vm.get_page_enc_bitmap, self.layout.nframes,
                                             make_tracker(options.tracker, guest_pages=self.layout.nframes, **extra))
                         if options.hc_protocol == "page-enc-status" else None)
        self.vmm = Vmm(host, self.map_gpa, self.tracer, options.record_exits,
                       implicit_conversion=options.implicit_conversion, msr=self.msr,
                       locate=functools.partial(_locate, program), program=program, shared_source=shared_source,
                       inject_event=self.kvm_vcpu.inject_event, pending_event_every=options.pending_event_every)
        if isinstance(tracker, DonatedTracker):
            # The donated tracker reads the guest's structure through the VMM's view; whether a
            # page is shared is what the VMM set in KVM's attributes (none: it cannot tell, donate.py).
            attrs = self.kvm_vm.mem_attrs
            self.vmm.donate = DonateHandler(tracker, host, attrs.is_private if attrs is not None else None)
        # The pin accounting (vmm/pinning.py): legacy SEV registers all RAM at launch; on the
        # guest_memfd types the backing reports each page it allocates or frees.
        self.pinning: PinAccounting | None = None
        if self.memory.guest_memfd or self.memory.encrypted:
            self.pinning = PinAccounting("guest_memfd" if self.memory.guest_memfd else "legacy", self.layout.nframes)
            self.vmm.pinning = self.pinning
            if self.memory.guest_memfd:
                self.pinning.backing_changed(self.memory.private_pages, self.memory.shared_pages)
                self.memory.on_backing_pages = self.pinning.backing_changed
            else:  # legacy: KVM's sev->pages_locked
                self.pinning.locked_changed(self.kvm_vm.pages_locked)
                self.kvm_vm.on_pages_locked = self.pinning.locked_changed
        if self.incoming:
            self._prepare_incoming()
        else:
            self._boot()

    def _prepare_incoming(self) -> None:
        # A migration target (QEMU's -incoming): the VMM registers its RAM as for any VM, but
        # nothing is loaded or launched - memory, vCPU state and page states arrive from the
        # source (testbed/migrate), the private pages through RECEIVE_UPDATE_DATA.
        if self.pinning is not None:
            self.pinning.register_ram(self.kvm_vm.memory_encrypt_reg_region, self.memory.dram_address(),
                                      self.memory.size)
        self.kvm_vcpu.reset()
        if self.kvm_vm.type in MIGRATABLE_TYPES:
            self.cpu.sev_firmware().incoming()  # no guest context until RECEIVE_START (handle 0)
        if self.pinning is not None:
            self.pinning.launched()

    def _configure_kvm(self) -> None:
        o = self.options
        vm = self.kvm_vm
        if o.map_gpa_exit:
            # With the donated tracker the VMM also takes the testbed's donation hypercall.
            donate = 1 << KVM_HC_TESTBED_DONATE_ENC_STATUS if o.tracker == DonatedTracker.name else 0
            vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, (1 << KVM_HC_MAP_GPA_RANGE) | donate)
        if not o.fix_hypercall:
            vm.enable_cap(KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_FIX_HYPERCALL_INSN)
        vm.enable_cap(KVM_CAP_ENFORCE_PV_FEATURE_CPUID, 1 if o.enforce_pv_cpuid else 0)
        pv = o.pv_features if o.pv_features is not None else DEFAULT_PV_FEATURES
        if o.pv_features is None and o.map_gpa_exit:
            # hypercalls.rst: advertise HC_MAP_GPA_RANGE only once the exit is enabled.
            pv |= 1 << KVM_FEATURE_HC_MAP_GPA_RANGE
        sev_features = (SEV_BIT if self.sev else 0) | (SEV_ES_BIT if self.sev_es else 0)
        sev_features |= SEV_SNP_BIT if self.snp else 0
        vm.set_cpuid(build_cpuid(o.vendor, pv, sev_features=sev_features, c_bit=o.c_bit,
                                 kvm_base=o.kvm_cpuid_base, tdx_gpaw=o.gpaw if self.tdx else None))
        if self.tdx:
            # KVM_TDX_INIT_VM: the CPUID configuration TDH.MNG.INIT hands the TDX module.
            self.cpu.tdx_init_vm({key: (e.eax, e.ebx, e.ecx, e.edx) for key, e in vm.cpuid.entries.items()})
        self.msr = MsrHandler(encrypted_memory=self.kvm_vm.type != KvmVmType.KVM_X86_DEFAULT_VM)
        if pv & (1 << KVM_FEATURE_MIGRATION_CONTROL):
            # hypercalls.rst: advertising MIGRATION_CONTROL obliges userspace to handle the MSR
            # through a filter, which KVM turns into KVM_EXIT_X86_RDMSR/WRMSR exits.
            vm.enable_cap(KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER)
            vm.set_msr_filter(self.msr.msr_filter())

    def _boot(self) -> None:
        # The VMM loads the image into its own memory (on SNP it is then copied into
        # guest_memfd by the launch; sw-protected has no populate: its RAM starts shared).
        host = self.memory.userspace_view()
        state = boot.prepare(host, self.program.code, self.c_bit_mask)
        if self.pinning is not None:
            # All guest RAM registered before the launch: pinned for the VM's lifetime (legacy).
            self.pinning.register_ram(self.kvm_vm.memory_encrypt_reg_region, self.memory.dram_address(),
                                      self.memory.size)
        if self.sev:
            # KVM_SEV_LAUNCH_UPDATE_DATA: what the VMM prepared is encrypted in place.
            regions = boot.launch_regions(len(self.program.code))
            if self.snp:
                # SNP_LAUNCH_UPDATE also pre-validates the runtime's region (its tables,
                # data, GHCB and stacks: used before the runtime can PVALIDATE anything).
                regions.append((RT_GDT, RT_REGION_END - RT_GDT))
                # KVM_SEV_SNP_LAUNCH_START: all RAM private, assigned in the RMP, not validated.
                self.kvm_vm.sev_snp_launch_start()
            for gpa, length in regions:
                if self.snp:
                    # KVM_SEV_SNP_LAUNCH_UPDATE: into guest_memfd, validated.
                    self.kvm_vm.sev_snp_launch_update(Gpa(gpa), length)
                else:
                    self.kvm_vm.sev_launch_update_data(Gpa(gpa), length)
        if self.tdx:
            # KVM_TDX_INIT_MEM_REGION: the image and the runtime's region (tables, data,
            # stacks: used before the runtime can accept anything) enter the TD accepted; the
            # rest of RAM is private and pending.
            for gpa, length in [*boot.launch_regions(len(self.program.code)), (RT_GDT, RT_REGION_END - RT_GDT)]:
                # struct kvm_tdx_init_mem_region counts whole pages (nr_pages)
                self.kvm_vm.tdx_init_mem_region(Gpa(gpa), (length + 0xFFF) & ~0xFFF)
        self.kvm_vcpu.reset()
        cpu = self.cpu
        cpu.set_descriptor_table("gdt", state.gdt_base, state.gdt_limit)
        cpu.write_reg(Reg.CS, 0x08)
        cpu.write_reg(Reg.SS, 0x10)
        cpu.write_reg(Reg.DS, 0x10)
        cpu.write_reg(Reg.ES, 0x10)
        cpu.write_reg(Reg.CR3, state.cr3)
        cpu.write_reg(Reg.CR4, CR4_PAE)
        cpu.set_msr(MSR_EFER, EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE)
        cpu.write_reg(Reg.CR0, CR0_PE | CR0_PG | CR0_WP | (1 << 4))  # WP: as every OS sets it
        entry = self.program.symbols.get("_start", IMAGE_GPA)
        cpu.write_reg(Reg.RIP, entry)
        cpu.write_reg(Reg.RSP, state.rsp)
        cpu.write_reg(Reg.RFLAGS, 0x2)
        # KVM_SEV_LAUNCH_UPDATE_VMSA (SNP: SNP_LAUNCH_FINISH, TDX: KVM_TDX_INIT_VCPU): from here
        # the registers are the guest's (the testbed writes them after the launch's memory
        # commands, before any run: the same state).
        self.kvm_vm.protect_vcpu_state(cpu)
        if self.pinning is not None:
            self.pinning.launched()

    def _explain_guest_ud(self, rip: int, linear: int, guest_bytes: bytes) -> None:
        """Explanation, not a model of KVM: what the host would read at a #UD's RIP.

        Today's KVM does not intercept #UD for SEV guests, so it never looks; this records
        what it *would* read and decode if it tried - ciphertext on legacy SEV, nothing on
        SNP (guest_memfd is not mappable: `host_view` "unmappable") - beside the guest's view.
        """
        entry = self.host_view_at(rip, linear, guest_bytes,
                                  "explanation: what the host would read if it decoded this #UD")
        if entry is None:
            return
        # Recorded only for a #UD the hardware delivered straight to the guest (hw/intercepts.py
        # calls this on the branch where the #UD intercept is off): KVM did not intercept it.
        entry["kvm_intercepts_ud"] = False
        self.ud_explanations.append(entry)
        self.tracer.emit("hw", "ud_host_view", **entry)

    def host_view_at(self, rip: int, linear: int, guest_bytes: bytes, label: str) -> dict[str, object] | None:
        """What the host would read at the guest's code at `rip` (`linear`: CS.base + RIP,
        where the guest reads `guest_bytes`), beside the guest's view: ciphertext on legacy
        SEV, nothing on guest_memfd types (`host_view` "unmappable"). None if the guest's own
        walk of `linear` fails."""
        try:
            gpa = self.cpu.gva_to_gpa(Gva(linear))
        except Exception:
            return None
        host_view = self.memory.host_view_kind(gpa)
        try:
            host_bytes: bytes | None = self.memory.host_read(gpa, len(guest_bytes))
        except UnmappableMemoryError:
            host_bytes, host_view = None, "unmappable"
        return {
            "label": label,
            "rip": rip,
            "gpa": gpa,
            "guest_bytes": guest_bytes.hex(),
            "guest_decode": describe(guest_bytes),
            "host_view": host_view,
            "host_bytes": None if host_bytes is None else host_bytes.hex(),
            "host_decode": "not mappable by the host" if host_bytes is None else describe(host_bytes),
        }

    def boot_to(self, address: int) -> None:
        """Run the guest until RIP reaches `address` (e.g. guest_main, after the runtime booted).

        GuestBootError if it stops anywhere else, naming the real cause: how the run ended
        (an unhandled exception with its vector, error code and RIP; a failed assert; a
        termination), the vCPU's stop reason, and where RIP is."""
        self._check_open()
        self.cpu.breakpoint = address
        deadline = time.monotonic() + self.options.timeout
        stop = RunStop(StopReason.REQUESTED)
        try:
            # KVM_RUN, each exit answered by the default VMM, until the breakpoint or the end.
            while self.vmm.ended is None:
                try:
                    result = self.kvm_vcpu.run(max(deadline - time.monotonic(), 1e-6))
                except KvmIoctlError as exc:
                    self.vmm.finish(VmEnd("kvm_run_error", str(exc), {"errno": exc.errno}))
                    break
                if isinstance(result, RunStop):
                    stop = result
                    break
                self.vmm.handle(result)
        finally:
            self.cpu.breakpoint = (1 << 64) - 1
        if stop.reason is StopReason.REQUESTED and stop.detail == "breakpoint":
            return
        names = [name for name, value in self.program.symbols.items() if value == address]
        target = f"0x{address:x}" + (f" ({names[0]})" if names else "")
        ended = self.vmm.ended
        if ended is not None:
            cause = f"{ended.outcome}: {ended.detail}" if ended.detail else ended.outcome
        elif stop.reason is StopReason.TIMEOUT:
            cause = f"timeout: not reached within {self.options.timeout:g} s"
        else:
            cause = stop.reason.value + (f": {stop.detail}" if stop.detail else "")
        how = stop.reason.value + (f" {stop.detail}" if stop.detail else "")
        raise GuestBootError(f"the guest did not reach {target}: {cause} "
                             f"(vCPU stopped: {how}; rip 0x{self.cpu.read_reg(Reg.RIP):x})")

    def run(self) -> RunReport:
        """Run to completion from where the vCPU stands (the host API's loop, testbed/api.py
        run_report); the report says how it ended."""
        from testbed.api import Vm, run_report

        self._check_open()
        vm, vcpu = Vm.attach(self)
        return run_report(vm, vcpu, self.options.timeout)


def run_guest(source: Path | str, options: VmOptions | None = None, *, text: str | None = None) -> RunReport:
    """Assemble and run a guest; the one-call API (testbed/api.py: a Vm, load, the run loop)."""
    from testbed import api

    return api.run_guest(source, options, text=text)
