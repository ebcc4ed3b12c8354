"""The vCPU as KVM runs it: VM-exit handling and the KVM_RUN loop's return to userspace.

`KvmVcpu.vmexit` is the hardware's `Hypervisor`: the svm/vmx front ends below decode the
vendor's exit code and information words (as svm.c's svm_exit_handlers[] and vmx.c's
kvm_vmx_exit_handlers[] do) into common handlers shared by both vendors (x86.c).

KVM_RUN (`run`) returns to its caller at every user exit, as in KVM: the exit handler stores
the exit and its completion (vcpu->arch.complete_userspace_io), the hardware stops, `run`
returns the exit, userspace writes its answer into the exit's reply slot, and the next `run`
first runs the completion with that answer (x86.c kvm_arch_vcpu_ioctl_run ->
complete_userspace_io) before re-entering the guest.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

from testbed.decode import decode_one, describe
from testbed.errors import GuestMemoryError
from testbed.hw.exits import (
    EXITINTINFO_VALID,
    NPF_FETCH,
    NPF_GUEST_ENC,
    NPF_GUEST_PAGE,
    NPF_WRITE,
    SVM_IOIO_PORT_SHIFT,
    SVM_IOIO_SIZE_SHIFT,
    SVM_IOIO_STR,
    SVM_IOIO_TYPE_IN,
    VMX_IO_IN,
    VMX_IO_PORT_SHIFT,
    VMX_IO_SIZE_MASK,
    VMX_IO_STRING,
    RunStop,
    StopReason,
    SvmExitCode,
    VcpuHardware,
    Vendor,
    VmxExitReason,
    ept_violation_qualification,
)
from testbed.hw.memory import HostMemory
from testbed.kvm.hypercall import (
    KVM_HC_PAGE_ENC_STATUS,
    HypercallOutcome,
    PvCpuid,
    complete_ret,
    emulate_hypercall,
    page_enc_status_hc,
)
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.msr import (
    FEAT_CTL_LOCKED,
    KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
    KVM_MSR_RET_EINVAL,
    KVM_MSR_RET_ERR,
    KVM_MSR_RET_FILTERED,
    MSR_IA32_FEAT_CTL,
    MSR_IA32_MCG_EXT_CTL,
    MSR_OK,
    PASSTHROUGH_MSRS,
    PV_MSR_FEATURES,
    SEV_ES_UNINTERCEPTED_MSRS,
    TDX_EMULATED_MSRS,
    TDX_READ_ONLY_MSRS,
    X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
    PvMsrState,
    kvm_msr_reason,
    msr_value,
)
from testbed.kvm.sev import SevEsHandler, SevFatalError, SevState
from testbed.kvm.tdx import TdxVcpu
from testbed.kvm.uapi import (
    KVM_HC_CLOCK_PAIRING,
    KVM_HC_KICK_CPU,
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_SCHED_YIELD,
    KVM_HC_SEND_IPI,
    KVM_HC_TESTBED_DONATE_ENC_STATUS,
    KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_X86_QUIRK_FIX_HYPERCALL_INSN,
    KVM_X86_QUIRK_OUT_7E_INC_RIP,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IoInExit,
    IoOutExit,
    KvmExit,
    KvmVmType,
    MemoryFaultExit,
    MsrExit,
    RdmsrExit,
    ShutdownExit,
    WrmsrExit,
)
from testbed.kvm.vm import KvmVm
from testbed.trace import Tracer
from testbed.x86 import (
    CR0_WP,
    DR6_BS,
    PAGE_SIZE,
    RFLAGS_DF,
    RFLAGS_TF,
    U32,
    U64,
    VMCALL_BYTES,
    VMMCALL_BYTES,
    Reg,
    Vector,
)
from testbed.x86.paging import ACCESS_FETCH, ACCESS_READ, ACCESS_WRITE, PageFault, PagingMode, walk
from testbed.x86.pio import (
    LEGACY_PREFIXES,
    MAX_INSN_LENGTH,
    REX_PREFIXES,
    SEG_FS,
    SEG_GS,
    STRING_IO_OPCODES,
    decode_io,
    prefix_count,
)

#: Hypercalls whose result depends on a0..a3.
_HYPERCALLS_WITH_ARGS = frozenset({KVM_HC_KICK_CPU, KVM_HC_CLOCK_PAIRING, KVM_HC_SEND_IPI, KVM_HC_SCHED_YIELD,
                                   KVM_HC_MAP_GPA_RANGE, KVM_HC_TESTBED_DONATE_ENC_STATUS})


class KvmVcpu:
    """One vCPU of `vm`, running on `hw` (the hardware model's VMCB/VMCS view)."""

    def __init__(
        self, vm: KvmVm, hw: VcpuHardware, tracer: Tracer | None = None, paging: PagingMode | None = None
    ) -> None:
        self.vm = vm
        self.hw = hw
        self.tracer = tracer if tracer is not None else Tracer.disabled()
        self._paging = paging if paging is not None else PagingMode()
        #: the user exit KVM_RUN returns next, set by an exit handler (run->exit_reason and its union)
        self._exit: KvmExit | None = None
        #: the hardware is running inside run(): an exit stops it
        self._running = False
        #: run()'s internal fast path (see run)
        self._handled: Callable[[KvmExit], bool] | None = None
        self._pending_completion: Callable[[], None] | None = None
        #: the linear RIP where the last KVM_RUN returned to userspace with an exit (None inside
        #: a run): port I/O completions check it (handle_pio)
        self._exit_linear_rip: int | None = None
        #: set when an exit handler fails: KVM_RUN returns this error, with no exit reason
        self._run_error: KvmIoctlError | None = None
        self.stat_hypercalls = 0
        self._pv = PvCpuid()
        self.pv_msrs = PvMsrState()
        # KVM intercepts #UD for every VM except SEV ones (sev_init_vmcb() clears it) and TDs,
        # whose exceptions KVM cannot intercept: the TDX module delivers them in the guest
        # (tdx_handle_exception_nmi() treats any exit but NMI/#MC as unexpected).
        hw.set_intercept_ud(not (vm.sev or vm.tdx))
        # The MSR permission bitmap: every MSR exits except those the emulator holds (kvm/msr.py).
        hw.set_msr_passthrough(PASSTHROUGH_MSRS)
        self._handlers: dict[int, Callable[[int, int], None]] = self._exit_table()
        #: the exit code tested before the table (svm_invoke_exit_handler's hot codes)
        self._hypercall_exit = int(SvmExitCode.SVM_EXIT_VMMCALL if hw.vendor is Vendor.AMD
                                   else VmxExitReason.EXIT_REASON_VMCALL)
        self.sev_state: SevState | None = None
        self.sev_es: SevEsHandler | None = None
        if vm.type in (KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM):
            self.sev_state = SevState(
                msr=hw,  # the GHCB MSR stays the hardware's: KVM reads and writes it there
                snp=vm.type == KvmVmType.KVM_X86_SNP_VM,
                ghcb_version=vm.ghcb_version,
                c_bit=vm.c_bit,
                hypercall_exit_enabled=lambda: bool(vm.hypercall_exit_mask & (1 << KVM_HC_MAP_GPA_RANGE)),
                kvm_version=vm.kvm_version,
            )
            self.sev_es = SevEsHandler(self.sev_state, self, self.tracer)
            self._handlers[int(SvmExitCode.SVM_EXIT_VMGEXIT)] = lambda i1, i2: self.handle_vmgexit()
        #: an event (interrupt, NMI) userspace made pending: kvm_vcpu_has_events() (inject_event)
        self.pending_event = False
        #: KVM_MP_STATE_HALTED with an in-kernel local APIC (a TD's TDVMCALL<HLT>): what
        #: completes the halt when an event wakes the vCPU; None while it is runnable
        self._halted: Callable[[], None] | None = None
        self.tdx: TdxVcpu | None = None
        if vm.tdx:
            # tdx_handle_exit(): the TD exit of a TDG.VP.VMCALL, and tdx_handle_ept_violation().
            tdx = self.tdx = TdxVcpu(self)
            self._handlers[int(VmxExitReason.EXIT_REASON_TDCALL)] = lambda i1, i2: tdx.handle_tdcall()
            self._handlers[int(VmxExitReason.EXIT_REASON_EPT_VIOLATION)] = tdx.handle_ept_violation
        # The VMCB/VMCS is set up: the hardware delivers this vCPU's exits to vmexit().
        hw.attach_hypervisor(self)
        vm.add_vcpu(hw)

    def reset(self) -> None:
        """vCPU RESET: for SEV-ES/SNP the GHCB MSR is preloaded with the SEV-information
        response (sev_es_init_vmcb)."""
        if self.sev_es is not None:
            self.sev_es.reset()

    # ------------------------------------------------------------ SEV-ES / SNP
    def handle_vmgexit(self) -> None:
        """SVM_EXIT_VMGEXIT: the GHCB MSR or page protocol (kvm/sev.py), KVM's only channel
        to a guest whose registers are encrypted."""
        assert self.sev_es is not None
        try:
            self.sev_es.handle_vmgexit()
        except SevFatalError as exc:
            # sev_handle_vmgexit() returned -errno: KVM_RUN itself fails, no exit reason is set.
            self.fail_run(exc.errno, f"VMGEXIT: {exc}")
        except GuestMemoryError as exc:
            # The GHCB (or scratch area) the guest named is a page the host may not touch: on
            # SNP an RMP-assigned private page. The model's single frame per GFN makes KVM's
            # access fault where real KVM would first reject the unregistered GHCB: VM-fatal
            # either way, never a host crash.
            self._exit_to_userspace(InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, f"VMGEXIT: {exc}"), None)

    @property
    def memory(self) -> HostMemory:
        """SevVcpuOps: the host's view of guest memory."""
        return self.vm.memory

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        """SevVcpuOps: kvm_cpuid()."""
        return self.vm.cpuid.lookup(function, index)

    def maxphyaddr(self) -> int:
        """SevVcpuOps: cpuid_query_maxphyaddr()."""
        return self.vm.maxphyaddr

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int,
                  complete: Callable[[int], None]) -> None:
        """SevVcpuOps: the GHCB's VMMCALL, through the one hypercall dispatcher (always a
        64-bit call for a protected guest)."""
        self.kvm_emulate_hypercall(nr, a0, a1, a2, a3, cpl, True, complete)

    def exit_to_userspace(self, run: KvmExit, complete: Callable[[], None] | None) -> None:
        """SevVcpuOps: a user exit with its completion."""
        self._exit_to_userspace(run, complete)

    def pio(self, port: int, size: int, is_in: bool, value: int, complete: Callable[[int], None]) -> None:
        """SevVcpuOps: port I/O through the GHCB: every port exits to userspace."""
        if is_in:
            run = IoInExit(size=size, port=port, count=1, data=bytearray(size))
            self._exit_to_userspace(run, lambda: complete(int.from_bytes(run.reply(size), "little")))
        else:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._exit_to_userspace(IoOutExit(size=size, port=port, count=1, data=data), lambda: complete(0))

    def msr(self, index: int, write: bool, value: int, complete: Callable[[bool, int], None]) -> None:
        """SevVcpuOps: RDMSR/WRMSR through the GHCB: msr_interception() runs the same
        kvm_emulate_rdmsr()/kvm_emulate_wrmsr() as for any other guest, on a guest whose state
        is protected."""
        self.msr_access(index, write, value, complete, sev_es=True)

    # -------------------------------------------------------------------- MSRs
    def msr_access(self, index: int, write: bool, value: int, complete: Callable[[bool, int], None],
                   *, td: bool = False, sev_es: bool = False) -> None:
        """kvm_emulate_rdmsr()/kvm_emulate_wrmsr() (arch/x86/kvm/x86.c): the filter, then
        the vendor's get_msr/set_msr and kvm_get_msr_common()/kvm_set_msr_common(); a failure
        exits to userspace if it enabled that reason (kvm_msr_user_space()), else
        complete(False, 0) injects #GP - but a write failing with -EINVAL fails KVM_RUN.

        `td`: a TD's TDVMCALL<RDMSR/WRMSR>: tdx_get_msr()/tdx_set_msr() fail (return 1, i.e.
        KVM_MSR_RET_ERR) for an MSR outside tdx_has_emulated_msr() and for a write of a
        read-only one; IA32_FEAT_CTL reads FEAT_CTL_LOCKED, IA32_MCG_EXT_CTL fails (no LMCE);
        the rest follow the common rules (tdx.c).
        `sev_es`: through an SEV-ES/SNP guest's GHCB: an MSR KVM does not intercept for it is
        refused by svm_get_msr()/svm_set_msr() with -EINVAL (sev_es_prevent_msr_access())."""
        index &= U32
        value &= (1 << 64) - 1
        msr_filter = self.vm.msr_filter
        access = KVM_MSR_FILTER_WRITE if write else KVM_MSR_FILTER_READ
        data = 0
        if msr_filter is not None and not msr_filter.allowed(index, access):
            ret = KVM_MSR_RET_FILTERED  # kvm_get_msr_with_filter() / kvm_set_msr_with_filter()
        elif sev_es and index in SEV_ES_UNINTERCEPTED_MSRS:
            ret = KVM_MSR_RET_EINVAL
        elif td and (index not in TDX_EMULATED_MSRS or index == MSR_IA32_MCG_EXT_CTL
                     or (write and index in TDX_READ_ONLY_MSRS)):
            ret = KVM_MSR_RET_ERR
        elif td and index == MSR_IA32_FEAT_CTL:
            ret, data = MSR_OK, FEAT_CTL_LOCKED  # no MCG_LMCE_P: not FEAT_CTL_LMCE_ENABLED
        elif X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST:
            if self.vm.in_kernel_lapic:
                # kvm_x2apic_msr_read()/_write() of the in-kernel APIC's registers: not modelled.
                self._exit_to_userspace(InternalErrorExit(
                    KVM_INTERNAL_ERROR_EMULATION,
                    f"{'WRMSR' if write else 'RDMSR'} 0x{index:x}: the in-kernel local APIC's x2APIC "
                    "registers are not modelled by the testbed"), None)
                return
            ret = KVM_MSR_RET_ERR  # kvm_x2apic_msr_read()/_write(): no in-kernel LAPIC, "return 1"
        else:
            feature = PV_MSR_FEATURES.get(index)
            has = feature is not None and self._pv.has(feature)
            if write:
                ret = self.pv_msrs.set(index, value, has)
            else:
                ret, data = self.pv_msrs.get(index, has)
        if self.tracer.enabled:
            self.tracer.emit("kvm", "msr", index=index, write=write, value=value if write else data, ret=ret)
        if ret == MSR_OK:
            complete(True, data)
            return
        reason = kvm_msr_reason(ret)
        if not self.vm.user_space_msr_mask & reason:
            if write and ret < 0:
                self.fail_run(-ret, f"WRMSR 0x{index:x} through the GHCB: KVM does not intercept it for an "
                                    "SEV-ES guest (sev_es_prevent_msr_access)")
                return
            complete(False, 0)
            return
        run: MsrExit = WrmsrExit(index, reason, data=value) if write else RdmsrExit(index, reason)

        def complete_msr(run: MsrExit = run) -> None:
            # complete_fast_rdmsr() / complete_fast_msr_access(): run->msr.error != 0 is #GP.
            complete(not run.error, run.data & ((1 << 64) - 1))

        self._exit_to_userspace(run, complete_msr)

    def handle_msr(self, write: bool) -> None:
        """SVM_EXIT_MSR / EXIT_REASON_MSR_READ|WRITE: RCX is the index, EDX:EAX the value."""
        hw = self.hw
        index = hw.read_reg(Reg.RCX) & U32
        value = msr_value(hw.read_reg(Reg.RAX), hw.read_reg(Reg.RDX)) if write else 0

        def complete(ok: bool, data: int) -> None:
            # kvm_complete_insn_gp(): #GP(0) on error, else skip the instruction.
            if not ok:
                hw.inject_exception(Vector.GP, 0)
                return
            if not write:
                hw.write_reg(Reg.RAX, data & U32)
                hw.write_reg(Reg.RDX, (data >> 32) & U32)
            self._skip_emulated_instruction()

        self.msr_access(index, write, value, complete)

    # ---------------------------------------------------------------- KVM_RUN
    def run(self, timeout_s: float, handled: Callable[[KvmExit], bool] | None = None) -> KvmExit | RunStop:
        """KVM_RUN: run the completion of the previous user exit with what userspace wrote into
        its reply slot, then the guest until the next user exit, which is returned.

        A RunStop instead when the hardware stopped without an exit: the time ran out (where
        KVM_RUN would return -EINTR to a signal), a breakpoint, or an emulator error. Raises
        KvmIoctlError when an exit handler or a completion failed with -errno (KVM_RUN returns
        -1 with no exit reason).

        `handled` is the testbed's internal fast path (README, Deliberate deviations): called
        at each user exit from inside the exit handler; True means userspace already answered
        it and the guest runs on at once (the completion runs now), without the emulator's
        stop and restart and the layers' return path (the README's deviation gives the measured
        ratio). False returns the exit, already answered, as usual."""
        vm = self.vm
        if vm.dead:
            # kvm_vm_dead(): KVM_RUN (and every vCPU ioctl) fails with EIO from now on.
            raise KvmIoctlError("KVM_RUN", errno.EIO, "the VM is dead (kvm_vm_dead)")
        pv = self._pv
        if pv.features != vm.pv_features or pv.enforce != vm.enforce_pv_feature_cpuid:
            self._pv = PvCpuid(vm.pv_features, vm.enforce_pv_feature_cpuid)  # KVM_SET_CPUID2 / the cap changed
        if self._pending_completion is not None:
            # The completion itself may exit again (the next page of a string I/O, a failed
            # copy): KVM_RUN returns without entering the guest.
            again = self.complete_pending()
            if again is not None:
                return again
        if self._halted is not None:
            # A halted vCPU runs again only when an event is pending (kvm_vcpu_has_events: the
            # halt completes and the event is delivered); else KVM_RUN blocks until a signal.
            if not self.pending_event:
                return self._halted_stop()
            wake, self._halted = self._halted, None
            wake()
        # An event still pending is delivered as the guest is entered (the testbed models no
        # interrupt delivery: it is consumed with no effect on the guest).
        self.pending_event = False
        self._running = True
        self._handled = handled
        try:
            stop = self.hw.run(timeout_s)
        finally:
            self._running = False
            self._handled = None
        if self._run_error is not None:
            error, self._run_error = self._run_error, None
            self._exit = None
            raise error
        if self._exit is not None:
            run, self._exit = self._exit, None
            self._exit_linear_rip = self.hw.linear_rip(self.hw.read_reg(Reg.RIP))
            return run
        if self._halted is not None:
            return self._halted_stop()
        return stop

    def halt(self, complete: Callable[[], None]) -> None:
        """__kvm_emulate_halt() with an in-kernel local APIC (a TD: KVM requires a split
        irqchip, tdx_vcpu_create): no exit to userspace; with an event pending the vCPU stays
        runnable and `complete` runs now, else it is KVM_MP_STATE_HALTED and `complete` runs
        when a KVM_RUN finds an event pending."""
        if self.take_pending_event():
            complete()
            return
        self._halted = complete
        if self.tracer.enabled:
            self.tracer.emit("kvm", "halted")
        self.hw.request_stop()

    @staticmethod
    def _halted_stop() -> RunStop:
        """KVM_RUN of a halted vCPU with nothing to wake it blocks until a signal: the VMM's
        deadline. The testbed models no interrupt source, so it returns that timeout at once
        (README, Deliberate deviations)."""
        return RunStop(StopReason.TIMEOUT, "vCPU halted (in-kernel local APIC) with nothing to wake it")

    def complete_pending(self) -> KvmExit | None:
        """KVM_RUN with kvm_run->immediate_exit = 1 (x86.c kvm_arch_vcpu_ioctl_run): the
        completion of the previous user exit runs (complete_userspace_io), then KVM_RUN returns
        -EINTR without entering the guest - how userspace makes the vCPU state consistent before
        saving it (Documentation/virt/kvm/api.rst, KVM_RUN: "userspace can ensure that the
        operation is complete by setting immediate_exit"). Returns the exit the completion
        itself raised (None normally); a failed completion raises KvmIoctlError."""
        if self._pending_completion is None:
            return None
        done, self._pending_completion = self._pending_completion, None
        try:
            done()
        except GuestMemoryError as exc:
            self._exit_to_userspace(InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, str(exc)), None)
        except SevFatalError as exc:
            # complete_userspace_io returned -errno (e.g. snp_complete_one_psc): KVM_RUN fails
            # before entering the guest.
            raise KvmIoctlError("KVM_RUN", exc.errno, f"completion: {exc}") from None
        finally:
            self._exit_linear_rip = None
        if self._run_error is not None:
            error, self._run_error = self._run_error, None
            raise error
        run, self._exit = self._exit, None
        if run is not None:  # the completion exited again: KVM_RUN returns it
            self._exit_linear_rip = self.hw.linear_rip(self.hw.read_reg(Reg.RIP))
        return run

    def inject_event(self) -> None:
        """Userspace makes an event pending (as KVM_INTERRUPT / KVM_NMI would): until the guest
        is next entered, kvm_vcpu_has_events() is true - a TD's MapGPA then stops with RETRY
        (tdx.c tdx_complete_vmcall_map_gpa)."""
        self.pending_event = True

    def take_pending_event(self) -> bool:
        """kvm_vcpu_has_events(); a true answer means KVM re-enters the guest to deliver the
        event, which consumes it."""
        pending, self.pending_event = self.pending_event, False
        return pending

    def fail_run(self, err: int, detail: str) -> None:
        """An exit handler returned -err: stop the vCPU and make KVM_RUN fail with err
        (KvmIoctlError from run()). Userspace gets no exit reason and no completion runs."""
        if self.tracer.enabled:
            self.tracer.emit("kvm", "kvm_run_error", errno=err, detail=detail)
        self._run_error = KvmIoctlError("KVM_RUN", err, detail)
        self._pending_completion = None
        if self._running:
            self.hw.request_stop()

    def _exit_to_userspace(self, run: KvmExit, complete: Callable[[], None] | None) -> None:
        """Return to userspace: KVM_RUN returns `run` (the hardware stops at the end of this
        exit), and `complete` runs at the start of the next KVM_RUN, after userspace has written
        its answer into the exit's reply slot."""
        if self.tracer.enabled:
            self.tracer.emit("kvm", "user_exit", **run.to_json())
        if self._exit is not None:
            # One exit per KVM_RUN: the first one stands (a handler exiting twice is a testbed bug,
            # which must not crash the host).
            if self.tracer.enabled:
                self.tracer.emit("kvm", "dropped_user_exit", **run.to_json())
            return
        handled = self._handled
        if handled is not None and self._running and handled(run):
            if complete is not None:
                complete()
            if self._exit is None and self._run_error is None:
                # The guest is entered again, as the next KVM_RUN would enter it after the
                # completion: an event still pending is consumed now (run() does it on entry).
                self.pending_event = False
            return
        self._exit = run
        self._pending_completion = complete
        if self._running:
            self.hw.request_stop()

    # ------------------------------------------------------------ exit dispatch
    def _exit_table(self) -> dict[int, Callable[[int, int], None]]:
        # Plain ints as keys: looking up an IntEnum member hashes in Python on every exit.
        if self.hw.vendor is Vendor.AMD:
            return {
                int(SvmExitCode.SVM_EXIT_VMMCALL): self._exit_hypercall,
                int(SvmExitCode.SVM_EXIT_UD): lambda i1, i2: self.handle_ud(),
                int(SvmExitCode.SVM_EXIT_IOIO): self._svm_io,
                int(SvmExitCode.SVM_EXIT_CPUID): lambda i1, i2: self.handle_cpuid(),
                int(SvmExitCode.SVM_EXIT_HLT): lambda i1, i2: self.handle_halt(),
                int(SvmExitCode.SVM_EXIT_SHUTDOWN): lambda i1, i2: self.handle_shutdown(),
                int(SvmExitCode.SVM_EXIT_NPF): self.handle_npf,
                int(SvmExitCode.SVM_EXIT_MSR): lambda i1, i2: self.handle_msr(bool(i1)),
                # kvm_emulate_wbinvd() / invd_interception(): no caches to flush, skipped
                int(SvmExitCode.SVM_EXIT_WBINVD): lambda i1, i2: self._skip_emulated_instruction(),
                int(SvmExitCode.SVM_EXIT_INVD): lambda i1, i2: self._skip_emulated_instruction(),
            }
        return {
            int(VmxExitReason.EXIT_REASON_VMCALL): self._exit_hypercall,
            int(VmxExitReason.EXIT_REASON_EXCEPTION_NMI): self._vmx_exception,
            int(VmxExitReason.EXIT_REASON_IO_INSTRUCTION): self._vmx_io,
            int(VmxExitReason.EXIT_REASON_CPUID): lambda i1, i2: self.handle_cpuid(),
            int(VmxExitReason.EXIT_REASON_HLT): lambda i1, i2: self.handle_halt(),
            int(VmxExitReason.EXIT_REASON_TRIPLE_FAULT): lambda i1, i2: self.handle_shutdown(),
            int(VmxExitReason.EXIT_REASON_EPT_VIOLATION): self.handle_npf,
            int(VmxExitReason.EXIT_REASON_MSR_READ): lambda i1, i2: self.handle_msr(False),
            int(VmxExitReason.EXIT_REASON_MSR_WRITE): lambda i1, i2: self.handle_msr(True),
            # kvm_emulate_wbinvd / kvm_emulate_invd
            int(VmxExitReason.EXIT_REASON_WBINVD): lambda i1, i2: self._skip_emulated_instruction(),
            int(VmxExitReason.EXIT_REASON_INVD): lambda i1, i2: self._skip_emulated_instruction(),
        }

    def _exit_hypercall(self, _info1: int, _info2: int) -> None:
        self.handle_hypercall()

    def vmexit(self, code: int, info1: int, info2: int) -> None:
        """The hardware's entry into KVM for every VM exit (the native hypercall also has the
        fastpath `native_hypercall`, which the hardware calls directly when nothing traces).

        As svm_invoke_exit_handler() (svm.c) and __vmx_handle_exit() (vmx.c) test the hot
        exit codes before the handler table, the native hypercall is taken first when no
        tracer asks for the generic path's record."""
        if code == self._hypercall_exit and not self.tracer.enabled:
            self.handle_hypercall()
            return
        handler = self._handlers.get(code)
        if self.tracer.enabled:
            codes = SvmExitCode if self.hw.vendor is Vendor.AMD else VmxExitReason
            name = codes(code).name if code in codes._value2member_map_ else f"0x{code:x}"
            self.tracer.emit("kvm", "handle_exit", code=code, name=name)
        if handler is None:
            self._exit_to_userspace(
                InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, f"unhandled exit code 0x{code:x}"), None
            )
            return
        try:
            handler(info1, info2)
        except GuestMemoryError as exc:
            # A guest-named address the host may not access (outside memory, RMP-protected):
            # KVM_RUN fails for this VM; the host carries on.
            self._exit_to_userspace(InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, str(exc)), None)

    def _svm_io(self, info1: int, _info2: int) -> None:
        size = ((info1 >> SVM_IOIO_SIZE_SHIFT) & 7) or 1
        size = {1: 1, 2: 2, 4: 4}.get(size, 1)
        if info1 & SVM_IOIO_STR:
            # io_interception(): string I/O goes to the emulator (an SEV-ES guest's never
            # reaches here: its INS/OUTS raise #VC and come through the GHCB).
            self.handle_string_pio()
            return
        self.handle_pio(info1 >> SVM_IOIO_PORT_SHIFT, size, bool(info1 & SVM_IOIO_TYPE_IN))

    def _vmx_io(self, qual: int, _info2: int) -> None:
        if qual & VMX_IO_STRING:
            self.handle_string_pio()  # handle_io(): kvm_emulate_instruction(vcpu, 0)
            return
        self.handle_pio((qual >> VMX_IO_PORT_SHIFT) & 0xFFFF, (qual & VMX_IO_SIZE_MASK) + 1, bool(qual & VMX_IO_IN))

    def _vmx_exception(self, intr_info: int, _info2: int) -> None:
        if intr_info & 0xFF == Vector.UD:
            self.handle_ud()
        else:
            self._emulation_failure(f"unexpected exception exit 0x{intr_info:x}")

    def _emulation_failure(self, detail: str) -> None:
        self._exit_to_userspace(InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, detail), None)

    # --------------------------------------------------------------- hypercalls
    def handle_hypercall(self) -> None:
        """The native VMCALL/VMMCALL exit taken through `vmexit`: the registers read from the
        VMCB save area, then `native_hypercall`."""
        hw = self.hw
        nr, cs, op_64_bit = hw.hypercall_regs()
        if cs & 3 == 0 and ((nr if op_64_bit else nr & U32) in _HYPERCALLS_WITH_ARGS or self.tracer.enabled):
            a0, a1, a2, a3 = hw.hypercall_args()
        else:
            # KVM reads RBX/RCX/RDX/RSI unconditionally; skipping reads whose values cannot
            # change the outcome is unobservable and halves the register traffic per exit.
            a0 = a1 = a2 = a3 = 0
        ret = self.native_hypercall(nr, cs, op_64_bit, a0, a1, a2, a3)
        if ret is not None:
            self._complete_hypercall(ret)

    def _complete_hypercall(self, ret: int) -> None:
        """RAX = ret and RIP past the VMCALL/VMMCALL (kvm_emulate_hypercall's
        kvm_skip_emulated_instruction), with the trap flag's #DB after it."""
        self.hw.complete_hypercall(ret)
        self._single_step()

    def _skip_emulated_instruction(self) -> None:
        """kvm_skip_emulated_instruction(): RIP past the instruction KVM emulated; with RFLAGS.TF
        set, kvm_vcpu_do_singlestep() queues #DB (DR6.BS) - unless the emulator retired the
        instruction itself, and with it its own single-step trap."""
        if not self.hw.skip_instruction():
            self._single_step()

    def _single_step(self) -> None:
        """kvm_vcpu_do_singlestep(): after an instruction KVM skipped with RFLAGS.TF set, #DB with
        DR6.BS, delivered as the guest is entered. Not for a guest with protected state, whose
        RIP and RFLAGS KVM neither reads nor moves."""
        hw = self.hw
        if self.vm.protected_state or not hw.read_reg(Reg.RFLAGS) & RFLAGS_TF:
            return
        hw.write_reg(Reg.DR6, hw.read_reg(Reg.DR6) | DR6_BS)
        hw.inject_exception(Vector.DB)

    def native_hypercall(self, nr: int, cs: int, long_mode: bool, a0: int, a1: int, a2: int,
                         a3: int) -> int | None:
        """The native VMCALL/VMMCALL exit: kvm_emulate_hypercall() on the guest's registers.
        Returns the value to complete the instruction with (RAX, and RIP past it: the caller's
        complete_hypercall), or None when the hypercall was completed here or waits for
        userspace. The hardware calls it directly as KVM's exit fastpath (hw/exits.py
        HypercallFastpath: the registers handed over, the completion written in the same hook)
        when nothing traces; `handle_hypercall` ends here too."""
        cpl = cs & 3
        if self.tracer.enabled or self.vm.page_enc_status_protocol:
            self.kvm_emulate_hypercall(nr, a0, a1, a2, a3, cpl, long_mode, self._complete_hypercall)
            return None
        # kvm_emulate_hypercall() and _dispatch_hypercall() inlined for their common case (no
        # trace record, no seed-era in-kernel PAGE_ENC_STATUS): the same emulate_hypercall()
        # decides; two Python frames less on the most frequent exit.
        self.stat_hypercalls += 1  # ____kvm_emulate_hypercall(): on entry, user exits included
        outcome = emulate_hypercall(nr, a0, a1, a2, a3, cpl, long_mode, self._pv, self.vm.hypercall_exit_mask)
        if outcome.user_exit is None:
            return outcome.ret & U64 if long_mode else outcome.ret & U32  # complete_ret()
        self._hypercall_user_exit(outcome.user_exit, long_mode, self._complete_hypercall)
        return None

    def kvm_emulate_hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int, op_64_bit: bool,
                              complete: Callable[[int], None]) -> None:
        """The one hypercall dispatcher (x86.c kvm_emulate_hypercall /
        ____kvm_emulate_hypercall) for every way a guest makes a hypercall: the native
        VMCALL/VMMCALL exit, the GHCB's VMMCALL (sev.c) and, next, a TD's TDVMCALL.
        `complete(ret)` writes the result where the caller's ABI wants it (RAX, the GHCB's
        RAX): at once for in-kernel hypercalls, after userspace answered for a user exit."""
        self.stat_hypercalls += 1  # ____kvm_emulate_hypercall(): on entry, user exits included
        outcome = self._dispatch_hypercall(nr, a0, a1, a2, a3, cpl, op_64_bit)
        if self.tracer.enabled:
            self.tracer.emit("kvm", "hypercall", nr=nr, args=[a0, a1, a2, a3], cpl=cpl, ret=outcome.ret,
                             user_exit=outcome.user_exit is not None)
        if outcome.not_modelled is not None:
            self._exit_to_userspace(InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, outcome.not_modelled), None)
            return
        if outcome.user_exit is None:
            complete(outcome.ret & U64 if op_64_bit else outcome.ret & U32)  # complete_ret(), inlined
            return
        self._hypercall_user_exit(outcome.user_exit, op_64_bit, complete)

    def _hypercall_user_exit(self, run: HypercallExit, op_64_bit: bool, complete: Callable[[int], None]) -> None:
        """KVM_EXIT_HYPERCALL: userspace answers in run.ret, complete_hypercall_exit() completes."""

        def complete_hypercall_exit() -> None:
            # complete_hypercall_exit(): ret is written raw, KVM does not interpret it.
            complete(complete_ret(run.ret, op_64_bit))

        self._exit_to_userspace(run, complete_hypercall_exit)

    def _dispatch_hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int,
                            op_64_bit: bool) -> HypercallOutcome:
        """The one dispatch every path uses (VMCALL/VMMCALL exits, the GHCB's VMMCALL): the
        seed-era in-kernel KVM_HC_PAGE_ENC_STATUS when that protocol is chosen, else
        ____kvm_emulate_hypercall()."""
        if self.vm.page_enc_status_protocol and cpl == 0:
            # v9's kvm_emulate_hypercall(): outside 64-bit mode nr and a0..a3 are truncated to
            # 32 bits before `switch (nr)`; in 64-bit mode nr is compared whole.
            if not op_64_bit:
                nr, a0, a1, a2 = nr & U32, a0 & U32, a1 & U32, a2 & U32
            if nr == KVM_HC_PAGE_ENC_STATUS:
                return page_enc_status_hc(self.vm, a0, a1, a2)
        return emulate_hypercall(nr, a0, a1, a2, a3, cpl, op_64_bit, self._pv, self.vm.hypercall_exit_mask,
                                 self.vm.in_kernel_lapic)

    # ---------------------------------------------------------------------- #UD
    def handle_ud(self) -> None:
        """handle_ud(): emulate with EMULTYPE_TRAP_UD; only VMCALL/VMMCALL are emulated.

        The emulator reads the bytes at RIP through the *host's* view of guest memory (walking
        the guest's page tables the same way), decodes them, and for a hypercall either patches
        in the native instruction and lets the guest re-execute it
        (KVM_X86_QUIRK_FIX_HYPERCALL_INSN) or injects #UD. Anything else fails to emulate,
        which for EMULTYPE_TRAP_UD also means #UD.
        """
        hw = self.hw
        rip = hw.read_reg(Reg.RIP)
        # The emulator fetches at CS.base + RIP (RIP is CS-relative outside 64-bit mode).
        code = self._read_guest_virt(hw.linear_rip(rip), 15, ACCESS_FETCH)
        insn = decode_one(code, rip) if code is not None else None
        if self.tracer.enabled:
            self.tracer.emit("kvm", "emulate_ud", rip=rip, host_bytes=(code or b"")[:4],
                             decode=describe(code) if code else "unreadable")
        if insn is None or insn.mnemonic not in ("vmcall", "vmmcall"):
            hw.inject_exception(Vector.UD)
            return
        if insn.mnemonic == "vmcall" and hw.cpl() != 0:
            # emulate.c: VMCALL is `Priv` in group7_rm0 (VMMCALL in group7_rm3 only `Prot`), and
            # x86_emulate_insn() checks privilege before em_hypercall() runs: #GP(0), nothing
            # patched, whatever KVM_X86_QUIRK_FIX_HYPERCALL_INSN says.
            hw.inject_exception(Vector.GP, 0)
            return
        if not self.vm.quirk_enabled(KVM_X86_QUIRK_FIX_HYPERCALL_INSN):
            # The quirk is off: the emulator synthesises #UD and patches nothing.
            hw.inject_exception(Vector.UD)
            return
        native = VMMCALL_BYTES if hw.vendor is Vendor.AMD else VMCALL_BYTES
        # emulator_fix_hypercall() writes at kvm_rip_read(), RIP itself, not CS.base + RIP: with
        # a non-zero CS base the patch misses the instruction, which faults again (KVM's own
        # behaviour, modelled as is: the guest then loops on #UD inside KVM_RUN).
        if not self._write_guest_virt(rip, native):
            return  # the write faulted: #PF was injected
        hw.flush_code()
        if self.tracer.enabled:
            self.tracer.emit("kvm", "fix_hypercall", rip=rip, old=insn.raw, new=native)
        # RIP is not advanced: "Let the processor re-execute the fixed hypercall".

    def _walk(self, gva: int, access: int) -> int | PageFault:
        hw = self.hw
        mem = self.vm.memory
        cr3 = hw.read_reg(Reg.CR3)
        wp = bool(hw.read_reg(Reg.CR0) & CR0_WP)

        def read_u64(pa: int) -> int:
            return int.from_bytes(mem.read(pa, 8), "little")

        try:
            # A table outside guest memory fails the walk as not present, as in
            # paging_tmpl.h FNAME(walk_addr_generic) (no visible memslot -> goto error).
            result = walk(read_u64, cr3, gva, access, hw.cpl() == 3, self._paging, wp=wp, mem_size=mem.size)
        except Exception:  # a table outside memory: treat as not present
            return PageFault(gva, 0)
        if isinstance(result, PageFault):
            return result
        return result.gpa | (gva & 0xFFF)

    def _virt_pieces(self, gva: int, length: int, access: int) -> Iterator[tuple[int, int | PageFault, int]]:
        """[gva, gva + length) page by page, as the emulator walks it: (offset, the piece's GPA
        or the walk's #PF, its size)."""
        pos = 0
        while pos < length:
            cur = gva + pos
            n = min(length - pos, PAGE_SIZE - (cur & 0xFFF))
            yield pos, self._walk(cur, access), n
            pos += n

    def _inject_pf(self, gva: int, fault: PageFault) -> None:
        self.hw.write_reg(Reg.CR2, gva)
        self.hw.inject_exception(Vector.PF, fault.error_code)

    def _read_guest_virt(self, gva: int, length: int, access: int, *, fault: bool = False) -> bytes | None:
        """kvm_fetch_guest_virt()/kvm_read_guest_virt() through the host's view: what could be
        read before a piece that faults (None if nothing). With `fault`, the emulator's
        segmented_read(): a faulting piece injects #PF (CR2) and gives None."""
        out = bytearray()
        for pos, gpa, n in self._virt_pieces(gva, length, access):
            if isinstance(gpa, PageFault):
                if fault:
                    self._inject_pf(gva + pos, gpa)
                    return None
                return bytes(out) if out else None
            out += self.vm.memory.read(gpa, n)
        return bytes(out)

    def _write_guest_virt(self, gva: int, data: bytes) -> bool:
        """emulator_write_emulated(): a faulting write injects #PF and returns False."""
        for pos, gpa, n in self._virt_pieces(gva, len(data), ACCESS_WRITE):
            if isinstance(gpa, PageFault):
                self._inject_pf(gva + pos, gpa)
                return False
            self.vm.memory.write(gpa, data[pos : pos + n])
        return True

    # ---------------------------------------------------------------- port I/O
    def handle_pio(self, port: int, size: int, is_in: bool) -> None:
        """kvm_fast_pio(): no in-kernel device on any port, so every access exits to userspace.
        The completion runs only if RIP is where KVM_RUN left it (complete_fast_pio_in/out:
        `kvm_is_linear_rip(vcpu, vcpu->arch.pio.linear_rip)`): userspace that moved RIP gets
        neither the IN's RAX nor the skip. An OUT to port 0x7e with KVM_X86_QUIRK_OUT_7E_INC_RIP
        (on by default) is skipped before the exit, and its completion does nothing
        (complete_fast_pio_out_port_0x7e)."""
        hw = self.hw
        if is_in:
            run = IoInExit(size=size, port=port, count=1, data=bytearray(size))

            def complete_fast_pio_in(run: IoInExit = run) -> None:
                # complete_fast_pio_in(): RAX from the data area (below 32 bits merged, a 32-bit
                # IN zero-extends), then kvm_skip_emulated_instruction().
                if self._rip_moved_since_exit():
                    return
                value = int.from_bytes(run.reply(size), "little")
                rax = 0 if size == 4 else hw.read_reg(Reg.RAX) & ~((1 << (8 * size)) - 1)
                hw.write_reg(Reg.RAX, rax | value)
                self._skip_emulated_instruction()

            # An IN the hardware let complete natively (no site hook) returns all ones (no device).
            hw.set_io_in_result((1 << (8 * size)) - 1)
            self._exit_to_userspace(run, complete_fast_pio_in)
            return
        value = hw.read_reg(Reg.RAX) & ((1 << (8 * size)) - 1)
        out = IoOutExit(size=size, port=port, count=1, data=value.to_bytes(size, "little"))
        if port == 0x7E and self.vm.quirk_enabled(KVM_X86_QUIRK_OUT_7E_INC_RIP):
            # kvm_fast_pio_out(): "Workaround userspace that relies on old KVM behavior of %rip
            # being incremented prior to exiting to userspace to handle 'OUT 0x7e'."
            self._skip_emulated_instruction()
            self._exit_to_userspace(out, None)
            return

        def complete_fast_pio_out() -> None:
            # complete_fast_pio_out(): the OUT is skipped on the next KVM_RUN, unless userspace
            # moved RIP.
            if not self._rip_moved_since_exit():
                self._skip_emulated_instruction()

        self._exit_to_userspace(out, complete_fast_pio_out)

    def _rip_moved_since_exit(self) -> bool:
        """Whether the linear RIP differs from where the last KVM_RUN returned to userspace
        (kvm_is_linear_rip against the RIP saved at the exit; the internal fast path, which
        completes inside KVM_RUN, never moves it)."""
        saved = self._exit_linear_rip
        return saved is not None and self.hw.linear_rip(self.hw.read_reg(Reg.RIP)) != saved

    def handle_string_pio(self) -> None:
        """INS/OUTS: x86_emulate_instruction(vcpu, 0), which decodes the instruction from guest
        memory. An SEV guest's bytes are ciphertext to KVM and no instruction buffer comes with
        an IOIO exit: svm_check_emulate_instruction() injects #UD (which is why Linux unrolls
        string I/O in SEV guests, CC_ATTR_GUEST_UNROLL_STRING_IO). Otherwise, as emulate.c
        does: REP with RCX = 0 only skips the instruction; OUTS reads one element at its source
        and exits with it (em_out: count 1), INS exits once for up to min(the bytes left in
        the page, 1024 / size, RCX) elements (pio_in_emulated's read-ahead) and writes them to
        ES:RDI (forward REP INS all at once); RSI/RDI move by the size (backwards with DF) and
        REP counts RCX down (REP with ECX = 0 on Intel clears RCX: string_registers_quirk), and the
        instruction is run again until RCX is 0 (the emulator restarts it inside KVM_RUN; here
        the guest re-executes it: the same exits). A fault at the source or destination is the
        #PF KVM injects. Modelled in 64-bit code, through ES, CS, SS and DS (base 0 there);
        anything else is an emulation failure, not a guess."""
        hw = self.hw
        if self.vm.sev:
            hw.inject_exception(Vector.UD)
            return
        rip = hw.read_reg(Reg.RIP)
        long_mode = hw.is_64bit_mode()
        code = self._read_guest_virt(rip, MAX_INSN_LENGTH, ACCESS_FETCH) or b""
        prefixes = prefix_count(code, LEGACY_PREFIXES | REX_PREFIXES if long_mode else LEGACY_PREFIXES)
        if prefixes >= len(code) and len(code) < MAX_INSN_LENGTH:
            # The decoder's fetch faults (the guest's tables changed under the instruction, e.g.
            # the INS overwrote them): x86_emulate_instruction() injects that #PF.
            self._read_guest_virt(rip + len(code), 1, ACCESS_FETCH, fault=True)
            return
        if prefixes >= len(code) or code[prefixes] not in STRING_IO_OPCODES:
            self._emulation_failure(f"string I/O exit at 0x{rip:x} whose bytes are no INS/OUTS")
            return
        io = decode_io(code, prefixes, long_mode, hw.read_reg(Reg.RDX))
        if not long_mode or io.segment in (SEG_FS, SEG_GS):
            self._emulation_failure("string I/O outside 64-bit code or through FS/GS is not modelled")
            return
        mask = (1 << (8 * io.addr_size)) - 1
        rcx = hw.read_reg(Reg.RCX) & mask
        if io.rep and rcx == 0:
            if io.addr_size == 4 and hw.vendor is Vendor.INTEL:
                hw.write_reg(Reg.RCX, 0)  # string_registers_quirk(): Intel clears RCX's upper half
            self._skip_emulated_instruction()
            return
        step = -io.size if hw.read_reg(Reg.RFLAGS) & RFLAGS_DF else io.size
        index = Reg.RDI if io.is_in else Reg.RSI
        address = hw.read_reg(index) & mask

        def advance(n: int) -> None:
            self._assign(index, address + n * step, io.addr_size)
            left = rcx - n if io.rep else 0
            if io.rep:
                self._assign(Reg.RCX, left, io.addr_size)
            if left == 0:
                self._skip_emulated_instruction()
            # else RIP stays: the next iteration runs the instruction again

        if not io.is_in:
            data = self._read_guest_virt(address, io.size, ACCESS_READ, fault=True)
            if data is not None:
                self._exit_to_userspace(IoOutExit(size=io.size, port=io.port, count=1, data=data),
                                        lambda: advance(1))
            return
        in_page = address & 0xFFF if step < 0 else PAGE_SIZE - (address & 0xFFF)
        count = min(in_page, 1024 // io.size, rcx if io.rep else 1) or 1
        run = IoInExit(size=io.size, port=io.port, count=count, data=bytearray(io.size * count))

        def complete_ins(run: IoInExit = run) -> None:
            data = run.reply(io.size * count)
            if io.rep and step > 0:
                # pio_in_emulated(): forward REP INS writes the whole read-ahead at once
                # (OP_MEM_STR); a fault leaves RDI and RCX as they were (the bytes on a first
                # page are written, emulator_read_write() splitting at the page end).
                if self._write_guest_virt(address, data):
                    advance(count)
                return
            for i in range(count):
                # one element per emulated iteration; a faulting one stops there (#PF injected)
                if not self._write_guest_virt((address + i * step) & mask, data[i * io.size : (i + 1) * io.size]):
                    self._assign(index, address + i * step, io.addr_size)
                    if io.rep:
                        self._assign(Reg.RCX, rcx - i, io.addr_size)
                    return
            advance(count)

        self._exit_to_userspace(run, complete_ins)

    def _assign(self, reg: Reg, value: int, addr_size: int) -> None:
        """emulate.c assign_register(): a 2-byte write keeps the upper bits, a 4-byte one
        zero-extends (64-bit code), an 8-byte one is whole."""
        if addr_size == 2:
            value = (self.hw.read_reg(reg) & ~0xFFFF) | (value & 0xFFFF)
        elif addr_size == 4:
            value &= U32
        self.hw.write_reg(reg, value & U64)

    # -------------------------------------------------------------------- misc
    def handle_cpuid(self) -> None:
        """kvm_emulate_cpuid(): answer from the table userspace set with KVM_SET_CPUID2."""
        hw = self.hw
        function = hw.read_reg(Reg.RAX) & U32
        index = hw.read_reg(Reg.RCX) & U32
        eax, ebx, ecx, edx = self.vm.cpuid.lookup(function, index)
        hw.write_reg(Reg.RAX, eax)
        hw.write_reg(Reg.RBX, ebx)
        hw.write_reg(Reg.RCX, ecx)
        hw.write_reg(Reg.RDX, edx)
        self._skip_emulated_instruction()

    def handle_halt(self) -> None:
        """kvm_emulate_halt(): with no in-kernel local APIC, HLT exits as KVM_EXIT_HLT."""
        self._exit_to_userspace(HltExit(), None)

    def handle_shutdown(self) -> None:
        """shutdown_interception() / handle_triple_fault(): KVM_EXIT_SHUTDOWN."""
        self._exit_to_userspace(ShutdownExit(), None)

    def handle_npf(self, error: int, gpa: int, *, private: bool | None = None) -> None:
        """A nested page fault: a private/shared mismatch, or a GPA outside guest memory.

        kvm_mmu_page_fault(): when the access's private-ness (the C-bit, PFERR_GUEST_ENC)
        disagrees with the GFN's memory attribute, KVM exits with KVM_EXIT_MEMORY_FAULT
        (kvm_mmu_prepare_memory_fault_exit) and retries the access when KVM_RUN is called
        again. A GPA outside guest memory has no memslot: kvm_handle_noslot_fault() makes it
        emulated MMIO (RET_PF_EMULATE), and x86_emulate_instruction() then decides:

        * the CPU was delivering an event (EXITINTINFO valid): kvm_check_emulate_insn() ->
          svm/vmx_check_emulate_instruction() refuse emulation on #PF during vectoring
          (kvm_can_emulate_event_vectoring), and kvm_prepare_event_vectoring_exit() ends
          KVM_RUN with KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_DELIVERY_EV;
        * the GPA is a guest page-table entry (PFERR_GUEST_PAGE): for a guest whose memory
          KVM can read, the emulator walks the guest's tables itself, fails at the entry with
          no memslot (paging_tmpl.h FNAME(walk_addr_generic) -> error) and injects that #PF
          (x86_emulate_instruction: ctxt->have_exception -> inject_emulated_exception). For
          SEV guests svm_check_emulate_instruction() returns X86EMUL_RETRY_INSTR (SEV-ES/SNP:
          no emulation at all; SEV: no instruction bytes for a faulting fetch, and a #NPF
          on a guest page-table access skips the erratum-1096 path), so the vCPU re-enters,
          faults again, and never leaves KVM_RUN: the run ends at its timeout;
        * the final access: KVM would emulate it and exit with KVM_EXIT_MMIO; the testbed
          models no MMIO devices and ends with KVM_EXIT_INTERNAL_ERROR (emulation) instead.

        `private`: the access's private-ness where the exit does not carry it in the error
        code (a TD's EPT violation: the shared bit of the GPA, kvm/tdx.py).
        """
        attrs = self.vm.mem_attrs
        if attrs is not None:
            # kvm_mmu_faultin_pfn(): a private/shared mismatch exits before the memslot is looked
            # at, and kvm_handle_noslot_fault() sends a private access without a memslot to
            # userspace the same way (no MMIO is private).
            is_private = bool(error & NPF_GUEST_ENC) if private is None else private
            if self.vm.type == KvmVmType.KVM_X86_SW_PROTECTED_VM and attrs.is_private(gpa >> 12):
                is_private = True  # kvm_mmu_page_fault(): PFERR_PRIVATE_ACCESS from the attribute
            outside = gpa >= self.vm.memory.size
            # Legacy SEV's attributes are the testbed's extension (KVM has no private faults
            # there): outside RAM it takes KVM's no-memslot path below.
            checked = self.vm.guest_memfd or not outside
            if checked and (is_private != attrs.is_private(gpa >> 12) or (is_private and outside)):
                flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if is_private else 0
                if self.tracer.enabled:
                    self.tracer.emit("kvm", "memory_fault", gpa=gpa, private=is_private)
                self._exit_to_userspace(MemoryFaultExit(flags=flags, gpa=gpa & ~0xFFF, size=PAGE_SIZE), None)
                return
        vectoring = self.hw.exit_int_info()
        if vectoring & EXITINTINFO_VALID:
            vector = vectoring & 0xFF
            # run->internal.data as kvm_prepare_event_vectoring_exit() fills it: info2, the exit
            # reason, info1, the GPA, last_vmentry_cpu (0: one pCPU). get_exit_info() gives on
            # SVM EXITINFO2 (the GPA) and EXITINFO1 (the NPF error code); on VMX
            # (vmx_get_exit_info) the IDT-vectoring information and the exit qualification.
            if self.hw.vendor is Vendor.AMD:
                data = (gpa, int(SvmExitCode.SVM_EXIT_NPF), error, gpa, 0)
            else:
                data = (vectoring & U32, int(VmxExitReason.EXIT_REASON_EPT_VIOLATION),
                        ept_violation_qualification(error), gpa, 0)
            self._exit_to_userspace(InternalErrorExit(
                KVM_INTERNAL_ERROR_DELIVERY_EV,
                f"delivering vector {vector} touched gpa 0x{gpa:x} outside guest memory", data), None)
            return
        if error & NPF_GUEST_PAGE:
            if self.vm.sev or self.vm.tdx:
                if self.tracer.enabled:
                    self.tracer.emit("kvm", "npf_retry", gpa=gpa, reason="SEV guest: no emulation")
                return  # X86EMUL_RETRY_INSTR: re-enter the guest, which faults again
            gva = self.hw.npf_linear_address()
            access = ACCESS_WRITE if error & NPF_WRITE else ACCESS_FETCH if error & NPF_FETCH else ACCESS_READ
            fault = self._walk(gva, access)
            if isinstance(fault, PageFault):
                if self.tracer.enabled:
                    self.tracer.emit("kvm", "inject_pf", gva=gva, error_code=fault.error_code, table_gpa=gpa)
                self.hw.write_reg(Reg.CR2, gva)
                self.hw.inject_exception(Vector.PF, fault.error_code)
                return
        self._exit_to_userspace(
            InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, f"guest access to gpa 0x{gpa:x} outside guest memory"),
            None,
        )
