"""The Intel TDX module: what sits between a TD and KVM, played by the hardware model.

A TD guest reaches the module with TDCALL (66 0F 01 CC, RAX = leaf); the module answers the
guest itself or leaves to the host VMM. Modelled (leaf numbers and registers as Linux's
arch/x86/include/asm/shared/tdx.h, behaviour as the module's src/td_dispatcher, intel/tdx-module):

* every leaf: RAX bits 63:24 (reserved) set, or a version (RAX[23:16]) for a leaf that has
  none, is TDX_OPERAND_INVALID | RAX (td_call()); TDCALL outside 64-bit mode is #GP(0).
* TDG.VP.VMCALL (0): RCX selects the GPRs exposed to the VMM (bits 0, 1, 4, 5 and 63:32 must be
  clear, else TDX_OPERAND_INVALID | RCX: tdg_vp_vmcall.c, with KVM's NO_RBP_MOD); a TD exit
  to KVM, reported as VMX exit EXIT_REASON_TDCALL (77), which sees zeros in the GPRs RCX does
  not expose. KVM finishes it with `complete_tdcall()`: only the exposed GPRs take KVM's
  values (save_regs_after_tdvmcall), RCX = the control value, RAX = 0 (the TDCALL's own
  status) and RIP past the TDCALL.
* TDG.VP.INFO (1): RCX[5:0] = GPAW, RDX = TD attributes (SEPT_VE_DISABLE, as Linux needs for a
  non-debug TD), R8 = NUM_VCPUS | MAX_VCPUS << 32, R9 = 0, R10 = 1 (TDG.SYS.RD available),
  R11 = 0 (tdg_vp_info.c).
* TDG.VP.VEINFO.GET (3): RCX = exit reason, RDX = exit qualification, R8 = GLA, R9 = GPA,
  R10 = instruction length | instruction info << 32, and the info is marked free;
  TDX_NO_VALID_VE_INFO when nothing is pending (tdg_vp_veinfo_get.c).
* TDG.MEM.PAGE.ACCEPT (6): RCX = GPA | level; 4K and 2M levels only (verify_page_info_input
  with LVL_PT..LVL_PD: 1G is TDX_OPERAND_INVALID | RCX, as is a misaligned or shared GPA). The
  modelled Secure EPT maps private memory with 4 KiB leaves only (KVM's TDX MMU maps private
  GFNs at 4K), so a 2M request is TDX_PAGE_SIZE_MISMATCH | level 1, an accepted page is
  TDX_PAGE_ALREADY_ACCEPTED | level 0 (a warning: bit 63 clear), a pending page is zeroed and
  becomes accepted, and a GFN KVM maps shared (no Secure EPT entry) is an EPT violation to
  KVM, which decides (tdg_mem_page_accept.c, check_tdaccept_failure).
* TDG.MR.REPORT (4) and the module's other leaves (RTMR.EXTEND, CPUIDVE.SET, VM.RD/WR, VP.RD/WR,
  SYS.RD/RDALL, SERVTD.RD/WR, MR.VERIFYREPORT, MEM.PAGE.ATTR.RD/WR, VP.ENTER, VP.INVEPT,
  VP.INVVPID): not modelled; the run stops with an error naming the leaf.
* any other leaf: TDX_OPERAND_INVALID | RAX.
* TDCALL at CPL > 0 is #GP(0) before any leaf is looked at (the CPU's check, not the module's).

#VE (vector 20): the module fills VE_INFO and injects #VE; if VE_INFO is still valid (the
guest has not read it with TDG.VP.VEINFO.GET) it injects #DF instead (td_vmexit.c,
tdx_inject_ve). Sources: CPUID of a leaf the module does not answer (td_cpuid.c), HLT, port
I/O, VMCALL (reason 18: td_generic_ve_exit; KVM never sees it), MSRs the module does not
virtualise, and a shared access to a GPA with no memory (MMIO: an EPT violation #VE).

The module also keeps the Secure EPT's view of private memory: one byte per GFN, 1 =
accepted (MAPPED), 0 = pending or not mapped. KVM's TDH.MEM.PAGE.ADD at launch
(`page_add`) adds pages accepted; removing a GFN from private memory (TDH.MEM.PAGE.REMOVE on
a private->shared conversion) forgets the acceptance, so a GFN converted back is pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from testbed.hw.exits import (
    EPT_QUAL_FETCH,
    EPT_QUAL_GLA_TRANSLATED,
    EPT_QUAL_GLA_VALID,
    EPT_QUAL_READ,
    EPT_QUAL_WRITE,
    NPF_GUEST_ENC,
    NPF_WRITE,
    VmxExitReason,
)
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE, TDX_CPUID_LEAF_ID, TDX_IDENT, U64, Reg, Vector

# TDCALL leaves (arch/x86/include/asm/shared/tdx.h).
TDG_VP_VMCALL = 0
TDG_VP_INFO = 1
TDG_VP_VEINFO_GET = 3
TDG_MR_REPORT = 4
TDG_MEM_PAGE_ACCEPT = 6
TDG_VM_RD = 7
#: The module's other TDCALL leaves (td_dispatcher/tdx_td_dispatcher.c td_call(), leaf numbers
#: from include/tdx_api_defs.h): they exist, so the testbed stops the run naming them instead of
#: answering TDX_OPERAND_INVALID as for a leaf the module does not have.
_UNMODELLED_LEAVES = {
    2: "TDG.MR.RTMR.EXTEND", 4: "TDG.MR.REPORT", 5: "TDG.VP.CPUIDVE.SET", 7: "TDG.VM.RD", 8: "TDG.VM.WR",
    9: "TDG.VP.RD", 10: "TDG.VP.WR", 11: "TDG.SYS.RD", 12: "TDG.SYS.RDALL", 18: "TDG.SERVTD.RD",
    20: "TDG.SERVTD.WR", 22: "TDG.MR.VERIFYREPORT", 23: "TDG.MEM.PAGE.ATTR.RD", 24: "TDG.MEM.PAGE.ATTR.WR",
    25: "TDG.VP.ENTER", 26: "TDG.VP.INVEPT", 27: "TDG.VP.INVVPID",
}
#: TDG.VP.VMCALL's RCX: the GPRs exposed to the VMM (bit i: GPR i, RAX = 0 ... R15 = 15); bits 0
#: (RAX), 1 (RCX), 4 (RSP) and 63:32 must be clear, and 5 (RBP) too in a TD KVM built (tdx.c
#: setup_tdparams sets TDX_CONFIG_FLAGS_NO_RBP_MOD; tdg_vp_vmcall.c adds BIT(5) to the check).
_VMCALL_RCX_REFUSED = 0b110011
#: GPRs 2..15 (RDX ... R15) in the module's order: the ones TDG.VP.VMCALL may expose
_VMCALL_GPRS = (Reg.RDX, Reg.RBX, Reg.RSP, Reg.RBP, Reg.RSI, Reg.RDI, Reg.R8, Reg.R9, Reg.R10, Reg.R11,
                Reg.R12, Reg.R13, Reg.R14, Reg.R15)

# TDX module status codes (tdx-module include/tdx_error_codes_defs / Linux's tdx_errno.h).
TDX_SUCCESS = 0
TDX_OPERAND_INVALID = 0xC000010000000000
TDX_NO_VALID_VE_INFO = 0xC000070400000000
TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
TDX_PAGE_SIZE_MISMATCH = 0xC0000B0B00000000
#: operand ids ORed into bits 31:0 of a status (api_error_with_operand_id)
OPERAND_ID_RAX = 0
OPERAND_ID_RCX = 1

#: TDG.MEM.PAGE.ACCEPT levels in RCX[2:0] (shared/tdx.h TDX_PS_4K / 2M / 1G)
TDX_PS_4K, TDX_PS_2M, TDX_PS_1G = 0, 1, 2

#: TD attributes (coco/tdx/tdx.c): bit 0 DEBUG, bit 28 SEPT_VE_DISABLE
TDX_ATTR_DEBUG = 1 << 0
TDX_ATTR_SEPT_VE_DISABLE = 1 << 28

#: VMX exit reasons the module puts in VE_INFO (uapi/asm/vmx.h; hw/exits.py VmxExitReason)
VE_REASON_CPUID = int(VmxExitReason.EXIT_REASON_CPUID)
VE_REASON_HLT = int(VmxExitReason.EXIT_REASON_HLT)
VE_REASON_VMCALL = int(VmxExitReason.EXIT_REASON_VMCALL)
VE_REASON_IO = int(VmxExitReason.EXIT_REASON_IO_INSTRUCTION)
VE_REASON_MSR_READ = int(VmxExitReason.EXIT_REASON_MSR_READ)
VE_REASON_MSR_WRITE = int(VmxExitReason.EXIT_REASON_MSR_WRITE)
VE_REASON_EPT_VIOLATION = int(VmxExitReason.EXIT_REASON_EPT_VIOLATION)

#: The extended exit qualification of an EPT violation TD exit (Linux's
#: arch/x86/kvm/vmx/tdx.h TDX_EXT_EXIT_QUAL_TYPE_*): a private access to a PENDING page is
#: type 6, which KVM's tdx_is_sept_violation_unexpected_pending() checks.
TDX_EXT_EXIT_QUAL_TYPE_MASK = 0xF
TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION = 6
#: TDG.MEM.PAGE.ACCEPT's own EPT violation (VMX_EEQ_ACCEPT in tdg_mem_page_accept.c)
TDX_EXT_EXIT_QUAL_TYPE_ACCEPT = 1

#: CPUID leaf 0x21 (TDX_CPUID_LEAF_ID, testbed/x86) is answered from td_cpuid.c's lookup table.
#: Leaves the module answers from the TD's configured CPUID (TDH.MNG.INIT); the testbed's
#: stand-in for the module's lookup table. td_cpuid.c: 0x40000000-0x4FFFFFFF always #VE, and
#: leaves outside the table #VE (REDUCE_VE off); 0x2, 0x6, 0x9, 0xB, 0xC, 0xF, 0x10, 0x16,
#: 0x17, 0x1B, 0x1F, 0x80000002-0x80000005 are "faulting" leaves (#VE without REDUCE_VE).
CPUID_FAULTING_LEAVES = frozenset({0x2, 0x6, 0x9, 0xB, 0xC, 0xF, 0x10, 0x16, 0x17, 0x1B, 0x1F,
                                   0x80000002, 0x80000003, 0x80000004, 0x80000005})
CPUID_RESERVED_START, CPUID_RESERVED_END = 0x40000000, 0x4FFFFFFF
CPUID_MAX_BASE_LEAF = 0x23
CPUID_MAX_EXT_LEAF = 0x80000008


def _ident_regs() -> tuple[int, int, int]:
    raw = TDX_IDENT.encode()
    ebx, edx, ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


class TdCpu(Protocol):
    """What the module uses of the vCPU (hw/intercepts.py, hw/events.py)."""

    def read_reg(self, reg: Reg) -> int: ...

    def write_reg(self, reg: Reg, value: int) -> None: ...

    def _deliver_now(self, vector: int, error_code: int | None, software: bool = False,
                     cr2: int | None = None) -> None: ...

    def _exit(self, code: int, info1: int, info2: int) -> None: ...

    def is_private_gfn(self, gfn: int) -> bool: ...

    def zero_private_page(self, gfn: int) -> None: ...

    def stop_unmodelled(self, detail: str) -> None: ...

    def complete_hypercall(self, rax: int) -> None: ...


@dataclass
class VeInfo:
    """The TDVPS VE_INFO area (tdx_tdvps.h ve_info): what TDG.VP.VEINFO.GET returns."""

    valid: bool = False
    exit_reason: int = 0
    exit_qualification: int = 0
    gla: int = 0
    gpa: int = 0
    instr_len: int = 0
    instr_info: int = 0


class TdxModule:
    """The TDX module of one TD (one vCPU): TDCALL leaves, VE_INFO and #VE, Secure EPT state."""

    def __init__(self, cpu: TdCpu, nframes: int, gpaw: int, attributes: int = TDX_ATTR_SEPT_VE_DISABLE) -> None:
        if gpaw not in (48, 52):
            raise ValueError(f"GPAW {gpaw}: the TDX module supports 48 or 52")
        self._cpu = cpu
        self.gpaw = gpaw
        self.shared_mask = 1 << (gpaw - 1)
        self.attributes = attributes
        #: Secure EPT state per GFN: 1 = accepted (MAPPED), 0 = pending / not mapped
        self.accepted = bytearray(nframes)
        self.ve = VeInfo()
        #: the extended exit qualification of the current EPT-violation TD exit (type bits)
        self.ext_exit_qual = 0
        #: the TD's configured CPUID (TDH.MNG.INIT): leaf, subleaf -> EAX..EDX, or None
        self.cpuid_config: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.tdcalls = 0
        self.ves = 0
        #: the TDG.VP.VMCALL KVM is handling: its RCX, and the TD's values of the GPRs it did
        #: not expose (complete_tdcall restores them)
        self._vmcall_control = 0
        self._hidden_gprs: tuple[tuple[Reg, int], ...] = ()

    def hidden_gpr(self, reg: Reg) -> int | None:
        """During a TDG.VP.VMCALL exit, the TD's own value of `reg` when the module shows KVM a
        zero for it (the TD did not expose it); None otherwise. For the testbed's observers
        (golden traces locate a runtime exit on the guest's stack), never for KVM."""
        for hidden, value in self._hidden_gprs:
            if hidden == reg:
                return value
        return None

    # ------------------------------------------------------------------ the TD's setup
    def configure_cpuid(self, entries: dict[tuple[int, int], tuple[int, int, int, int]]) -> None:
        """TDH.MNG.INIT's CPUID configuration (KVM_TDX_INIT_VM passes userspace's values)."""
        self.cpuid_config = dict(entries)

    def page_add(self, first: int, end: int) -> None:
        """TDH.MEM.PAGE.ADD of GFNs [first, end): the pages enter the TD accepted (MAPPED)."""
        self.accepted[first:end] = b"\x01" * (end - first)

    def page_remove(self, first: int, end: int) -> None:
        """TDH.MEM.PAGE.REMOVE of GFNs [first, end) (KVM zaps private GFNs made shared)."""
        end = min(end, len(self.accepted))
        if first < end:
            self.accepted[first:end] = bytes(end - first)

    def is_accepted(self, gfn: int) -> bool:
        """Whether the Secure EPT maps `gfn` accepted."""
        return 0 <= gfn < len(self.accepted) and self.accepted[gfn] != 0

    # ------------------------------------------------------------------------- #VE
    def inject_ve(self, reason: int, qual: int = 0, gla: int = 0, gpa: int = 0, instr_len: int = 0,
                  instr_info: int = 0) -> None:
        """tdx_inject_ve(): fill VE_INFO and deliver #VE, or #DF while VE_INFO is still valid."""
        if self.ve.valid:
            self._cpu._deliver_now(Vector.DF, 0)
            return
        self.ve = VeInfo(True, reason, qual & U64, gla & U64, gpa & U64, instr_len, instr_info)
        self.ves += 1
        self._cpu._deliver_now(Vector.VE, None)

    def instruction_ve(self, reason: int, length: int, qual: int = 0) -> None:
        """A #VE for an instruction the module does not let the TD execute (RIP stays at it;
        the guest skips it with VE_INFO's instruction length)."""
        self.inject_ve(reason, qual, instr_len=length)

    def mmio_ve(self, gla: int, gpa: int, write: bool, fetch: bool = False) -> None:
        """An EPT-violation #VE: a shared access to a GPA with no memory (MMIO)."""
        qual = (EPT_QUAL_WRITE if write else EPT_QUAL_FETCH if fetch else EPT_QUAL_READ)
        self.inject_ve(VE_REASON_EPT_VIOLATION, qual | EPT_QUAL_GLA_VALID | EPT_QUAL_GLA_TRANSLATED, gla, gpa)

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int] | None:
        """td_cpuid_exit(): the values the module answers, or None for a #VE."""
        if CPUID_RESERVED_START <= leaf <= CPUID_RESERVED_END:
            return None
        if leaf > CPUID_MAX_EXT_LEAF or CPUID_MAX_BASE_LEAF < leaf < 0x80000000:
            # "higher than the maximum for its range is treated as if it were the maximum in
            # the base range" (td_cpuid.c)
            leaf = CPUID_MAX_BASE_LEAF
        if leaf in CPUID_FAULTING_LEAVES:
            return None
        if leaf == TDX_CPUID_LEAF_ID:
            ebx, ecx, edx = _ident_regs()
            return 0, ebx, ecx, edx
        values = self.cpuid_config.get((leaf, subleaf))
        if values is None:
            values = self.cpuid_config.get((leaf, 0))
        if values is None:
            return None  # not in the lookup table: #VE (REDUCE_VE off)
        if leaf == 0:
            return max(values[0], TDX_CPUID_LEAF_ID), values[1], values[2], values[3]
        return values

    # ---------------------------------------------------------------------- TDCALL
    def tdcall(self, rax: int, rcx: int, cpl: int, long_mode: bool = True) -> None:
        """Execute one TDCALL (RIP at it; RAX, RCX, the CPL and whether the TD is in 64-bit mode
        as the exit saved them); RIP moves past it unless the leaf left to KVM (TDG.VP.VMCALL:
        KVM calls complete_tdcall) or faulted."""
        cpu = self._cpu
        if cpl > 0:
            # TDCALL is #GP(0) at CPL > 0, checked before anything reaches the module (kvm-x86
            # 9d7dfb95da2c, "KVM: VMX: Inject #UD if guest tries to execute SEAMCALL or TDCALL":
            # "TDCALL and SEAMCALL #GP at CPL > 0, and the CPL check is performed prior to the
            # VMX non-root (VM-Exit) check"): a TD's user mode never reaches the module or KVM.
            cpu._deliver_now(Vector.GP, 0)
            return
        if not long_mode:
            # td_call(): "if (!is_td_guest_in_64b_mode()) inject_gp(0)", before RAX is read.
            cpu._deliver_now(Vector.GP, 0)
            return
        self.tdcalls += 1
        leaf = rax & 0xFFFF
        version = (rax >> 16) & 0xFF
        if rax >> 24:
            # td_call(): tdx_leaf_and_version_t's reserved0 (bits 31:24) and reserved1 (63:32)
            status = TDX_OPERAND_INVALID | OPERAND_ID_RAX
        elif version and leaf not in (TDG_VM_RD, TDG_VP_VEINFO_GET):
            # "Only a few functions have multiple versions" (td_call(); VEINFO.GET has one in
            # the module versions that know TDG.VP.VEINFO.GET v1)
            status = TDX_OPERAND_INVALID | OPERAND_ID_RAX
        elif leaf == TDG_VP_VMCALL:
            self._vmcall(rcx)
            return
        elif leaf == TDG_VP_INFO:
            status = self._vp_info()
        elif leaf == TDG_VP_VEINFO_GET:
            status = self._veinfo_get(version)
        elif leaf == TDG_MEM_PAGE_ACCEPT:
            accept = self._page_accept(rcx)
            if accept is None:
                return  # an EPT violation TD exit: KVM decides, the TDCALL re-executes
            status = accept
        elif leaf in _UNMODELLED_LEAVES:
            cpu.stop_unmodelled(f"TDCALL {_UNMODELLED_LEAVES[leaf]} (leaf {leaf}) is not modelled by the "
                                "testbed's TDX module")
            return
        else:
            status = TDX_OPERAND_INVALID | OPERAND_ID_RAX
        cpu.complete_hypercall(status)  # RAX and RIP past the TDCALL, in one batched write

    def complete_tdcall(self) -> None:
        """KVM's TDH.VP.ENTER after a TDG.VP.VMCALL (save_regs_after_tdvmcall): only the GPRs RCX
        exposed take the VMM's values, the others get back the TD's own; RCX = the control
        value, RAX = 0 (the TDCALL's own status) and RIP past the TDCALL (read back: KVM may
        complete it after a return to userspace, outside the exit)."""
        cpu = self._cpu
        hidden, self._hidden_gprs = self._hidden_gprs, ()
        for reg, value in hidden:
            cpu.write_reg(reg, value)
        cpu.write_reg(Reg.RCX, self._vmcall_control)
        cpu.write_reg(Reg.RAX, TDX_SUCCESS)
        cpu.write_reg(Reg.RIP, cpu.read_reg(Reg.RIP) + 4)

    def _vmcall(self, control: int) -> None:
        cpu = self._cpu
        if control & _VMCALL_RCX_REFUSED or control >> 32:
            cpu.complete_hypercall(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
            return
        # A trap-like TD exit (tdg_vp_vmcall.c): the VMM sees the GPRs RCX exposes and zeros for
        # the others (tdh_vp_enter's vmm_regs); the TD keeps its own values of those, which
        # complete_tdcall puts back whatever KVM wrote there.
        hidden = tuple((reg, cpu.read_reg(reg)) for i, reg in enumerate(_VMCALL_GPRS, start=2)
                       if not control >> i & 1)
        for reg, _ in hidden:
            cpu.write_reg(reg, 0)
        self._hidden_gprs = hidden
        self._vmcall_control = control
        cpu._exit(VmxExitReason.EXIT_REASON_TDCALL, 0, 0)

    def _vp_info(self) -> int:
        cpu = self._cpu
        cpu.write_reg(Reg.RCX, self.gpaw)  # RCX[5:0] GPAW; NUM_L2_VMS etc. 0
        cpu.write_reg(Reg.RDX, self.attributes)
        cpu.write_reg(Reg.R8, 1 | (1 << 32))  # NUM_VCPUS | MAX_VCPUS << 32
        cpu.write_reg(Reg.R9, 0)  # vCPU index 0
        cpu.write_reg(Reg.R10, 1)  # commands available: TDG.SYS.RD (tdg_vp_info.c)
        cpu.write_reg(Reg.R11, 0)
        return TDX_SUCCESS

    def _veinfo_get(self, version: int) -> int:
        cpu = self._cpu
        for reg in (Reg.RCX, Reg.RDX, Reg.R8, Reg.R9, Reg.R10):
            cpu.write_reg(reg, 0)
        if version > 1:
            return TDX_OPERAND_INVALID | OPERAND_ID_RAX
        ve = self.ve
        if not ve.valid:
            return TDX_NO_VALID_VE_INFO
        cpu.write_reg(Reg.RCX, ve.exit_reason)
        cpu.write_reg(Reg.RDX, ve.exit_qualification)
        cpu.write_reg(Reg.R8, ve.gla)
        cpu.write_reg(Reg.R9, ve.gpa)
        cpu.write_reg(Reg.R10, (ve.instr_len & 0xFFFFFFFF) | ((ve.instr_info & 0xFFFFFFFF) << 32))
        self.ve = VeInfo()
        return TDX_SUCCESS

    def _page_accept(self, rcx: int) -> int | None:
        level = rcx & 0x7
        gpa = rcx & ~0xFFF & U64
        # verify_page_info_input(LVL_PT, LVL_PD): reserved bits 11:3 zero, level 4K or 2M,
        # the GPA aligned to the level; check_gpa_validity(PRIVATE_ONLY): below GPAW, shared bit clear.
        if rcx & 0xFF8 or level > TDX_PS_2M:
            return TDX_OPERAND_INVALID | OPERAND_ID_RCX
        size = PAGE_SIZE << (9 * level)
        if gpa & (size - 1) or gpa >> self.gpaw or gpa & self.shared_mask:
            return TDX_OPERAND_INVALID | OPERAND_ID_RCX
        first = gpa >> PAGE_SHIFT
        if first >= len(self.accepted):
            self._accept_violation(gpa, level)
            return None
        if level == TDX_PS_2M:
            # The Secure EPT holds 4K leaves only: the 2M entry is a non-leaf (Case 3).
            return TDX_PAGE_SIZE_MISMATCH | TDX_PS_2M
        if not self._cpu.is_private_gfn(first):
            self._accept_violation(gpa, level)
            return None
        if self.accepted[first]:
            return TDX_PAGE_ALREADY_ACCEPTED | TDX_PS_4K
        self._cpu.zero_private_page(first)  # init_sept_4k_page: zeroed with the TD's key
        self.accepted[first] = 1
        return TDX_SUCCESS

    def _accept_violation(self, gpa: int, level: int) -> None:
        """No Secure EPT entry for the GPA (KVM maps the GFN shared, or no memory): an EPT
        violation TD exit (async_tdexit_ept_violation, VMX_EEQ_ACCEPT); KVM's fault path
        decides (KVM_EXIT_MEMORY_FAULT when the attribute is shared)."""
        self.ext_exit_qual = TDX_EXT_EXIT_QUAL_TYPE_ACCEPT | (level << 4)
        try:
            self._cpu._exit(VmxExitReason.EXIT_REASON_EPT_VIOLATION, NPF_WRITE | NPF_GUEST_ENC, gpa)
        finally:
            self.ext_exit_qual = 0
