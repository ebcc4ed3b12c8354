"""KVM's half of the SEV-ES / SEV-SNP guest-host protocol: what happens on a VMGEXIT.

Models arch/x86/kvm/svm/sev.c (sev_handle_vmgexit(), sev_handle_vmgexit_msr_protocol(),
sev_es_sync_from_ghcb() / sev_es_sync_to_ghcb(), sev_es_validate_vmgexit(),
setup_vmgexit_scratch(), snp_begin_psc() / snp_complete_one_psc(), sev_es_string_io()), the
pieces of arch/x86/kvm/svm/svm.c and arch/x86/kvm/x86.c those call for CPUID, MSR, IOIO and
VMMCALL, and svm.h's svm_vmgexit_*() answer helpers. The layouts and constants are in
testbed/kvm/ghcb.py; ../shared/ABI.md sections 3-4 summarise the facts.

A protected guest's registers are invisible to KVM, so nothing here reads the CPU: the guest
either puts a request in the GHCB MSR (the MSR protocol) or points the MSR at its GHCB page,
and KVM answers in the same place. The handler therefore needs only `SevState` (what KVM keeps
per VM/vCPU, including the MSR value) and `SevVcpuOps` (the rest of KVM and the way to
userspace), and is testable over plain bytes.

Exits to userspace are synchronous calls with a completion (see kvm/vcpu.py): every handler
ends in a continuation that may run at once or only after the VMM resumes the vCPU. Loops that
can exit many times for one VMGEXIT (PSC, string I/O) are driven by a trampoline, so a VMM that
answers synchronously does not grow the Python stack, and a VMM that stops resumes the loop
where it left off. "Resume the guest" in KVM (a handler returning 1) is `_finish()` here: what
sev_es_unmap_ghcb() does before the next VMRUN.

A guest can write anything: nothing it writes raises a Python exception, except the cases
where KVM itself fails KVM_RUN, which raise SevFatalError (the errno KVM_RUN fails with).

The reference is the kvm-x86 tree (sev.c @1a27afa0); `SevState.kvm_version` selects the 7.1
behaviour where the two differ (testbed/kvm/version.py lists each difference and its commit).
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from testbed.errors import TestbedError, UsageError
from testbed.hw.exits import SVM_IOIO_STR, SVM_IOIO_TYPE_IN, GhcbMsr, GhcbMsrRegister
from testbed.hw.memory import HostMemory
from testbed.kvm.ghcb import (
    GHCB_HV_FT_SUPPORTED,
    GHCB_MSR_CPUID_FUNC_MASK,
    GHCB_MSR_CPUID_FUNC_POS,
    GHCB_MSR_CPUID_REG_MASK,
    GHCB_MSR_CPUID_REG_POS,
    GHCB_MSR_CPUID_VALUE_MASK,
    GHCB_MSR_CPUID_VALUE_POS,
    GHCB_MSR_GPA_VALUE_MASK,
    GHCB_MSR_GPA_VALUE_POS,
    GHCB_MSR_HV_FT_MASK,
    GHCB_MSR_HV_FT_POS,
    GHCB_MSR_INFO_MASK,
    GHCB_MSR_PREF_GPA_NONE,
    GHCB_MSR_PSC_RESP_ERROR,
    GHCB_MSR_TERM_REASON_MASK,
    GHCB_MSR_TERM_REASON_POS,
    GHCB_MSR_TERM_REASON_SET_MASK,
    GHCB_MSR_TERM_REASON_SET_POS,
    GHCB_RESERVED_0XFF0_OFFSET,
    GHCB_SHARED_BUFFER_OFFSET,
    GHCB_SIZE,
    GHCB_VERSION_MAX,
    GHCB_VERSION_MIN,
    PSC_ENTRY_CUR_PAGE_MASK,
    PSC_ENTRY_SIZE,
    PSC_HDR_CUR_ENTRY_OFFSET,
    PSC_HDR_END_ENTRY_OFFSET,
    PSC_HDR_SIZE,
    SNP_ONLY_VMGEXITS,
    SVM_EVTINJ_TYPE_EXEPT,
    SVM_EVTINJ_VALID,
    SVM_IOIO_SIZE_MASK,
    SVM_IOIO_SIZE_SHIFT,
    SVM_SEV_FEAT_SNP_ACTIVE,
    SVM_VMGEXIT_AP_CREATE,
    SVM_VMGEXIT_AP_CREATE_ON_INIT,
    SVM_VMGEXIT_AP_DESTROY,
    VMGEXIT_PSC_MAX_COUNT,
    Ghcb,
    GhcbErr,
    GhcbHvResp,
    GhcbMsrCode,
    GhcbSave,
    PscEntry,
    PscError,
    PscOp,
    SnpPageState,
    SwExitCode,
    ghcb_msr_psc_req_to_gfn,
    ghcb_msr_psc_req_to_op,
    ghcb_msr_sev_info,
    psc_entry_offset,
)
from testbed.kvm.uapi import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_SYSTEM_EVENT_SEV_TERM,
    ApResetHoldExit,
    HypercallExit,
    InternalErrorExit,
    IoInExit,
    IoOutExit,
    KvmExit,
    SystemEventExit,
)
from testbed.kvm.version import REFERENCE, KvmVersion
from testbed.trace import Tracer
from testbed.x86 import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, U32, U64, Vector

#: KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON (include/uapi/linux/kvm.h): svm_handle_invalid_exit()
#: for an exit code without a handler. (Belongs in kvm/uapi.py; kept here until it moves.)
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

#: setup_vmgexit_scratch(): a scratch area outside the GHCB (GHCB v1 only) is copied through a
#: kernel buffer, so KVM bounds it.
GHCB_SCRATCH_AREA_LIMIT = 16 * PAGE_SIZE

_INT_MAX = 0x7FFFFFFF

#: Exit codes sev_es_validate_vmgexit() accepts with no input beyond SW_EXITCODE/INFO1/INFO2.
_NO_INPUT_EXITS = frozenset({
    SwExitCode.SVM_EXIT_READ_DR7, SwExitCode.SVM_EXIT_RDTSC, SwExitCode.SVM_EXIT_INVD,
    SwExitCode.SVM_EXIT_RDTSCP, SwExitCode.SVM_EXIT_WBINVD, SwExitCode.SVM_VMGEXIT_NMI_COMPLETE,
    SwExitCode.SVM_VMGEXIT_AP_HLT_LOOP, SwExitCode.SVM_VMGEXIT_AP_JUMP_TABLE,
    SwExitCode.SVM_VMGEXIT_UNSUPPORTED_EVENT, SwExitCode.SVM_VMGEXIT_HV_FEATURES,
    SwExitCode.SVM_VMGEXIT_TERM_REQUEST,
})

#: The exit codes sev_handle_vmgexit()'s switch handles; any other is INVALID_EVENT.
_KNOWN_EXITS = _NO_INPUT_EXITS | frozenset({
    SwExitCode.SVM_EXIT_WRITE_DR7, SwExitCode.SVM_EXIT_RDPMC, SwExitCode.SVM_EXIT_CPUID, SwExitCode.SVM_EXIT_IOIO,
    SwExitCode.SVM_EXIT_MSR, SwExitCode.SVM_EXIT_VMMCALL, SwExitCode.SVM_EXIT_MONITOR, SwExitCode.SVM_EXIT_MWAIT,
    SwExitCode.SVM_VMGEXIT_MMIO_READ, SwExitCode.SVM_VMGEXIT_MMIO_WRITE,
}) | SNP_ONLY_VMGEXITS

#: The values kvm_is_valid_map_gpa_range_ret() (x86.h) accepts from userspace for the PSC paths.
_VALID_MAP_GPA_RANGE_RETS = frozenset({0, errno.EINVAL, errno.EAGAIN})
#: struct snp_guest_msg_hdr (arch/x86/include/asm/sev.h): the offset of msg_type
#: (authtag 32, msg_seqno 8, rsvd1 8, algo, hdr_version, hdr_sz (u16), msg_type)
SNP_GUEST_MSG_TYPE_OFFSET = 52
#: SNP_MSG_REPORT_REQ (enum msg_type)
SNP_MSG_REPORT_REQ = 5
#: the GHCB spec's certificate table ends with 24 bytes of zeroes (snp_handle_ext_guest_req)
SNP_CERT_TABLE_TERMINATOR = 24


class SevFatalError(TestbedError):
    """The VMGEXIT handler (or a completion) failed, so KVM_RUN fails with `errno` (EINVAL,
    EFAULT) and no exit reason: the VM cannot run on.

    Raised only where sev.c returns a negative errno; everything else a guest can write is
    answered in the GHCB or the MSR.
    """

    def __init__(self, message: str, gpa: int | None = None, err: int = errno.EINVAL) -> None:
        self.gpa = gpa
        self.errno = err
        super().__init__(message if gpa is None else f"{message} (gpa 0x{gpa:x})")


class SevVcpuOps(Protocol):
    """The rest of KVM, as the VMGEXIT handler needs it (KvmVcpu implements it).

    None of these may touch the hardware's registers or RIP: for a protected guest KVM's only
    channel is the GHCB, which the handler writes itself.
    """

    # A read-only member (covariant), so a plain `memory` attribute of any HostMemory type conforms.
    @property
    def memory(self) -> HostMemory:
        """Host view of guest memory (the GHCB page is shared: plaintext)."""
        ...

    def cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        """kvm_cpuid(): the guest's CPUID table entry."""
        ...

    def maxphyaddr(self) -> int:
        """cpuid_query_maxphyaddr(): CPUID 0x80000008.EAX[7:0] when the table has that leaf, else 36."""
        ...

    def hypercall(self, nr: int, a0: int, a1: int, a2: int, a3: int, cpl: int,
                  complete: Callable[[int], None]) -> None:
        """Run KVM's hypercall dispatch (a 64-bit call, as for every protected guest) and call
        complete(ret) when the result is known: at once for in-kernel hypercalls, after the VMM
        answered for KVM_HC_MAP_GPA_RANGE."""
        ...

    def exit_to_userspace(self, run: KvmExit, complete: Callable[[], None] | None) -> None:
        """Return to the VMM with `run`; `complete` runs when the VMM resumes the vCPU."""
        ...

    def pio(self, port: int, size: int, is_in: bool, value: int, complete: Callable[[int], None]) -> None:
        """Port I/O the guest asked for through the GHCB: complete(value_read) for IN,
        complete(0) for OUT. `size` is KVM's decoded size, 1-7 for a malformed request."""
        ...

    def msr(self, index: int, write: bool, value: int, complete: Callable[[bool, int], None]) -> None:
        """RDMSR/WRMSR: complete(ok, value_read); ok False means #GP is reported to the guest."""
        ...


@dataclass
class SevState:
    """Per-VM / per-vCPU SEV-ES state KVM keeps (struct kvm_sev_info, struct vcpu_sev_es_state).

    `ghcb_msr` is the VMCB's ghcb_gpa field: the guest-visible value of MSR 0xC0010130, which the
    hardware context-switches (guest RDMSR/WRMSR never exit). It is hardware state: KVM reads and
    writes it through `msr` (the vCPU's hardware; a bare GhcbMsrRegister in unit tests) and
    keeps no copy. `hypercall_exit_enabled` answers
    user_exit_on_hypercall(kvm, KVM_HC_MAP_GPA_RANGE), i.e. bit 12 of KVM_CAP_EXIT_HYPERCALL;
    give a callable so a later KVM_ENABLE_CAP is seen.
    """

    snp: bool = False
    ghcb_version: int = GHCB_VERSION_MAX
    c_bit: int = 51  # sev_enc_bit: CPUID 0x8000001F EBX[5:0] of the host
    msr: GhcbMsr = field(default_factory=GhcbMsrRegister)
    registered_ghcb_gpa: int | None = None  # GHCB_MSR_REG_GPA_REQ (SNP); KVM compares it on every VMGEXIT
    ap_jump_table: int = 0  # per VM in KVM (kvm_sev_info.ap_jump_table)
    hypercall_exit_enabled: Callable[[], bool] | bool = False
    #: Set from the GHCB when marked valid (__kvm_set_xcr / MSR_IA32_XSS write); CPUID leaf 0xD
    #: depends on XCR0. __kvm_set_xcr()'s validity checks are not modelled.
    xcr0: int = 1
    xss: int = 0
    #: the KVM whose behaviour is modelled where the reference tree and 7.1 differ
    kvm_version: KvmVersion = REFERENCE

    def __post_init__(self) -> None:
        # __sev_guest_init(): ghcb_version <= GHCB_VERSION_MAX, and SNP needs >= 2. Version 0 is
        # "default" there and becomes 2, so it is not a valid stored value.
        if not GHCB_VERSION_MIN <= self.ghcb_version <= GHCB_VERSION_MAX:
            raise UsageError(
                f"GHCB version {self.ghcb_version} not in {GHCB_VERSION_MIN}..{GHCB_VERSION_MAX}")
        if self.snp and self.ghcb_version < 2:
            raise UsageError("an SEV-SNP VM needs GHCB version 2")

    @property
    def ghcb_msr(self) -> int:
        """The GHCB MSR, read from the hardware (svm->vmcb->control.ghcb_gpa)."""
        return self.msr.ghcb_msr_value()

    @ghcb_msr.setter
    def ghcb_msr(self, value: int) -> None:
        self.msr.set_ghcb_msr(value)

    def map_gpa_range_exits(self) -> bool:
        """user_exit_on_hypercall(kvm, KVM_HC_MAP_GPA_RANGE)."""
        enabled = self.hypercall_exit_enabled
        return bool(enabled() if callable(enabled) else enabled)

    @property
    def vmsa_features(self) -> int:
        """sev->vmsa_features: the testbed's VMM asks for none (KVM_SEV_INIT2 vmsa_features = 0),
        and __sev_guest_init() adds SVM_SEV_FEAT_SNP_ACTIVE for an SNP VM."""
        return SVM_SEV_FEAT_SNP_ACTIVE if self.snp else 0


@dataclass
class _Regs:
    """vcpu->arch.regs as far as the GHCB reaches: zeroed, then loaded from valid GHCB fields."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0


class _Scratch:
    """svm->sev_es.ghcb_sa: the scratch area, either inside the GHCB's shared buffer (accessed in
    place, so the guest sees KVM's writes at once) or a kernel copy of guest memory (GHCB v1)
    written back on unmap when `sync`."""

    def __init__(self, memory: HostMemory, gpa: int, length: int, copy: bytearray | None, sync: bool) -> None:
        self.memory = memory
        self.gpa = gpa
        self.length = length  # ghcb_sa_len
        self.copy = copy
        self.sync = sync

    def read(self, offset: int, length: int) -> bytes:
        if self.copy is not None:
            return bytes(self.copy[offset : offset + length])
        return self.memory.read(self.gpa + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if self.copy is not None:
            self.copy[offset : offset + len(data)] = data
        else:
            self.memory.write(self.gpa + offset, data)

    def read_u16(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 2), "little")

    def read_u64(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 8), "little")


@dataclass
class _Vmgexit:
    """One full-GHCB VMGEXIT in flight: the mapped GHCB and KVM's snapshot of it (the VMCB's
    exit_code / exit_info_* and svm->sev_es fields)."""

    ghcb: Ghcb
    valid_bitmap: int
    exit_code: int
    exit_info_1: int
    exit_info_2: int
    sw_scratch: int
    cpl: int
    regs: _Regs = field(default_factory=_Regs)
    scratch: _Scratch | None = None
    psc_cur_idx: int = 0  # svm->sev_es.psc: cur_idx, end_idx (snapshotted once), batch_size
    psc_end_idx: int = 0
    psc_batch_size: int = 0

    def valid(self, f: GhcbSave) -> bool:
        """kvm_ghcb_<field>_is_valid(): tested against the snapshot, not the live page."""
        return bool(self.valid_bitmap >> (int(f) // 8) & 1)


class _Continuation:
    """A user-exit completion that tells its caller whether it already ran (synchronously,
    inside exit_to_userspace) or must resume the caller's loop later."""

    def __init__(self) -> None:
        self.completed = False
        self.resume: Callable[[], None] | None = None

    def complete(self) -> None:
        if self.resume is None:
            self.completed = True
        else:
            self.resume()


#: One step of a loop that may exit to userspace: None when the loop is over, else the exit and
#: what to do when it completes (True = take another step, False = stop).
_Step = Callable[[], tuple[KvmExit, Callable[[], bool]] | None]


class SevEsHandler:
    """sev_handle_vmgexit() for one vCPU of an SEV-ES or SEV-SNP VM."""

    def __init__(self, state: SevState, ops: SevVcpuOps, tracer: Tracer | None = None) -> None:
        self.state = state
        self.ops = ops
        self.tracer = tracer if tracer is not None else Tracer.disabled()

    # ------------------------------------------------------------------------------- RESET
    def reset(self) -> None:
        """vCPU RESET (not INIT): sev_es_init_vmcb() preloads the MSR with the SEV-info response."""
        self.state.ghcb_msr = self._sev_info()

    def _sev_info(self) -> int:
        return ghcb_msr_sev_info(self.state.ghcb_version, GHCB_VERSION_MIN, self.state.c_bit)

    # ------------------------------------------------------------------------------ VMGEXIT
    def handle_vmgexit(self) -> None:
        """SVM exit 0x403: the MSR protocol if GHCBInfo != 0, else the GHCB page at the MSR's GPA."""
        msr = self.state.ghcb_msr & U64
        if msr & GHCB_MSR_INFO_MASK:
            self._msr_protocol(msr)
            return
        if msr == 0:
            # "Without a GHCB, just return right back to the guest."
            self._trace("vmgexit_no_ghcb", ghcb_msr=msr)
            return
        gpa = msr
        if gpa + GHCB_SIZE > self.ops.memory.size:
            # kvm_vcpu_map() failed: "Without a GHCB, just return right back to the guest." (The
            # first SEV-ES KVM, v5.11, returned -EINVAL here; today's resumes the guest.)
            self._trace("vmgexit_unmappable_ghcb", gpa=gpa)
            return
        ctx = self._sync_from_ghcb(Ghcb(self.ops.memory, gpa))
        if self.tracer.enabled:
            self.tracer.emit("kvm", "vmgexit", gpa=gpa, exit_code=ctx.exit_code, info1=ctx.exit_info_1,
                             info2=ctx.exit_info_2, valid_bitmap=ctx.valid_bitmap)
        # Checked after the snapshot (which already cleared the guest's valid bitmap), as KVM does.
        if self.state.snp and self.state.registered_ghcb_gpa != gpa:
            if not self.state.kvm_version.is_reference:
                # 7.1: "return -EINVAL" - KVM_RUN fails (fixed by 1797e00bf802).
                raise SevFatalError("vmgexit: SNP GHCB GPA is not registered", gpa)
            # "KVM: SEV: Don't terminate SNP VMs on #VMGEXIT without a registered GHCB": the
            # answer goes into the page the guest named, and the guest runs on.
            self._bad_input(ctx, GhcbErr.GHCB_ERR_NOT_REGISTERED)
            self._finish(ctx)
            return
        valid = self._validate(ctx) if self.state.kvm_version.is_reference else self._validate_7_1(ctx)
        if not valid:
            self._finish(ctx)
            return
        self._set_return(ctx, GhcbHvResp.GHCB_HV_RESP_NO_ACTION, 0)
        self._dispatch(ctx)

    # ----------------------------------------------------------------------- MSR protocol
    def _set_msr_bits(self, value: int, mask: int, pos: int) -> None:
        """set_ghcb_msr_bits(): replace one field, keep every other bit of the MSR."""
        msr = self.state.ghcb_msr & ~(mask << pos)
        self.state.ghcb_msr = (msr | ((value & mask) << pos)) & U64

    def _msr_protocol(self, msr: int) -> None:
        """sev_handle_vmgexit_msr_protocol()."""
        info = msr & GHCB_MSR_INFO_MASK
        self._trace("vmgexit_msr", ghcb_msr=msr)
        if info == GhcbMsrCode.GHCB_MSR_SEV_INFO_REQ:
            self.state.ghcb_msr = self._sev_info()
        elif info == GhcbMsrCode.GHCB_MSR_CPUID_REQ:
            fn = (msr >> GHCB_MSR_CPUID_FUNC_POS) & GHCB_MSR_CPUID_FUNC_MASK
            # svm_invoke_exit_handler(SVM_EXIT_CPUID) with RAX = fn, RCX = 0. KVM keeps the MSR
            # as-is if that handler fails, but kvm_emulate_cpuid() always resumes, and so does
            # SevVcpuOps.cpuid(): the failure branch cannot be reached.
            regs = self._emulate_cpuid(fn, 0)
            reg = (msr >> GHCB_MSR_CPUID_REG_POS) & GHCB_MSR_CPUID_REG_MASK
            value = regs[reg]
            # Only the value [63:32] and the code [11:0] change: the register selector [31:30]
            # the guest sent stays in the response.
            self._set_msr_bits(value, GHCB_MSR_CPUID_VALUE_MASK, GHCB_MSR_CPUID_VALUE_POS)
            self._set_msr_bits(GhcbMsrCode.GHCB_MSR_CPUID_RESP, GHCB_MSR_INFO_MASK, 0)
        elif info == GhcbMsrCode.GHCB_MSR_AP_RESET_HOLD_REQ:
            # Result preset to "no SIPI yet" (0) before the vCPU parks.
            self.state.ghcb_msr = GhcbMsrCode.GHCB_MSR_AP_RESET_HOLD_RESP
            self._ap_reset_hold(None)
        elif info == GhcbMsrCode.GHCB_MSR_HV_FT_REQ:
            self._set_msr_bits(GHCB_HV_FT_SUPPORTED, GHCB_MSR_HV_FT_MASK, GHCB_MSR_HV_FT_POS)
            self._set_msr_bits(GhcbMsrCode.GHCB_MSR_HV_FT_RESP, GHCB_MSR_INFO_MASK, 0)
        elif info == GhcbMsrCode.GHCB_MSR_PREF_GPA_REQ:
            if not self.state.snp:
                self._msr_terminate(msr)
                return
            self._set_msr_bits(GHCB_MSR_PREF_GPA_NONE, GHCB_MSR_GPA_VALUE_MASK, GHCB_MSR_GPA_VALUE_POS)
            self._set_msr_bits(GhcbMsrCode.GHCB_MSR_PREF_GPA_RESP, GHCB_MSR_INFO_MASK, 0)
        elif info == GhcbMsrCode.GHCB_MSR_REG_GPA_REQ:
            if not self.state.snp:
                self._msr_terminate(msr)
                return
            gfn = (msr >> GHCB_MSR_GPA_VALUE_POS) & GHCB_MSR_GPA_VALUE_MASK
            self.state.registered_ghcb_gpa = (gfn << PAGE_SHIFT) & U64
            self._set_msr_bits(gfn, GHCB_MSR_GPA_VALUE_MASK, GHCB_MSR_GPA_VALUE_POS)
            self._set_msr_bits(GhcbMsrCode.GHCB_MSR_REG_GPA_RESP, GHCB_MSR_INFO_MASK, 0)
        elif info == GhcbMsrCode.GHCB_MSR_PSC_REQ:
            if not self.state.snp:
                self._msr_terminate(msr)
                return
            self._snp_begin_psc_msr(msr)
        elif info == GhcbMsrCode.GHCB_MSR_TERM_REQ:
            self._trace("sev_term",
                        reason_set=(msr >> GHCB_MSR_TERM_REASON_SET_POS) & GHCB_MSR_TERM_REASON_SET_MASK,
                        reason_code=(msr >> GHCB_MSR_TERM_REASON_POS) & GHCB_MSR_TERM_REASON_MASK)
            self._msr_terminate(msr)
        # default: unknown requests (and responses, and GHCB_MSR_VMPL_REQ) leave the MSR as-is,
        # so the guest reads back its own request.

    def _msr_terminate(self, msr: int) -> None:
        """out_terminate: KVM_EXIT_SYSTEM_EVENT / SEV_TERM, data[0] = the raw MSR value."""
        self.ops.exit_to_userspace(SystemEventExit(KVM_SYSTEM_EVENT_SEV_TERM, (msr,)), None)

    def _snp_begin_psc_msr(self, msr: int) -> None:
        """snp_begin_psc_msr(): one 4K page, as a KVM_HC_MAP_GPA_RANGE user exit."""
        gpa = ghcb_msr_psc_req_to_gfn(msr) << PAGE_SHIFT
        op = ghcb_msr_psc_req_to_op(msr)
        if op not in (SnpPageState.SNP_PAGE_STATE_PRIVATE, SnpPageState.SNP_PAGE_STATE_SHARED):
            self.state.ghcb_msr = GHCB_MSR_PSC_RESP_ERROR
            return
        if not self.state.map_gpa_range_exits():
            self.state.ghcb_msr = GHCB_MSR_PSC_RESP_ERROR
            return
        private = op == SnpPageState.SNP_PAGE_STATE_PRIVATE
        attrs = KVM_MAP_GPA_RANGE_ENCRYPTED if private else KVM_MAP_GPA_RANGE_DECRYPTED
        attrs |= KVM_MAP_GPA_RANGE_PAGE_SZ_4K
        run = _map_gpa_range_exit(gpa, 1, attrs)

        def snp_complete_psc_msr() -> None:
            ret = run.ret & U64
            self._check_map_gpa_range_ret(ret, None)
            self.state.ghcb_msr = GHCB_MSR_PSC_RESP_ERROR if ret else GhcbMsrCode.GHCB_MSR_PSC_RESP

        self.ops.exit_to_userspace(run, snp_complete_psc_msr)

    def _ap_reset_hold(self, ctx: _Vmgexit | None) -> None:
        """kvm_emulate_ap_reset_hold(): __kvm_emulate_halt(.., KVM_MP_STATE_AP_RESET_HOLD,
        KVM_EXIT_AP_RESET_HOLD). The testbed's KVM has no in-kernel local APIC, so the vCPU
        exits to userspace with KVM_EXIT_AP_RESET_HOLD (32), not KVM_EXIT_HLT."""
        self.ops.exit_to_userspace(ApResetHoldExit(), None if ctx is None else (lambda: self._finish(ctx)))

    def _check_map_gpa_range_ret(self, ret: int, ctx: _Vmgexit | None) -> None:
        """snp_complete_one_psc() / snp_complete_psc_msr(): the reference KVM accepts only 0,
        EINVAL and EAGAIN from userspace (kvm_is_valid_map_gpa_range_ret) and fails KVM_RUN with
        -EINVAL otherwise; 7.1 takes any non-zero value as an error (5d40e5b49442)."""
        if self.state.kvm_version.is_reference and ret not in _VALID_MAP_GPA_RANGE_RETS:
            raise SevFatalError(f"PSC completion: userspace set hypercall.ret 0x{ret:x}; KVM accepts only 0, "
                                f"EINVAL ({errno.EINVAL}) or EAGAIN ({errno.EAGAIN})",
                                None if ctx is None else ctx.ghcb.gpa)

    # ------------------------------------------------------------------- GHCB snapshot
    def _sync_from_ghcb(self, ghcb: Ghcb) -> _Vmgexit:
        """sev_es_sync_from_ghcb(): snapshot the bitmap, load valid fields, clear the bitmap."""
        bitmap = ghcb.valid_bitmap
        ctx = _Vmgexit(
            ghcb=ghcb,
            valid_bitmap=bitmap,
            # SW_EXITCODE / SW_EXITINFO1/2 are copied whether valid or not; the front door
            # checks their valid bits afterwards.
            exit_code=ghcb.get(GhcbSave.sw_exit_code),
            exit_info_1=ghcb.get(GhcbSave.sw_exit_info_1),
            exit_info_2=ghcb.get(GhcbSave.sw_exit_info_2),
            sw_scratch=0,
            cpl=0,
        )

        def if_valid(f: GhcbSave) -> int:
            return ghcb.get(f) if ctx.valid(f) else 0

        ctx.sw_scratch = if_valid(GhcbSave.sw_scratch)
        ctx.regs = _Regs(
            rax=if_valid(GhcbSave.rax),
            rbx=if_valid(GhcbSave.rbx),
            rcx=if_valid(GhcbSave.rcx),
            rdx=if_valid(GhcbSave.rdx),
            rsi=if_valid(GhcbSave.rsi),
        )
        ctx.cpl = if_valid(GhcbSave.cpl)
        if ctx.valid(GhcbSave.xcr0):
            self.state.xcr0 = ghcb.get(GhcbSave.xcr0)
        if ctx.valid(GhcbSave.xss):
            self.state.xss = ghcb.get(GhcbSave.xss)
        ghcb.valid_bitmap = 0
        return ctx

    def _finish(self, ctx: _Vmgexit) -> None:
        """sev_es_unmap_ghcb() before the next VMRUN: write back an out-of-GHCB scratch copy,
        then sev_es_sync_to_ghcb(): RAX/RBX/RCX/RDX unconditionally ("It's the guest's
        responsibility to not consume random data")."""
        sa = ctx.scratch
        if sa is not None and sa.copy is not None and sa.sync:
            self.ops.memory.write(sa.gpa, bytes(sa.copy))
            sa.sync = False
        ghcb = ctx.ghcb
        ghcb.set(GhcbSave.rax, ctx.regs.rax)
        ghcb.set(GhcbSave.rbx, ctx.regs.rbx)
        ghcb.set(GhcbSave.rcx, ctx.regs.rcx)
        ghcb.set(GhcbSave.rdx, ctx.regs.rdx)
        if self.tracer.enabled:
            self.tracer.emit("kvm", "vmgexit_done", gpa=ghcb.gpa, exit_code=ctx.exit_code,
                             info1=ghcb.get(GhcbSave.sw_exit_info_1), info2=ghcb.get(GhcbSave.sw_exit_info_2))

    def _set_return(self, ctx: _Vmgexit, response: int, data: int) -> None:
        """svm_vmgexit_set_return_code(): written straight into the guest's page (and marked valid)."""
        ctx.ghcb.set(GhcbSave.sw_exit_info_1, response)
        ctx.ghcb.set(GhcbSave.sw_exit_info_2, data)

    def _bad_input(self, ctx: _Vmgexit, reason: GhcbErr) -> None:
        """svm_vmgexit_bad_input()."""
        self._trace("vmgexit_bad_input", exit_code=ctx.exit_code, reason=reason.name)
        self._set_return(ctx, GhcbHvResp.GHCB_HV_RESP_MALFORMED_INPUT, reason)

    # ------------------------------------------------------------------------ front door
    def _validate(self, ctx: _Vmgexit) -> bool:
        """The checks sev_handle_vmgexit() makes before its switch (reference tree): usage, then
        SNP-only events from a non-SNP guest (INVALID_EVENT, 95d8c59cdf6d), then
        sev_es_are_required_ghcb_fields_valid() (MISSING_INPUT), then the switch's default
        (INVALID_EVENT for a code it does not handle). False after answering MALFORMED_INPUT."""
        if ctx.ghcb.ghcb_usage:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_USAGE)
            return False
        code = ctx.exit_code
        if code in SNP_ONLY_VMGEXITS and not self.state.snp:
            # is_snp_only_vmgexit() reads the exit code whether or not it is marked valid.
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_EVENT)
            return False
        if not self._required_fields_valid(ctx):
            self._bad_input(ctx, GhcbErr.GHCB_ERR_MISSING_INPUT)
            return False
        if code not in _KNOWN_EXITS:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_EVENT)
            return False
        return True

    def _required_fields_valid(self, ctx: _Vmgexit) -> bool:
        """sev_es_are_required_ghcb_fields_valid(): SW_EXITCODE/INFO1/INFO2, then per exit code
        (any code it does not list needs nothing more)."""
        v = ctx.valid
        if not (v(GhcbSave.sw_exit_code) and v(GhcbSave.sw_exit_info_1) and v(GhcbSave.sw_exit_info_2)):
            return False
        code = ctx.exit_code
        if code == SwExitCode.SVM_EXIT_WRITE_DR7:
            return v(GhcbSave.rax)
        if code == SwExitCode.SVM_EXIT_RDPMC:
            return v(GhcbSave.rcx)
        if code == SwExitCode.SVM_EXIT_CPUID:
            return v(GhcbSave.rax) and v(GhcbSave.rcx) and (ctx.regs.rax != 0xD or v(GhcbSave.xcr0))
        if code == SwExitCode.SVM_EXIT_IOIO:
            if ctx.exit_info_1 & SVM_IOIO_STR:
                return v(GhcbSave.sw_scratch)
            return bool(ctx.exit_info_1 & SVM_IOIO_TYPE_IN) or v(GhcbSave.rax)
        if code == SwExitCode.SVM_EXIT_MSR:
            return v(GhcbSave.rcx) and (not ctx.exit_info_1 or (v(GhcbSave.rax) and v(GhcbSave.rdx)))
        if code == SwExitCode.SVM_EXIT_VMMCALL:
            return v(GhcbSave.rax) and v(GhcbSave.cpl)
        if code == SwExitCode.SVM_EXIT_MONITOR:
            return v(GhcbSave.rax) and v(GhcbSave.rcx) and v(GhcbSave.rdx)
        if code == SwExitCode.SVM_EXIT_MWAIT:
            return v(GhcbSave.rax) and v(GhcbSave.rcx)
        if code == SwExitCode.SVM_VMGEXIT_AP_CREATION:
            return v(GhcbSave.rax) or (ctx.exit_info_1 & U32) == SVM_VMGEXIT_AP_DESTROY
        if code in (SwExitCode.SVM_VMGEXIT_MMIO_READ, SwExitCode.SVM_VMGEXIT_MMIO_WRITE, SwExitCode.SVM_VMGEXIT_PSC):
            return v(GhcbSave.sw_scratch)
        return True

    def _validate_7_1(self, ctx: _Vmgexit) -> bool:
        """sev_es_validate_vmgexit() as in 7.1 (gregkh/linux @00b9744a): SNP-only events from an
        SEV-ES guest and bad guest-request GPAs are MISSING_INPUT. False after answering."""
        if ctx.ghcb.ghcb_usage:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_USAGE)
            return False
        if not (ctx.valid(GhcbSave.sw_exit_code) and ctx.valid(GhcbSave.sw_exit_info_1)
                and ctx.valid(GhcbSave.sw_exit_info_2)):
            self._bad_input(ctx, GhcbErr.GHCB_ERR_MISSING_INPUT)
            return False
        code = ctx.exit_code
        v = ctx.valid
        need: bool
        if code in _NO_INPUT_EXITS:
            need = True
        elif code == SwExitCode.SVM_EXIT_WRITE_DR7:
            need = v(GhcbSave.rax)
        elif code == SwExitCode.SVM_EXIT_RDPMC:
            need = v(GhcbSave.rcx)
        elif code == SwExitCode.SVM_EXIT_CPUID:
            need = v(GhcbSave.rax) and v(GhcbSave.rcx) and (ctx.regs.rax != 0xD or v(GhcbSave.xcr0))
        elif code == SwExitCode.SVM_EXIT_IOIO:
            if ctx.exit_info_1 & SVM_IOIO_STR:
                need = v(GhcbSave.sw_scratch)
            else:
                need = bool(ctx.exit_info_1 & SVM_IOIO_TYPE_IN) or v(GhcbSave.rax)
        elif code == SwExitCode.SVM_EXIT_MSR:
            need = v(GhcbSave.rcx) and (not ctx.exit_info_1 or (v(GhcbSave.rax) and v(GhcbSave.rdx)))
        elif code == SwExitCode.SVM_EXIT_VMMCALL:
            need = v(GhcbSave.rax) and v(GhcbSave.cpl)
        elif code == SwExitCode.SVM_EXIT_MONITOR:
            need = v(GhcbSave.rax) and v(GhcbSave.rcx) and v(GhcbSave.rdx)
        elif code == SwExitCode.SVM_EXIT_MWAIT:
            need = v(GhcbSave.rax) and v(GhcbSave.rcx)
        elif code in (SwExitCode.SVM_VMGEXIT_MMIO_READ, SwExitCode.SVM_VMGEXIT_MMIO_WRITE):
            need = v(GhcbSave.sw_scratch)
        elif code == SwExitCode.SVM_VMGEXIT_AP_CREATION:
            need = self.state.snp and ((ctx.exit_info_1 & U32) == SVM_VMGEXIT_AP_DESTROY or v(GhcbSave.rax))
        elif code == SwExitCode.SVM_VMGEXIT_PSC:
            # An SNP-only event from an SEV-ES guest is "missing input", not a termination.
            need = self.state.snp and v(GhcbSave.sw_scratch)
        elif code in (SwExitCode.SVM_VMGEXIT_GUEST_REQUEST, SwExitCode.SVM_VMGEXIT_EXT_GUEST_REQUEST):
            need = (self.state.snp and not ctx.exit_info_1 & (PAGE_SIZE - 1)
                    and not ctx.exit_info_2 & (PAGE_SIZE - 1) and ctx.exit_info_1 != ctx.exit_info_2)
        else:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_EVENT)
            return False
        if not need:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_MISSING_INPUT)
            return False
        return True

    # ------------------------------------------------------------------------- dispatch
    def _dispatch(self, ctx: _Vmgexit) -> None:
        """The switch in sev_handle_vmgexit(), then svm_invoke_exit_handler() for the rest."""
        code = ctx.exit_code
        if code in (SwExitCode.SVM_VMGEXIT_MMIO_READ, SwExitCode.SVM_VMGEXIT_MMIO_WRITE):
            self._mmio(ctx)
        elif code == SwExitCode.SVM_VMGEXIT_NMI_COMPLETE:
            self._finish(ctx)  # unmasks NMIs; the testbed injects none
        elif code == SwExitCode.SVM_VMGEXIT_AP_HLT_LOOP:
            self._ap_reset_hold(ctx)
        elif code == SwExitCode.SVM_VMGEXIT_AP_JUMP_TABLE:
            self._ap_jump_table(ctx)
        elif code == SwExitCode.SVM_VMGEXIT_HV_FEATURES:
            self._set_return(ctx, GhcbHvResp.GHCB_HV_RESP_NO_ACTION, GHCB_HV_FT_SUPPORTED)
            self._finish(ctx)
        elif code == SwExitCode.SVM_VMGEXIT_TERM_REQUEST:
            # data[0] is the GHCB GPA (the MSR value), not the reason in SW_EXITINFO1.
            self._trace("sev_term", reason_set=ctx.exit_info_1 & 0xF,
                        reason_code=(ctx.exit_info_1 >> 4) & 0xFF)
            self.ops.exit_to_userspace(SystemEventExit(KVM_SYSTEM_EVENT_SEV_TERM, (ctx.ghcb.gpa,)),
                                       lambda: self._finish(ctx))
        elif code == SwExitCode.SVM_VMGEXIT_PSC:
            ctx.scratch = self._setup_scratch(ctx, True, PSC_HDR_SIZE)
            if ctx.scratch is None:
                self._finish(ctx)
                return
            self._snp_begin_psc(ctx)
        elif code == SwExitCode.SVM_VMGEXIT_AP_CREATION:
            self._snp_ap_creation(ctx)
        elif code in (SwExitCode.SVM_VMGEXIT_GUEST_REQUEST, SwExitCode.SVM_VMGEXIT_EXT_GUEST_REQUEST):
            if (ctx.exit_info_1 & (PAGE_SIZE - 1) or ctx.exit_info_2 & (PAGE_SIZE - 1)
                    or ctx.exit_info_1 == ctx.exit_info_2):
                # Reference tree (5eb5d5d123a8); 7.1 answered MISSING_INPUT in _validate_7_1().
                self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_INPUT)
                self._finish(ctx)
                return
            if not self._guest_request_checks(ctx):
                return
            # snp_handle_guest_req(): the request goes to the PSP firmware, which the testbed lacks.
            self._not_modelled(ctx)
        elif code == SwExitCode.SVM_VMGEXIT_UNSUPPORTED_EVENT:
            # "the _guest_ is reporting an unsupported #VC": the handler returns -EINVAL.
            raise SevFatalError(f"vmgexit: unsupported event - exit_info_1={ctx.exit_info_1:#x}, "
                                f"exit_info_2={ctx.exit_info_2:#x}", ctx.ghcb.gpa)
        elif code == SwExitCode.SVM_EXIT_IOIO:
            if not (ctx.exit_info_1 & SVM_IOIO_SIZE_MASK) >> SVM_IOIO_SIZE_SHIFT:
                self._finish(ctx)  # no size bit: KVM resumes without doing anything
                return
            self._io_interception(ctx)
        elif code == SwExitCode.SVM_EXIT_CPUID:
            r = self._emulate_cpuid(ctx.regs.rax & U32, ctx.regs.rcx & U32)
            ctx.regs.rax, ctx.regs.rbx, ctx.regs.rcx, ctx.regs.rdx = r
            self._finish(ctx)
        elif code == SwExitCode.SVM_EXIT_MSR:
            self._msr_interception(ctx)
        elif code == SwExitCode.SVM_EXIT_VMMCALL:
            self._vmmcall(ctx)
        elif code in (SwExitCode.SVM_EXIT_READ_DR7, SwExitCode.SVM_EXIT_WRITE_DR7, SwExitCode.SVM_EXIT_INVD,
                      SwExitCode.SVM_EXIT_WBINVD, SwExitCode.SVM_EXIT_MONITOR, SwExitCode.SVM_EXIT_MWAIT):
            # dr_interception() returns at once for SEV-ES (DR7 is swapped by hardware);
            # kvm_emulate_invd()/wbinvd() are no-ops; MONITOR/MWAIT are no-ops under
            # KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS (on by default).
            self._finish(ctx)
        elif code == SwExitCode.SVM_EXIT_RDTSC:
            # svm_exit_handlers[] has no RDTSC entry (KVM never intercepts it), so
            # svm_handle_invalid_exit() reports an unexpected exit reason to userspace.
            # run->internal.data = {exit_code, last_vmentry_cpu} (one pCPU: 0).
            self.ops.exit_to_userspace(
                InternalErrorExit(KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON,
                                  f"unexpected exit reason 0x{code:x}", (code, 0)),
                lambda: self._finish(ctx),
            )
        else:  # RDPMC, RDTSCP: KVM injects #GP / #UD, which this seam cannot express
            self._not_modelled(ctx)

    def _guest_request_checks(self, ctx: _Vmgexit) -> bool:
        """KVM's part of an SNP guest request before the firmware (sev.c): for an extended
        request, snp_handle_ext_guest_req() reads the message type at req_gpa +
        offsetof(struct snp_guest_msg_hdr, msg_type) (-EIO if it cannot); for a report request
        RAX/RBX must be valid in the GHCB and RAX page aligned (else INVALID_INPUT, the guest
        resumes), and with RBX pages it zeroes the certificate table's 24-byte terminator at RAX
        (kvm_clear_guest: -EIO); then snp_handle_guest_req() reads the request page (-EIO).
        False when the request ended here."""
        memory = self.ops.memory
        req_gpa = ctx.exit_info_1
        if ctx.exit_code == SwExitCode.SVM_VMGEXIT_EXT_GUEST_REQUEST:
            if req_gpa + SNP_GUEST_MSG_TYPE_OFFSET + 1 > memory.size:
                raise SevFatalError("vmgexit: extended guest request: kvm_read_guest of msg_type failed", req_gpa,
                                    errno.EIO)
            msg_type = memory.read(req_gpa + SNP_GUEST_MSG_TYPE_OFFSET, 1)[0]
            if msg_type == SNP_MSG_REPORT_REQ:
                data_gpa, data_npages = ctx.regs.rax, ctx.regs.rbx
                if not (ctx.valid(GhcbSave.rax) and ctx.valid(GhcbSave.rbx)) or data_gpa & (PAGE_SIZE - 1):
                    self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_INPUT)
                    self._finish(ctx)
                    return False
                if data_npages:
                    if data_gpa + SNP_CERT_TABLE_TERMINATOR > memory.size:
                        raise SevFatalError("vmgexit: extended guest request: kvm_clear_guest of the certificate "
                                            "table failed", data_gpa, errno.EIO)
                    memory.write(data_gpa, bytes(SNP_CERT_TABLE_TERMINATOR))
        if req_gpa + PAGE_SIZE > memory.size:
            raise SevFatalError("vmgexit: guest request: kvm_read_guest of the request page failed", req_gpa,
                                errno.EIO)
        return True

    def _not_modelled(self, ctx: _Vmgexit) -> None:
        try:
            name = SwExitCode(ctx.exit_code).name
        except ValueError:  # pragma: no cover - only validated codes get here
            name = "?"
        self.ops.exit_to_userspace(
            InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION,
                              f"SEV-ES VMGEXIT {name} (0x{ctx.exit_code:x}) is not modelled by the testbed"),
            lambda: self._finish(ctx),
        )

    def _snp_ap_creation(self, ctx: _Vmgexit) -> None:
        """SVM_VMGEXIT_AP_CREATION: sev_snp_ap_creation() failing with -EINVAL is answered
        INVALID_INPUT and the guest resumes (both versions). The testbed has one vCPU, APIC ID 0,
        so every other APIC ID is unknown to kvm_get_vcpu_by_id(); a request KVM accepts would
        (re)load a VMSA, which is not modelled."""
        request = ctx.exit_info_1 & U32
        apic_id = ctx.exit_info_1 >> 32
        why: str | None = None
        if apic_id != 0:
            why = f"invalid AP APIC ID [{apic_id:#x}]"
        elif request in (SVM_VMGEXIT_AP_CREATE_ON_INIT, SVM_VMGEXIT_AP_CREATE):
            vmsa = ctx.exit_info_2
            if ctx.regs.rax != self.state.vmsa_features:
                why = f"mismatched AP sev_features [{ctx.regs.rax:#x}] != [{self.state.vmsa_features:#x}]"
            elif not self._page_address_valid(vmsa):
                why = f"invalid AP VMSA address [{vmsa:#x}]"
            elif vmsa % (2 << 20) == 0:
                why = f"AP VMSA address [{vmsa:#x}] is unsafe as it is 2M aligned"
        elif request != SVM_VMGEXIT_AP_DESTROY:
            why = f"invalid AP creation request [{request:#x}]"
        if why is None:
            self._not_modelled(ctx)
            return
        self._trace("ap_creation_rejected", why=why)
        self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_INPUT)
        self._finish(ctx)

    def _page_address_valid(self, gpa: int) -> bool:
        """page_address_valid(): page aligned and a legal GPA, i.e. no bit at or above
        cpuid_maxphyaddr() set except the C-bit (sev_vcpu_after_set_cpuid() un-reserves it)."""
        # The leaf's presence decides, not its value through kvm_cpuid() (zeros when absent).
        maxphyaddr = self.ops.maxphyaddr()
        reserved = (U64 & ~((1 << maxphyaddr) - 1)) & ~(1 << self.state.c_bit)
        return not gpa & (PAGE_SIZE - 1) and not gpa & reserved

    def _ap_jump_table(self, ctx: _Vmgexit) -> None:
        """SVM_VMGEXIT_AP_JUMP_TABLE: 0 sets the VM's table address, 1 gets it."""
        if ctx.exit_info_1 == 0:
            self.state.ap_jump_table = ctx.exit_info_2
        elif ctx.exit_info_1 == 1:
            self._set_return(ctx, GhcbHvResp.GHCB_HV_RESP_NO_ACTION, self.state.ap_jump_table)
        else:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_INPUT)
        self._finish(ctx)

    def _mmio(self, ctx: _Vmgexit) -> None:
        """SVM_VMGEXIT_MMIO_READ/WRITE up to the point where KVM would exit with KVM_EXIT_MMIO,
        which the testbed does not have (no MMIO devices): that part is not modelled."""
        length = ctx.exit_info_2
        if not length:
            self._finish(ctx)
            return
        if self.state.ghcb_version >= 2 and length > 8:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_INPUT)
            self._finish(ctx)
            return
        is_write = ctx.exit_code == SwExitCode.SVM_VMGEXIT_MMIO_WRITE
        ctx.scratch = self._setup_scratch(ctx, not is_write, length)
        if ctx.scratch is None:
            self._finish(ctx)
            return
        self._not_modelled(ctx)

    # --------------------------------------------------------------------------- scratch
    def _setup_scratch(self, ctx: _Vmgexit, sync: bool, min_len: int) -> _Scratch | None:
        """setup_vmgexit_scratch(): None after answering INVALID_SCRATCH_AREA."""
        beg = ctx.sw_scratch
        end = beg + min_len
        ghcb_gpa = ctx.ghcb.gpa
        if not min_len or not beg or end > U64:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_SCRATCH_AREA)
            return None
        if (beg & PAGE_MASK & U64) == ghcb_gpa:
            buf_beg = ghcb_gpa + GHCB_SHARED_BUFFER_OFFSET
            buf_end = ghcb_gpa + GHCB_RESERVED_0XFF0_OFFSET
            # A scratch area that starts in the GHCB must lie in its shared buffer.
            if beg < buf_beg or end > buf_end:
                self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_SCRATCH_AREA)
                return None
            return _Scratch(self.ops.memory, beg, buf_end - beg, None, sync)
        # GHCB v2 requires the scratch area to be within the GHCB.
        if self.state.ghcb_version >= 2 or min_len > GHCB_SCRATCH_AREA_LIMIT:
            self._bad_input(ctx, GhcbErr.GHCB_ERR_INVALID_SCRATCH_AREA)
            return None
        if end > self.ops.memory.size:
            # kvm_read_guest() failed: the handler returns -EFAULT, KVM_RUN fails.
            raise SevFatalError("vmgexit: kvm_read_guest for scratch area failed", beg, errno.EFAULT)
        return _Scratch(self.ops.memory, beg, min_len, bytearray(self.ops.memory.read(beg, min_len)), sync)

    # ----------------------------------------------------------------------- trampolines
    def _drive(self, step: _Step, done: Callable[[], None]) -> None:
        """Run `step` until it has nothing more to do, exiting to userspace as it asks.

        A completion that runs synchronously just lets the loop go round again; one that runs
        later (the VMM stopped the vCPU) resumes the loop from where it stopped.
        """
        while True:
            nxt = step()
            if nxt is None:
                done()
                return
            run, after = nxt
            cont = _Continuation()
            self.ops.exit_to_userspace(run, cont.complete)
            if not cont.completed:
                cont.resume = functools.partial(self._resume, step, done, after)
                return
            if not after():
                done()
                return

    def _resume(self, step: _Step, done: Callable[[], None], after: Callable[[], bool]) -> None:
        if after():
            self._drive(step, done)
        else:
            done()

    # ------------------------------------------------------------------------------ PSC
    def _snp_complete_psc(self, ctx: _Vmgexit, psc_ret: int) -> None:
        """snp_complete_psc(): always "no action" in EXITINFO1, the PSC status in EXITINFO2."""
        ctx.psc_cur_idx = 0
        ctx.psc_end_idx = 0
        ctx.psc_batch_size = 0
        self._trace("psc_done", status=psc_ret)
        self._set_return(ctx, GhcbHvResp.GHCB_HV_RESP_NO_ACTION, psc_ret)

    def _snp_mark_batch_done(self, ctx: _Vmgexit) -> None:
        """__snp_complete_one_psc(): mark the in-flight batch done in the guest's buffer."""
        sa = ctx.scratch
        assert sa is not None
        idx = ctx.psc_cur_idx
        while ctx.psc_batch_size:
            off = psc_entry_offset(idx)
            entry = sa.read_u64(off)
            cur_page = 512 if PscEntry.from_u64(entry).pagesize else 1
            # A write of the cur_page bitfield: the rest of the entry word is whatever the guest
            # has there now.
            sa.write(off, ((entry & ~PSC_ENTRY_CUR_PAGE_MASK) | cur_page).to_bytes(8, "little"))
            ctx.psc_batch_size -= 1
            idx += 1
        ctx.psc_cur_idx = idx
        sa.write(PSC_HDR_CUR_ENTRY_OFFSET, (idx & 0xFFFF).to_bytes(2, "little"))

    def _snp_begin_psc(self, ctx: _Vmgexit) -> None:
        """snp_begin_psc(): the exit gate, the buffer bound and the header's indices, which are
        read exactly once per VMGEXIT (ce6ea7b33e00, in 7.1 too): a guest that rewrites its
        header while the VMM handles an exit changes nothing. Then snp_do_psc()'s loop."""
        sa = ctx.scratch
        assert sa is not None
        if not self.state.map_gpa_range_exits():
            self._snp_complete_psc(ctx, PscError.VMGEXIT_PSC_ERROR_GENERIC)
            self._finish(ctx)
            return
        # With the GHCB v2 scratch rule this is at most 253; the check is KVM's WARN_ON_ONCE.
        max_nr_entries = (sa.length - PSC_HDR_SIZE) // PSC_ENTRY_SIZE
        if max_nr_entries > VMGEXIT_PSC_MAX_COUNT:
            self._snp_complete_psc(ctx, PscError.VMGEXIT_PSC_ERROR_GENERIC)
            self._finish(ctx)
            return
        # The buffer is guest memory the guest may change at any time: only validated copies
        # index it.
        ctx.psc_cur_idx = sa.read_u16(PSC_HDR_CUR_ENTRY_OFFSET)
        ctx.psc_end_idx = sa.read_u16(PSC_HDR_END_ENTRY_OFFSET)
        if ctx.psc_end_idx >= max_nr_entries:
            self._snp_complete_psc(ctx, PscError.VMGEXIT_PSC_ERROR_INVALID_HDR)
            self._finish(ctx)
            return
        self._drive(lambda: self._snp_do_psc(ctx), lambda: self._finish(ctx))

    def _snp_do_psc(self, ctx: _Vmgexit) -> tuple[KvmExit, Callable[[], bool]] | None:
        """snp_do_psc(): answer and return None, or return the next MAP_GPA_RANGE exit."""
        sa = ctx.scratch
        assert sa is not None
        while True:  # next_range
            # Find the start of the next range which needs processing.
            idx = ctx.psc_cur_idx
            idx_end = ctx.psc_end_idx
            entry_start = PscEntry(0, 0, 0, 0)
            gfn = npages = 0
            huge = False
            while idx <= idx_end:
                entry_start = PscEntry.from_u64(sa.read_u64(psc_entry_offset(idx)))
                gfn = entry_start.gfn
                huge = bool(entry_start.pagesize)
                npages = 512 if huge else 1
                if entry_start.cur_page > npages or gfn % npages:
                    self._snp_complete_psc(ctx, PscError.VMGEXIT_PSC_ERROR_INVALID_ENTRY)
                    return None
                if entry_start.cur_page:
                    # A partially-completed 2M entry: the rest is handled as 4K pages.
                    npages -= entry_start.cur_page
                    gfn += entry_start.cur_page
                    huge = False
                if npages:
                    break
                # Fully done: step the guest-visible index (a read-modify-write of whatever the
                # guest has there; KVM does not consume it).
                cur = sa.read_u16(PSC_HDR_CUR_ENTRY_OFFSET)
                sa.write(PSC_HDR_CUR_ENTRY_OFFSET, ((cur + 1) & 0xFFFF).to_bytes(2, "little"))
                idx += 1
            if idx > idx_end:
                self._snp_complete_psc(ctx, 0)  # nothing more to process
                return None
            ctx.psc_cur_idx = idx
            ctx.psc_batch_size = 1
            # Extend over following entries with the same operation, contiguous GFNs, no
            # progress and the same page size. As in KVM, contiguity is measured from the
            # entry's own GFN (entry_start.gfn + npages), not from the cur_page-adjusted gfn.
            while idx + 1 <= idx_end:
                idx += 1
                entry = PscEntry.from_u64(sa.read_u64(psc_entry_offset(idx)))
                if (entry.operation != entry_start.operation or entry.gfn != entry_start.gfn + npages
                        or entry.cur_page or bool(entry.pagesize) != huge):
                    break
                ctx.psc_batch_size += 1
                npages += 512 if huge else 1
            if entry_start.operation in (PscOp.VMGEXIT_PSC_OP_PRIVATE, PscOp.VMGEXIT_PSC_OP_SHARED):
                attrs = (KVM_MAP_GPA_RANGE_ENCRYPTED if entry_start.operation == PscOp.VMGEXIT_PSC_OP_PRIVATE
                         else KVM_MAP_GPA_RANGE_DECRYPTED)
                # The size hint is the entry's page-size bit, even for a partially-done 2M entry
                # that is being handled as 4K pages.
                attrs |= (KVM_MAP_GPA_RANGE_PAGE_SZ_2M if entry_start.pagesize
                          else KVM_MAP_GPA_RANGE_PAGE_SZ_4K)
                run = _map_gpa_range_exit((gfn << PAGE_SHIFT) & U64, npages, attrs)
                self._trace("psc_exit", gpa=run.args[0], npages=npages, attrs=attrs, first=ctx.psc_cur_idx,
                            batch=ctx.psc_batch_size)
                return run, functools.partial(self._snp_complete_one_psc, ctx, run)
            # Only private/shared are supported: any other operation (PSMASH, UNSMASH, 0, 5-15)
            # is treated as completed, without an exit, and the scan goes on.
            self._snp_mark_batch_done(ctx)

    def _snp_complete_one_psc(self, ctx: _Vmgexit, run: HypercallExit) -> bool:
        """snp_complete_one_psc(): the ret check (reference tree), then False (stop) after a VMM
        error, else mark the batch done and go on with the next range."""
        ret = run.ret & U64
        self._check_map_gpa_range_ret(ret, ctx)
        if ret:
            self._snp_complete_psc(ctx, PscError.VMGEXIT_PSC_ERROR_GENERIC)
            return False
        self._snp_mark_batch_done(ctx)
        return True  # handle the next range (if any)

    # --------------------------------------------------------------- instruction exits
    def _emulate_cpuid(self, function: int, index: int) -> tuple[int, int, int, int]:
        """kvm_emulate_cpuid(): 32-bit inputs, 32-bit zero-extended results."""
        eax, ebx, ecx, edx = self.ops.cpuid(function & U32, index & U32)
        return eax & U32, ebx & U32, ecx & U32, edx & U32

    def _msr_interception(self, ctx: _Vmgexit) -> None:
        """msr_interception(): any non-zero EXITINFO1 is a WRMSR; a refused access answers
        "issue exception" #GP in the GHCB (svm_complete_emulated_msr())."""
        index = ctx.regs.rcx & U32
        write = bool(ctx.exit_info_1)
        value = (ctx.regs.rax & U32) | ((ctx.regs.rdx & U32) << 32) if write else 0

        def complete(ok: bool, value_read: int) -> None:
            if not ok:
                self._set_return(ctx, GhcbHvResp.GHCB_HV_RESP_ISSUE_EXCEPTION,
                                 SVM_EVTINJ_VALID | SVM_EVTINJ_TYPE_EXEPT | Vector.GP)
            elif not write:
                ctx.regs.rax = value_read & U32
                ctx.regs.rdx = (value_read >> 32) & U32
            self._finish(ctx)

        self.ops.msr(index, write, value, complete)

    def _vmmcall(self, ctx: _Vmgexit) -> None:
        """kvm_emulate_hypercall() with the GHCB's CPL (svm_get_cpl() reads the VMCB's copy)."""
        r = ctx.regs

        def complete(ret: int) -> None:
            r.rax = ret & U64
            self._finish(ctx)

        self.ops.hypercall(r.rax, r.rbx, r.rcx, r.rdx, r.rsi, ctx.cpl, complete)

    def _io_interception(self, ctx: _Vmgexit) -> None:
        """io_interception(): port I/O through the GHCB. EXITINFO1 is read as a u32."""
        io_info = ctx.exit_info_1 & U32
        port = io_info >> 16
        # The one-hot size field is used as a number, as KVM does: malformed values 3, 5, 6, 7
        # become 3-, 5-, 6- or 7-byte accesses.
        size = (io_info & SVM_IOIO_SIZE_MASK) >> SVM_IOIO_SIZE_SHIFT
        is_in = bool(io_info & SVM_IOIO_TYPE_IN)
        if io_info & SVM_IOIO_STR:
            self._string_io(ctx, size, port, is_in)
            return
        mask = (1 << (8 * size)) - 1
        if not is_in:
            self.ops.pio(port, size, False, ctx.regs.rax & mask, lambda _value: self._finish(ctx))
            return

        def complete_fast_pio_in(value: int) -> None:
            # "For size less than 4 we merge, else we zero extend."
            base = ctx.regs.rax & ~mask & U64 if size < 4 else 0
            ctx.regs.rax = base | (value & mask)
            self._finish(ctx)

        self.ops.pio(port, size, True, 0, complete_fast_pio_in)

    def _string_io(self, ctx: _Vmgexit, size: int, port: int, is_in: bool) -> None:
        """sev_es_string_io() + kvm_sev_es_ins()/outs(): the data lives in the scratch area,
        moved at most a page per user exit."""
        count = ctx.exit_info_2
        if count > _INT_MAX:
            raise SevFatalError(f"vmgexit: string I/O count 0x{count:x} > INT_MAX", ctx.ghcb.gpa)
        nbytes = count * size
        if nbytes > _INT_MAX:  # check_mul_overflow() on an int
            raise SevFatalError(f"vmgexit: string I/O of {count} x {size} bytes overflows", ctx.ghcb.gpa)
        if not nbytes:
            self._finish(ctx)
            return
        sa = self._setup_scratch(ctx, is_in, nbytes)
        if sa is None:
            self._finish(ctx)
            return
        ctx.scratch = sa
        left = [count, 0]  # sev_pio_count, offset of sev_pio_data in the scratch area

        def step() -> tuple[KvmExit, Callable[[], bool]] | None:
            if not left[0]:
                return None
            n = min(PAGE_SIZE // size, left[0])
            off = left[1]
            if is_in:
                run = IoInExit(size=size, port=port, count=n, data=bytearray(n * size))

                def complete_sev_es_emulated_ins() -> bool:
                    # complete_emulator_pio_in(): n * size bytes from the data area (zero where
                    # the VMM filled in less).
                    sa.write(off, run.reply(n * size))
                    left[0] -= n
                    left[1] += n * size
                    return True

                return run, complete_sev_es_emulated_ins
            out = IoOutExit(size=size, port=port, count=n, data=bytes(sa.read(off, n * size)))
            # kvm_sev_es_outs() advances as soon as the data is copied into the exit.
            left[0] -= n
            left[1] += n * size
            return out, lambda: True

        self._drive(step, lambda: self._finish(ctx))

    # ------------------------------------------------------------------------- tracing
    def _trace(self, event: str, **fields: object) -> None:
        if self.tracer.enabled:
            self.tracer.emit("kvm", event, **fields)


def _map_gpa_range_exit(gpa: int, npages: int, attrs: int) -> HypercallExit:
    """The KVM_HC_MAP_GPA_RANGE exit of the SNP PSC paths. ret is preset to 0 (QEMU <= 9.2
    assumed KVM never changes it); these paths do not set hypercall.flags, which a fresh exit
    carries as 0."""
    return HypercallExit(nr=KVM_HC_MAP_GPA_RANGE, args=(gpa, npages, attrs, 0, 0, 0), ret=0, flags=0)


__all__ = [
    "GHCB_SCRATCH_AREA_LIMIT",
    "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
    "SevEsHandler",
    "SevFatalError",
    "SevState",
    "SevVcpuOps",
]
