"""KVM's side of a TD's TDG.VP.VMCALL: arch/x86/kvm/vmx/tdx.c as of the kvm-x86 tree.

The TDX module (the hardware model, hw/) turns a TD's TDCALL(TDG.VP.VMCALL) into a TD exit
with exit reason EXIT_REASON_TDCALL (77) and the registers the guest's RCX bitmap exposes.
KVM then dispatches as tdx_to_vmx_exit_reason() and tdx_handle_exit() do:

* R10 != 0 (not GHCI-standard): a KVM hypercall, EXIT_REASON_VMCALL: tdx_emulate_vmcall()
  copies R10..R14 to RAX, RBX, RCX, RDX, RSI and runs __kvm_emulate_hypercall() with CPL 0 -
  here the one dispatcher, `KvmVcpu.kvm_emulate_hypercall`, 64-bit (is_64_bit_hypercall() is
  true for protected state); the result, or userspace's `ret` raw, goes to R10
  (complete_hypercall_exit).
* R10 == 0, R11 = an instruction leaf (tdcall_to_vmx_exit_reason): CPUID 10, HLT 12, IO 30,
  RDMSR 31, WRMSR 32 are handled as the VMX exit of that number, through the same exit
  handling the other VM types use (kvm_cpuid, KVM_EXIT_HLT, KVM_EXIT_IO, the MSR rules of
  kvm/msr.py); EPT violation 48 becomes EXIT_REASON_EPT_MISCONFIG, i.e. MMIO
  (tdx_emulate_mmio).
* R10 == 0, any other R11: handle_tdvmcall(): MapGPA, ReportFatalError, GetTdVmCallInfo,
  GetQuote, SetupEventNotifyInterrupt; anything else is SUBFUNC_UNSUPPORTED.

Resuming the guest (a handler returning 1 in KVM) is `_resume()`: the TDX module's TDCALL
completes with RAX = 0 and RIP past the instruction (`VcpuHardware.complete_tdcall`), the
registers KVM wrote being what the guest reads back. A handler that exits to userspace resumes
in its completion, at the next KVM_RUN; one that fails KVM_RUN (kvm_vm_dead, a MapGPA `ret`
the reference tree refuses) does not resume.

Where the reference tree and Linux 7.1 differ (the MapGPA completion's reading of userspace's
`ret`, 3e2dec1ede0a), `KvmVm.kvm_version` selects the behaviour (kvm/version.py).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from testbed.hw.exits import VmxExitReason
from testbed.kvm.uapi import (
    KVM_EXIT_HYPERCALL_LONG_MODE,
    KVM_HC_MAP_GPA_RANGE,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_SYSTEM_EVENT_TDX_FATAL,
    HypercallExit,
    InternalErrorExit,
    IoInExit,
    IoOutExit,
    SystemEventExit,
    TdxExit,
)
from testbed.kvm.version import KvmVersion
from testbed.x86 import PAGE_SIZE, U32, U64, Reg

if TYPE_CHECKING:
    from testbed.kvm.vcpu import KvmVcpu

# -- TDG.VP.VMCALL sub-functions (arch/x86/include/asm/shared/tdx.h) ------------------------
TDVMCALL_GET_TD_VM_CALL_INFO = 0x10000
TDVMCALL_MAP_GPA = 0x10001
TDVMCALL_GET_QUOTE = 0x10002
TDVMCALL_REPORT_FATAL_ERROR = 0x10003
TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT = 0x10004
#: R10 of a GHCI-standard call (TDX_HYPERCALL_STANDARD)
TDX_HYPERCALL_STANDARD = 0

# -- TDG.VP.VMCALL status codes, in R10 (shared/tdx.h) ----------------------------------------
TDVMCALL_STATUS_SUCCESS = 0x0000000000000000
TDVMCALL_STATUS_RETRY = 0x0000000000000001
TDVMCALL_STATUS_INVALID_OPERAND = 0x8000000000000000
TDVMCALL_STATUS_ALIGN_ERROR = 0x8000000000000002
TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED = 0x8000000000000003

#: MapGPA is split into chunks of at most this many bytes, each its own user exit (tdx.c)
TDX_MAP_GPA_MAX_LEN = 2 * 1024 * 1024

#: The instruction leaves tdcall_to_vmx_exit_reason() turns into the VMX exit of that number.
_INSTRUCTION_LEAVES = frozenset({
    VmxExitReason.EXIT_REASON_CPUID, VmxExitReason.EXIT_REASON_HLT, VmxExitReason.EXIT_REASON_IO_INSTRUCTION,
    VmxExitReason.EXIT_REASON_MSR_READ, VmxExitReason.EXIT_REASON_MSR_WRITE})

#: The 16 GPRs tdx_report_fatal_error() dumps into run->system_event.data, in VCPU_REGS_*
#: order (RAX = vp_enter_ret, RSP and RBP = 0).
_FATAL_REGS = (Reg.RAX, Reg.RCX, Reg.RDX, Reg.RBX, Reg.RSP, Reg.RBP, Reg.RSI, Reg.RDI,
               Reg.R8, Reg.R9, Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15)
class TdxVcpu:
    """KVM's TDX exit handling for one vCPU (struct vcpu_tdx: the MapGPA cursor)."""

    def __init__(self, vcpu: KvmVcpu) -> None:
        self.vcpu = vcpu
        self.hw = vcpu.hw
        #: tdx->map_gpa_next / map_gpa_end
        self.map_gpa_next = 0
        self.map_gpa_end = 0
        #: the MapGPA trampoline: a chunk completed inside the loop asks for the next one here
        self._map_gpa_looping = False
        self._map_gpa_again = False

    # ------------------------------------------------------------------ helpers
    def _reg(self, reg: Reg) -> int:
        return self.hw.read_reg(reg) & U64

    def _set_return_code(self, status: int) -> None:
        """tdvmcall_set_return_code(): R10."""
        self.hw.write_reg(Reg.R10, status & U64)

    def _set_return_val(self, value: int) -> None:
        """tdvmcall_set_return_val(): R11."""
        self.hw.write_reg(Reg.R11, value & U64)

    def _resume(self) -> None:
        """The handler returned 1: TDH.VP.ENTER resumes the TD, whose TDCALL completes."""
        tracer = self.vcpu.tracer
        if tracer.enabled:
            tracer.emit("kvm", "tdvmcall_done", r10=self._reg(Reg.R10), r11=self._reg(Reg.R11))
        self.hw.complete_tdcall()

    @property
    def shared_mask(self) -> int:
        """gfn_to_gpa(kvm_gfn_direct_bits()): the shared bit, GPA bit (GPAW - 1)."""
        return self.vcpu.vm.tdx_shared_mask

    def is_private_gpa(self, gpa: int) -> bool:
        """vt_is_tdx_private_gpa(): the shared bit is clear."""
        return not gpa & self.shared_mask

    def is_legal_gpa(self, gpa: int) -> bool:
        """kvm_vcpu_is_legal_gpa(): no bit at or above the guest's MAXPHYADDR
        (cpuid_query_maxphyaddr: CPUID 0x80000008.EAX[7:0], 36 without the leaf)."""
        return not gpa >> self.vcpu.vm.maxphyaddr

    # ------------------------------------------------------------ the TD exit
    def handle_tdcall(self) -> None:
        """EXIT_REASON_TDCALL, dispatched as tdx_to_vmx_exit_reason() + tdx_handle_exit()."""
        tracer = self.vcpu.tracer
        if tracer.enabled:
            tracer.emit("kvm", "tdvmcall", **{r.name.lower(): self._reg(r)
                                               for r in (Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14)})
        if self._reg(Reg.R10) != TDX_HYPERCALL_STANDARD:
            self.emulate_vmcall()
            return
        leaf = self._reg(Reg.R11)
        if leaf in _INSTRUCTION_LEAVES:
            self._instruction_leaf(leaf)
        elif leaf == VmxExitReason.EXIT_REASON_EPT_VIOLATION:
            self.emulate_mmio()  # EXIT_REASON_EPT_MISCONFIG
        else:
            self.handle_tdvmcall(leaf)

    def _instruction_leaf(self, leaf: int) -> None:
        if leaf == VmxExitReason.EXIT_REASON_CPUID:
            self.emulate_cpuid()
        elif leaf == VmxExitReason.EXIT_REASON_HLT:
            # kvm_emulate_halt_noskip(): a TD has an in-kernel local APIC (tdx_vcpu_create
            # requires a split irqchip), so no KVM_EXIT_HLT: the vCPU halts in KVM, and the TDCALL
            # completes when an event wakes it.
            self.vcpu.halt(self._resume)
        elif leaf == VmxExitReason.EXIT_REASON_IO_INSTRUCTION:
            self.emulate_io()
        else:
            self.emulate_msr(leaf == VmxExitReason.EXIT_REASON_MSR_WRITE)

    # ------------------------------------------------------ KVM hypercalls
    def emulate_vmcall(self) -> None:
        """tdx_emulate_vmcall(): R10 = nr, R11..R14 = a0..a3, __kvm_emulate_hypercall(vcpu, 0,
        complete_hypercall_exit) through the one dispatcher; the result in R10."""
        nr, a0, a1, a2, a3 = (self._reg(r) for r in (Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14))

        def complete_hypercall_exit(ret: int) -> None:
            self._set_return_code(ret)
            self._resume()

        self.vcpu.kvm_emulate_hypercall(nr, a0, a1, a2, a3, 0, True, complete_hypercall_exit)

    # ---------------------------------------------------- instruction leaves
    def emulate_cpuid(self) -> None:
        """tdx_emulate_cpuid(): EAX, ECX from R12, R13; kvm_cpuid() into R12..R15."""
        eax, ebx, ecx, edx = self.vcpu.cpuid(self._reg(Reg.R12) & U32, self._reg(Reg.R13) & U32)
        for reg, value in zip((Reg.R12, Reg.R13, Reg.R14, Reg.R15), (eax, ebx, ecx, edx), strict=True):
            self.hw.write_reg(reg, value & U32)
        self._resume()

    def emulate_io(self) -> None:
        """tdx_emulate_io(): R12 = size (1, 2, 4), R13 = write (0, 1), R14 = port, R15 = value;
        anything else INVALID_OPERAND. No in-kernel device: every access exits (KVM_EXIT_IO),
        an IN's value lands in R11 (tdx_complete_pio_in)."""
        size, write, port = self._reg(Reg.R12), self._reg(Reg.R13), self._reg(Reg.R14) & 0xFFFF
        if write not in (0, 1) or size not in (1, 2, 4):
            self._set_return_code(TDVMCALL_STATUS_INVALID_OPERAND)
            self._resume()
            return
        if write:
            data = (self._reg(Reg.R15) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.vcpu.exit_to_userspace(IoOutExit(size=size, port=port, count=1, data=data), self._resume)
            return
        run = IoInExit(size=size, port=port, count=1, data=bytearray(size))

        def complete_pio_in() -> None:
            self._set_return_val(int.from_bytes(run.reply(size), "little"))
            self._resume()

        self.vcpu.exit_to_userspace(run, complete_pio_in)

    def emulate_msr(self, write: bool) -> None:
        """EXIT_REASON_MSR_READ/WRITE: ECX = R12 (EDX:EAX = R13 for a write), then
        kvm_emulate_rdmsr()/kvm_emulate_wrmsr() with tdx_get_msr()/tdx_set_msr()'s rules; the
        completion is tdx_complete_emulated_msr(): an error is INVALID_OPERAND (no #GP: KVM
        cannot inject into a TD), a read's value goes to R11."""
        index = self._reg(Reg.R12) & U32
        value = self._reg(Reg.R13) if write else 0

        def complete(ok: bool, data: int) -> None:
            if not ok:
                self._set_return_code(TDVMCALL_STATUS_INVALID_OPERAND)
            elif not write:
                self._set_return_val(data)
            self._resume()

        self.vcpu.msr_access(index, write, value, complete, td=True)

    def emulate_mmio(self) -> None:
        """tdx_emulate_mmio(): R12 = size (1, 2, 4, 8), R13 = write (both read as int: their low 32
        bits), R14 = GPA (shared), R15 =
        value. Bad size, write flag or a private GPA: INVALID_OPERAND. Otherwise KVM has no
        in-kernel device there (kvm_io_bus_* fail) and would exit with KVM_EXIT_MMIO; the
        testbed models no MMIO devices and ends with KVM_EXIT_INTERNAL_ERROR (emulation)
        instead, as for any other MMIO access (kvm/vcpu.py handle_npf; README, Deliberate
        deviations)."""
        # `int size, write`: KVM keeps R12's and R13's low 32 bits only (tdx.c tdx_emulate_mmio)
        size, write, gpa = self._reg(Reg.R12) & U32, self._reg(Reg.R13) & U32, self._reg(Reg.R14)
        if (size not in (1, 2, 4, 8) or write not in (0, 1)
                or self.is_private_gpa(gpa) or self.is_private_gpa((gpa + size - 1) & U64)):
            self._set_return_code(TDVMCALL_STATUS_INVALID_OPERAND)
            self._resume()
            return
        gpa &= ~self.shared_mask
        kind = "write" if write else "read"
        self.vcpu.exit_to_userspace(InternalErrorExit(
            KVM_INTERNAL_ERROR_EMULATION,
            f"TDVMCALL<MMIO> {kind} of {size} bytes at gpa 0x{gpa:x}: no MMIO device is modelled "
            "(KVM would exit with KVM_EXIT_MMIO)"), None)

    # -------------------------------------------------------- GHCI leaves
    def handle_tdvmcall(self, leaf: int) -> None:
        """handle_tdvmcall(): the GHCI leaves; an unknown one is SUBFUNC_UNSUPPORTED."""
        if leaf == TDVMCALL_MAP_GPA:
            self.map_gpa()
        elif leaf == TDVMCALL_REPORT_FATAL_ERROR:
            self.report_fatal_error()
        elif leaf == TDVMCALL_GET_TD_VM_CALL_INFO:
            self.get_td_vm_call_info()
        elif leaf == TDVMCALL_GET_QUOTE:
            self.get_quote()
        elif leaf == TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT:
            self.setup_event_notify_interrupt()
        else:
            self._set_return_code(TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED)
            self._resume()

    def map_gpa(self) -> None:
        """tdx_map_gpa(): R12 = GPA, R13 = size. SUBFUNC_UNSUPPORTED without the
        KVM_HC_MAP_GPA_RANGE user exit; INVALID_OPERAND for a wrap, size 0, an illegal GPA or
        ends on different sides of the shared bit; ALIGN_ERROR for misalignment; R11 = GPA on
        error. Otherwise the first chunk's KVM_EXIT_HYPERCALL (__tdx_map_gpa)."""
        gpa, size = self._reg(Reg.R12), self._reg(Reg.R13)
        status = None
        if not self.vcpu.vm.hypercall_exit_mask & (1 << KVM_HC_MAP_GPA_RANGE):  # user_exit_on_hypercall()
            status = TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED
        elif (gpa + size) & U64 <= gpa or not self.is_legal_gpa(gpa) or not self.is_legal_gpa(gpa + size - 1) \
                or self.is_private_gpa(gpa) != self.is_private_gpa(gpa + size - 1):
            # gpa + size <= gpa is u64 arithmetic: it catches size 0 and a wrap alike.
            status = TDVMCALL_STATUS_INVALID_OPERAND
        elif gpa % PAGE_SIZE or size % PAGE_SIZE:
            status = TDVMCALL_STATUS_ALIGN_ERROR
        if status is not None:
            self._set_return_code(status)
            self._set_return_val(gpa)
            self._resume()
            return
        self.map_gpa_end = gpa + size
        self.map_gpa_next = gpa
        self._map_gpa_chunks()

    def _map_gpa_chunks(self) -> None:
        """__tdx_map_gpa() for each chunk, as a trampoline: a VMM that answers inside the exit
        (the fast path) completes the chunk at once and the loop exits again for the next one,
        without growing the stack; one that stops the vCPU continues at the next KVM_RUN."""
        self._map_gpa_looping = True
        try:
            while True:
                self._map_gpa_again = False
                self._map_gpa_exit()
                if not self._map_gpa_again:
                    return
        finally:
            self._map_gpa_looping = False

    def _map_gpa_exit(self) -> None:
        """__tdx_map_gpa(): KVM_EXIT_HYPERCALL nr 12, args[0] = GPA with the shared bit
        stripped, args[1] = pages (at most TDX_MAP_GPA_MAX_LEN), args[2] = ENCRYPTED for a
        private GPA else DECRYPTED, flags LONG_MODE, ret preset to 0."""
        gpa = self.map_gpa_next
        size = min(self.map_gpa_end - gpa, TDX_MAP_GPA_MAX_LEN)
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if self.is_private_gpa(gpa) else KVM_MAP_GPA_RANGE_DECRYPTED
        run = HypercallExit(nr=KVM_HC_MAP_GPA_RANGE, args=(gpa & ~self.shared_mask, size // PAGE_SIZE, attrs, 0, 0, 0),
                            ret=0, flags=KVM_EXIT_HYPERCALL_LONG_MODE)
        self.vcpu.exit_to_userspace(run, lambda: self._complete_map_gpa(run))

    def _complete_map_gpa(self, run: HypercallExit) -> None:
        """tdx_complete_vmcall_map_gpa(). Reference tree (3e2dec1ede0a): ret 0 goes on, EAGAIN
        is RETRY and EINVAL INVALID_OPERAND with R11 = the chunk's GPA, anything else fails
        KVM_RUN with -EINVAL. 7.1: any non-zero ret is INVALID_OPERAND with R11 = the chunk's
        GPA. After a good chunk: done, or RETRY with R11 = the next GPA when an event is
        pending (kvm_vcpu_has_events()), or the next chunk."""
        ret = run.ret & U64
        if ret != 0:
            if self.vcpu.vm.kvm_version is KvmVersion.RELEASED:
                self._propagate(TDVMCALL_STATUS_INVALID_OPERAND)
            elif ret == errno.EAGAIN:
                self._propagate(TDVMCALL_STATUS_RETRY)
            elif ret == errno.EINVAL:
                self._propagate(TDVMCALL_STATUS_INVALID_OPERAND)
            else:
                self.vcpu.fail_run(errno.EINVAL, f"MapGPA completion: userspace returned {ret:#x} in "
                                   "hypercall.ret (only 0, EINVAL or EAGAIN are valid)")
            return
        self.map_gpa_next += TDX_MAP_GPA_MAX_LEN
        if self.map_gpa_next >= self.map_gpa_end:
            self._resume()  # R10 is still 0 (SUCCESS), as the guest passed it
            return
        if self.vcpu.take_pending_event():
            self._propagate(TDVMCALL_STATUS_RETRY)
            return
        if self._map_gpa_looping:
            self._map_gpa_again = True
        else:
            self._map_gpa_chunks()

    def _propagate(self, status: int) -> None:
        """tdx_complete_vmcall_map_gpa()'s propagate_error: R10 = status, R11 = map_gpa_next."""
        self._set_return_code(status)
        self._set_return_val(self.map_gpa_next)
        self._resume()

    def report_fatal_error(self) -> None:
        """tdx_report_fatal_error(): KVM_EXIT_SYSTEM_EVENT, type KVM_SYSTEM_EVENT_TDX_FATAL,
        ndata 16: the GPRs in VCPU_REGS_* order (RAX = the TD exit's vp_enter_ret, i.e. the
        exit reason; RSP and RBP 0). KVM reads no memory: a message GPA (R13) is only data.
        The TD does not resume."""
        data = tuple(0 if reg in (Reg.RSP, Reg.RBP)
                     else int(VmxExitReason.EXIT_REASON_TDCALL) if reg is Reg.RAX
                     else self._reg(reg) for reg in _FATAL_REGS)
        self.vcpu.exit_to_userspace(SystemEventExit(type=KVM_SYSTEM_EVENT_TDX_FATAL, data=data), None)

    def get_td_vm_call_info(self) -> None:
        """tdx_get_td_vm_call_info(): R12 = 0 -> R11..R14 = 0, SUCCESS; R12 = 1 -> KVM_EXIT_TDX
        for userspace to fill (ret preset SUCCESS, R11..R14 preset 0); else INVALID_OPERAND."""
        leaf = self._reg(Reg.R12)
        if leaf == 0:
            for reg in (Reg.R11, Reg.R12, Reg.R13, Reg.R14):
                self.hw.write_reg(reg, 0)
            self._set_return_code(TDVMCALL_STATUS_SUCCESS)
            self._resume()
        elif leaf == 1:
            run = TdxExit(nr=TDVMCALL_GET_TD_VM_CALL_INFO, leaf=leaf, ret=TDVMCALL_STATUS_SUCCESS)

            def complete_get_td_vm_call_info() -> None:
                self._set_return_code(run.ret)
                for reg, value in zip((Reg.R11, Reg.R12, Reg.R13, Reg.R14), (run.r11, run.r12, run.r13, run.r14),
                                      strict=True):
                    self.hw.write_reg(reg, value & U64)
                self._resume()

            self.vcpu.exit_to_userspace(run, complete_get_td_vm_call_info)
        else:
            self._set_return_code(TDVMCALL_STATUS_INVALID_OPERAND)
            self._resume()

    def _complete_simple(self, run: TdxExit) -> None:
        """tdx_complete_simple(): R10 = userspace's ret."""
        self._set_return_code(run.ret)
        self._resume()

    def get_quote(self) -> None:
        """tdx_get_quote(): a buffer GPA (R12) without the shared bit is INVALID_OPERAND; else
        KVM_EXIT_TDX with the GPA (shared bit stripped) and size (R13), ret preset
        SUBFUNC_UNSUPPORTED. KVM checks nothing else (size, alignment: userspace's job)."""
        gpa, size = self._reg(Reg.R12), self._reg(Reg.R13)
        if self.is_private_gpa(gpa):
            self._set_return_code(TDVMCALL_STATUS_INVALID_OPERAND)
            self._resume()
            return
        run = TdxExit(nr=TDVMCALL_GET_QUOTE, gpa=gpa & ~self.shared_mask, size=size,
                      ret=TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED)
        self.vcpu.exit_to_userspace(run, lambda: self._complete_simple(run))

    def setup_event_notify_interrupt(self) -> None:
        """tdx_setup_event_notify_interrupt(): vector (R12) outside 32..255 is
        INVALID_OPERAND; else KVM_EXIT_TDX, ret preset SUBFUNC_UNSUPPORTED."""
        vector = self._reg(Reg.R12)
        if not 32 <= vector <= 255:
            self._set_return_code(TDVMCALL_STATUS_INVALID_OPERAND)
            self._resume()
            return
        run = TdxExit(nr=TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT, vector=vector,
                      ret=TDVMCALL_STATUS_SUBFUNC_UNSUPPORTED)
        self.vcpu.exit_to_userspace(run, lambda: self._complete_simple(run))

    # ------------------------------------------------------ EPT violations
    def handle_ept_violation(self, error: int, gpa: int) -> None:
        """tdx_handle_ept_violation(). A private GPA whose GFN is private in the attributes can
        only fault because the page is pending in the S-EPT (the model maps every private GFN,
        as TDH.MEM.PAGE.AUG would at the first fault): "Guest access before accepting",
        kvm_vm_dead(), KVM_RUN fails with EIO, now and at every later call. Any other EPT
        violation is the common fault path (kvm/vcpu.py handle_npf) on the GPA with the shared
        bit stripped: a private/shared mismatch is KVM_EXIT_MEMORY_FAULT."""
        private = self.is_private_gpa(gpa)
        gfn_gpa = gpa & ~self.shared_mask
        attrs = self.vcpu.vm.mem_attrs
        if (private and attrs is not None and gfn_gpa < self.vcpu.vm.memory.size
                and attrs.is_private(gfn_gpa >> 12)):
            self.vcpu.vm.dead = True
            self.vcpu.fail_run(errno.EIO, f"Guest access before accepting 0x{gfn_gpa:x} on vCPU 0")
            return
        self.vcpu.handle_npf(error, gfn_gpa, private=private)
