"""Assembling a machine: hardware, KVM and the VMM wired together for one guest run.

This is the composition root (and the Python API most tests use): it is the one place that
knows every layer, so the layers themselves only know their neighbours' narrow interfaces.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from testbed.asm import Program, assemble_sources
from testbed.decode import describe
from testbed.errors import UsageError
from testbed.hw.cipher import FrameCipher
from testbed.hw.cpu import UnicornVcpu
from testbed.hw.exits import Vendor
from testbed.hw.memory import GuestMemory
from testbed.kvm.uapi import (
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_ENFORCE_PV_FEATURE_CPUID,
    KVM_CAP_EXIT_HYPERCALL,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_HC_MAP_GPA_RANGE,
    KVM_X86_QUIRK_FIX_HYPERCALL_INSN,
    KvmVmType,
)
from testbed.kvm.vcpu import KvmVcpu
from testbed.kvm.vm import KvmVm
from testbed.layout import IMAGE_GPA, RT_GDT, RT_REGION_END, Layout
from testbed.trace import Tracer
from testbed.tracker import DEFAULT_TRACKER, make_tracker
from testbed.vmm import boot
from testbed.vmm.cpuid import DEFAULT_PV_FEATURES, SEV_BIT, SEV_ES_BIT, SEV_SNP_BIT, build_cpuid
from testbed.vmm.map_gpa import MapGpaHandler
from testbed.vmm.vmm import RunReport, SourceRef, Vmm
from testbed.x86 import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    MSR_AMD64_SEV,
    MSR_EFER,
    Reg,
)
from testbed.x86.paging import PagingMode

SEV_STATUS_SEV = 1 << 0
SEV_STATUS_SEV_ES = 1 << 1
SEV_STATUS_SNP = 1 << 2

GUESTS_DIR = Path(__file__).resolve().parent.parent / "guests"
LIB_DIR = GUESTS_DIR / "lib"

VM_TYPES: dict[str, KvmVmType] = {
    "default": KvmVmType.KVM_X86_DEFAULT_VM,
    "sw-protected": KvmVmType.KVM_X86_SW_PROTECTED_VM,
    "sev": KvmVmType.KVM_X86_SEV_VM,
    "sev-es": KvmVmType.KVM_X86_SEV_ES_VM,
    "sev-snp": KvmVmType.KVM_X86_SNP_VM,
}
HC_PROTOCOLS = ("map-gpa-range", "page-enc-status")
IMPLICIT_CONVERSION_POLICIES = ("convert", "refuse")
AMD_ONLY_VM_TYPES = ("sev", "sev-es", "sev-snp")


@dataclass
class VmOptions:
    """Everything a run can be configured with (the `testbed run` flags)."""

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

    def validate(self) -> None:
        """Raise UsageError for combinations that do not exist."""
        if self.vm_type not in VM_TYPES:
            raise UsageError(f"unknown VM type {self.vm_type!r}: expected one of {', '.join(VM_TYPES)}")
        if self.vm_type in AMD_ONLY_VM_TYPES and self.vendor is not Vendor.AMD:
            raise UsageError(f"VM type {self.vm_type} needs an AMD vCPU (--vendor amd), not {self.vendor.value}")
        if not 32 <= self.c_bit <= 51:
            raise UsageError(f"C-bit position must be between 32 and 51, not {self.c_bit}")
        Layout(self.memory)
        if self.hc_protocol not in HC_PROTOCOLS:
            raise UsageError(f"unknown hypercall protocol {self.hc_protocol!r}: expected {', '.join(HC_PROTOCOLS)}")
        if self.implicit_conversion not in IMPLICIT_CONVERSION_POLICIES:
            raise UsageError(f"unknown implicit-conversion policy {self.implicit_conversion!r}: expected "
                             f"{', '.join(IMPLICIT_CONVERSION_POLICIES)}")
        if self.timeout <= 0:
            raise UsageError(f"timeout must be positive, not {self.timeout}")


def guest_defines(options: VmOptions) -> dict[str, int | str]:
    """Layout defines plus the user's (-D NAME=VALUE); user values win."""
    defines: dict[str, int | str] = dict(Layout(options.memory).defines())
    if options.hc_protocol == "page-enc-status":
        defines["HC_PROTOCOL_PAGE_ENC_STATUS"] = 1
    defines.update(options.defines)
    return defines


def build_program(source: Path | str, options: VmOptions, *, text: str | None = None) -> Program:
    """Assemble prelude + guest + runtime at IMAGE_GPA (`text` instead of reading `source`).

    Results are cached per process on the sources' contents and the defines: a test matrix
    assembles the same guest for many VM types."""
    defines = guest_defines(options)
    if not LIB_DIR.is_dir():
        raise UsageError(f"the guest runtime is not at {LIB_DIR}: testbed runs from its source checkout "
                         "(install it with `pip install -e .`, as the README says)")
    if text is None:
        path = Path(source)
        if not path.is_file():
            raise UsageError(f"{source}: no such guest source file")
        text = path.read_text(encoding="utf-8")
    sources = (
        (str(LIB_DIR / "prelude.s"), (LIB_DIR / "prelude.s").read_text(encoding="utf-8")),
        (str(source), text),
        (str(LIB_DIR / "runtime.s"), (LIB_DIR / "runtime.s").read_text(encoding="utf-8")),
        (str(LIB_DIR / "sev.s"), (LIB_DIR / "sev.s").read_text(encoding="utf-8")),  # included by runtime.s
    )
    return _assemble_cached(sources, tuple(sorted((k, str(v)) for k, v in defines.items())))


@functools.lru_cache(maxsize=64)
def _assemble_cached(sources: tuple[tuple[str, str], ...], defines: tuple[tuple[str, str], ...]) -> Program:
    # The last entry (sev.s) is in the key only so an edit to it invalidates the cache.
    return assemble_sources(sources[:3], base=IMAGE_GPA, defines=dict(defines), include_dirs=[LIB_DIR, GUESTS_DIR])


class Machine:
    """One VM ready to run `program`."""

    def __init__(self, program: Program, options: VmOptions) -> None:
        options.validate()
        self.options = options
        self.program = program
        self.tracer = Tracer(options.trace) if options.trace is not None else Tracer.disabled()
        self.layout = Layout(options.memory)
        vm_type = VM_TYPES[options.vm_type]
        self.sev = vm_type in (KvmVmType.KVM_X86_SEV_VM, KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM)
        self.c_bit_mask = (1 << options.c_bit) if self.sev else 0
        # MAXPHYADDR 48 (bits 51:48 of an entry are reserved), the C-bit excepted.
        self.paging = PagingMode(phys_bits=48 if options.c_bit >= 48 else 52, enc_mask=self.c_bit_mask)
        cipher = FrameCipher.from_seed(options.seed) if self.sev else None
        self.memory = GuestMemory(options.memory, cipher)
        self.sev_es = vm_type in (KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM)
        self.snp = vm_type == KvmVmType.KVM_X86_SNP_VM
        self.cpu = UnicornVcpu(self.memory, options.vendor, self.paging, self.tracer, sev_es=self.sev_es,
                               snp=self.snp)
        if self.sev:
            # SEV_STATUS (MSR 0xC0010131) is the hardware's, read-only in the guest.
            status = SEV_STATUS_SEV | (SEV_STATUS_SEV_ES if self.sev_es else 0) | (SEV_STATUS_SNP if self.snp else 0)
            self.cpu.hw_msrs[MSR_AMD64_SEV] = (lambda: status, None)
        self.ud_explanations: list[dict[str, object]] = []
        self.cpu.on_guest_ud = self._explain_guest_ud
        host = self.memory.host_view()
        self.kvm_vm = KvmVm(vm_type, options.vendor, host, c_bit=options.c_bit)
        self.kvm_vm.ghcb_version = options.ghcb_version
        self.kvm_vcpu = KvmVcpu(self.kvm_vm, self.cpu, self.tracer, self.paging)
        self.cpu.hypervisor = self.kvm_vcpu
        self._configure_kvm()
        if options.hc_protocol == "page-enc-status":
            # The seed-era KVM had no memory attributes: the in-kernel bitmap was all it kept.
            self.kvm_vm.mem_attrs = None
        if self.kvm_vm.mem_attrs is not None:
            # The hardware's stage-2 view is KVM's attribute array; an update zaps mappings.
            self.cpu.stage2_private = self.kvm_vm.mem_attrs.private
            self.kvm_vm.on_attributes_changed = self.cpu.flush_tlb
            if self.cpu.rmp is not None:
                self.kvm_vm.on_attributes_range = self.cpu.rmp.assign
        extra = {} if options.max_ranges is None else {"max_ranges": options.max_ranges}
        tracker = make_tracker(options.tracker, guest_pages=self.layout.nframes, **extra)
        self.map_gpa = MapGpaHandler(tracker, self.layout.nframes, vm=self.kvm_vm)
        self.map_gpa.refused = [(gpa >> 12, (gpa >> 12) + n, to) for gpa, n, to in options.refuse_conversions]
        asserts = {k: SourceRef(v.file, v.line) for k, v in program.asserts.items()}
        self.vmm = Vmm(self.kvm_vcpu, host, self.map_gpa, asserts, self.tracer, options.record_exits,
                       implicit_conversion=options.implicit_conversion)
        if options.hc_protocol == "page-enc-status":
            self.kvm_vm.page_enc_status_protocol = True
            # KVM_GET_PAGE_ENC_BITMAP: the state lives in KVM, the VMM reads it at the end.
            self.vmm.shared_source = self.kvm_vm.page_enc_bitmap
        self._boot()

    def _configure_kvm(self) -> None:
        o = self.options
        vm = self.kvm_vm
        if o.map_gpa_exit:
            vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
        if not o.fix_hypercall:
            vm.enable_cap(KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_FIX_HYPERCALL_INSN)
        vm.enable_cap(KVM_CAP_ENFORCE_PV_FEATURE_CPUID, 1 if o.enforce_pv_cpuid else 0)
        pv = o.pv_features if o.pv_features is not None else DEFAULT_PV_FEATURES
        if o.pv_features is None and o.map_gpa_exit:
            # hypercalls.rst: advertise HC_MAP_GPA_RANGE only once the exit is enabled.
            pv |= 1 << KVM_FEATURE_HC_MAP_GPA_RANGE
        sev_features = (SEV_BIT if self.sev else 0) | (SEV_ES_BIT if self.sev_es else 0)
        sev_features |= SEV_SNP_BIT if self.snp else 0
        vm.set_cpuid(build_cpuid(o.vendor, pv, sev_features=sev_features, c_bit=o.c_bit))

    def _boot(self) -> None:
        host = self.memory.host_view()
        state = boot.prepare(host, self.program.code, self.c_bit_mask)
        if self.sev:
            # KVM_SEV_LAUNCH_UPDATE_DATA: what the VMM prepared is encrypted in place.
            regions = boot.launch_regions(len(self.program.code))
            if self.snp:
                # SNP_LAUNCH_UPDATE also pre-validates the runtime's region (its tables,
                # data, GHCB and stacks: used before the runtime can PVALIDATE anything).
                regions.append((RT_GDT, RT_REGION_END - RT_GDT))
            if self.cpu.rmp is not None:
                # All RAM starts private (guest_memfd, attributes PRIVATE): assigned in the RMP,
                # not validated, but for what the launch measured.
                self.cpu.rmp.assign(0, self.layout.nframes, True)
            for gpa, length in regions:
                self.memory.launch_encrypt(gpa, length)
                if self.cpu.rmp is not None:
                    self.cpu.rmp.launch_validate(gpa >> 12, (gpa + length + 0xFFF) >> 12)
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

    def _explain_guest_ud(self, rip: int, guest_bytes: bytes) -> None:
        """Explanation, not a model of KVM: what the host would read at a #UD's RIP.

        Today's KVM does not intercept #UD for SEV guests, so it never looks; this records
        what it *would* read and decode if it tried - ciphertext - beside the guest's view.
        """
        try:
            gpa = self.cpu.gva_to_gpa(rip)
        except Exception:
            return
        host_bytes = self.memory.host_read(gpa, len(guest_bytes))
        entry: dict[str, object] = {
            "label": "explanation: what the host would read if it decoded this #UD",
            "rip": rip,
            "gpa": gpa,
            "guest_bytes": guest_bytes.hex(),
            "guest_decode": describe(guest_bytes),
            "host_bytes": host_bytes.hex(),
            "host_decode": describe(host_bytes),
            "kvm_intercepts_ud": not self.sev,
        }
        self.ud_explanations.append(entry)
        self.tracer.emit("hw", "ud_host_view", **entry)

    def boot_to(self, address: int) -> None:
        """Run the guest until RIP reaches `address` (e.g. guest_main, after the runtime booted)."""
        self.cpu.breakpoint = address
        try:
            stop = self.kvm_vcpu.run(self.vmm, self.options.timeout)
        finally:
            self.cpu.breakpoint = (1 << 64) - 1
        if stop.detail != "breakpoint":
            raise UsageError(f"the guest did not reach 0x{address:x} ({stop.reason.value} {stop.detail}".strip() + ")")

    def run(self) -> RunReport:
        """Run to completion; the report says how it ended."""
        report = self.vmm.run(self.options.timeout)
        if self.ud_explanations:
            report.extra["ud_host_view"] = self.ud_explanations
        return report


def run_guest(source: Path | str, options: VmOptions | None = None, *, text: str | None = None) -> RunReport:
    """Assemble and run a guest; the one-call API."""
    options = options or VmOptions()
    options.validate()
    program = build_program(source, options, text=text)
    return Machine(program, options).run()
