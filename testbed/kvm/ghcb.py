"""The GHCB ABI between an SEV-ES / SEV-SNP guest and KVM: page layout, exit codes, protocol codes.

Everything here is a constant, a bit layout or a thin accessor, as the kernel headers define them:
arch/x86/include/asm/svm.h (struct ghcb, struct ghcb_save_area and the ghcb_set_*() accessors),
arch/x86/include/uapi/asm/svm.h (SVM_EXIT_* / SVM_VMGEXIT_*), arch/x86/include/asm/sev-common.h
(GHCB_MSR_*, the PSC buffer, GHCB_ERR_*, termination reasons) and the few values
arch/x86/kvm/svm/sev.c defines for itself (GHCB_VERSION_*, GHCB_HV_FT_SUPPORTED). Names are the
kernel's so they can be grepped; where the kernel has a function-like macro the helper is the
macro's name in lower case. The handlers that give these values their meaning are in
testbed/kvm/sev.py; the facts are summarised in ../shared/ABI.md sections 3 and 4.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from testbed.hw.memory import HostMemory
from testbed.x86 import PAGE_SIZE, U64

MSR_AMD64_SEV_ES_GHCB = 0xC0010130  # arch/x86/include/asm/msr-index.h

# =============================================================================================
# GHCB MSR protocol (sev-common.h)
# =============================================================================================

GHCB_MSR_INFO_POS = 0
GHCB_DATA_LOW = 12
GHCB_MSR_INFO_MASK = (1 << GHCB_DATA_LOW) - 1


class GhcbMsrCode(IntEnum):
    """GHCBInfo, GHCBData[11:0]: requests are even, responses odd (sev-common.h)."""

    GHCB_MSR_SEV_INFO_RESP = 0x001
    GHCB_MSR_SEV_INFO_REQ = 0x002
    GHCB_MSR_CPUID_REQ = 0x004
    GHCB_MSR_CPUID_RESP = 0x005
    GHCB_MSR_AP_RESET_HOLD_REQ = 0x006
    GHCB_MSR_AP_RESET_HOLD_RESP = 0x007
    GHCB_MSR_PREF_GPA_REQ = 0x010
    GHCB_MSR_PREF_GPA_RESP = 0x011
    GHCB_MSR_REG_GPA_REQ = 0x012
    GHCB_MSR_REG_GPA_RESP = 0x013
    GHCB_MSR_PSC_REQ = 0x014
    GHCB_MSR_PSC_RESP = 0x015
    GHCB_MSR_VMPL_REQ = 0x016  # SVSM "run at VMPL": KVM does not handle it
    GHCB_MSR_VMPL_RESP = 0x017
    GHCB_MSR_HV_FT_REQ = 0x080
    GHCB_MSR_HV_FT_RESP = 0x081
    GHCB_MSR_TERM_REQ = 0x100


# CPUID request / response
GHCB_MSR_CPUID_FUNC_POS = 32
GHCB_MSR_CPUID_FUNC_MASK = 0xFFFFFFFF
GHCB_MSR_CPUID_VALUE_POS = 32
GHCB_MSR_CPUID_VALUE_MASK = 0xFFFFFFFF
GHCB_MSR_CPUID_REG_POS = 30
GHCB_MSR_CPUID_REG_MASK = 0x3
GHCB_CPUID_REQ_EAX = 0
GHCB_CPUID_REQ_EBX = 1
GHCB_CPUID_REQ_ECX = 2
GHCB_CPUID_REQ_EDX = 3

# AP reset hold
GHCB_MSR_AP_RESET_HOLD_RESULT_POS = 12
GHCB_MSR_AP_RESET_HOLD_RESULT_MASK = (1 << 52) - 1  # GENMASK_ULL(51, 0)

# Preferred / registered GHCB GPA
GHCB_MSR_GPA_VALUE_POS = 12
GHCB_MSR_GPA_VALUE_MASK = (1 << 52) - 1  # GENMASK_ULL(51, 0)
GHCB_MSR_PREF_GPA_NONE = 0xFFFFFFFFFFFFF

# Hypervisor features
GHCB_MSR_HV_FT_POS = 12
GHCB_MSR_HV_FT_MASK = (1 << 52) - 1  # GENMASK_ULL(51, 0)
GHCB_HV_FT_SNP = 1 << 0
GHCB_HV_FT_SNP_AP_CREATION = 1 << 1
GHCB_HV_FT_SNP_MULTI_VMPL = 1 << 5
#: What KVM advertises, in the MSR protocol and in SVM_VMGEXIT_HV_FEATURES (sev.c).
GHCB_HV_FT_SUPPORTED = GHCB_HV_FT_SNP | GHCB_HV_FT_SNP_AP_CREATION

# Termination request
GHCB_MSR_TERM_REASON_SET_POS = 12
GHCB_MSR_TERM_REASON_SET_MASK = 0xF
GHCB_MSR_TERM_REASON_POS = 16
GHCB_MSR_TERM_REASON_MASK = 0xFF

#: The protocol versions KVM implements (sev.c): the SEV-info response carries the VM's
#: ghcb_version as the maximum and GHCB_VERSION_MIN as the minimum.
GHCB_VERSION_MAX = 2
GHCB_VERSION_MIN = 1


class SnpPageState(IntEnum):
    """enum psc_op: the operation of an MSR-protocol page state change (sev-common.h)."""

    SNP_PAGE_STATE_PRIVATE = 1
    SNP_PAGE_STATE_SHARED = 2


#: Set the highest bit as a generic error response (sev-common.h).
GHCB_MSR_PSC_RESP_ERROR = (1 << 63) | GhcbMsrCode.GHCB_MSR_PSC_RESP


def ghcb_msr_info(value: int) -> int:
    """GHCB_MSR_INFO(v): the request/response code, GHCBData[11:0]."""
    return value & GHCB_MSR_INFO_MASK


def ghcb_msr_sev_info(max_version: int, min_version: int, cbit: int) -> int:
    """GHCB_MSR_SEV_INFO(_max, _min, _cbit): the SEV information response."""
    return (
        ((max_version & 0xFFFF) << 48)
        | ((min_version & 0xFFFF) << 32)
        | ((cbit & 0xFF) << 24)
        | GhcbMsrCode.GHCB_MSR_SEV_INFO_RESP
    )


def ghcb_msr_proto_max(value: int) -> int:
    """GHCB_MSR_PROTO_MAX(v)."""
    return (value >> 48) & 0xFFFF


def ghcb_msr_proto_min(value: int) -> int:
    """GHCB_MSR_PROTO_MIN(v)."""
    return (value >> 32) & 0xFFFF


def ghcb_cpuid_req(fn: int, reg: int) -> int:
    """GHCB_CPUID_REQ(fn, reg): CPUID function in [63:32], register selector in [31:30]."""
    return GhcbMsrCode.GHCB_MSR_CPUID_REQ | ((reg & 0x3) << 30) | ((fn & 0xFFFFFFFF) << 32)


def ghcb_msr_reg_gpa_req_val(gfn: int) -> int:
    """GHCB_MSR_REG_GPA_REQ_VAL(v): register the GHCB at `gfn`."""
    return ((gfn & GHCB_MSR_GPA_VALUE_MASK) << 12) | GhcbMsrCode.GHCB_MSR_REG_GPA_REQ


def ghcb_msr_psc_req_gfn(gfn: int, op: int) -> int:
    """GHCB_MSR_PSC_REQ_GFN(gfn, op): op in [55:52], GFN in [51:12]."""
    return ((op & 0xF) << 52) | ((gfn & ((1 << 40) - 1)) << 12) | GhcbMsrCode.GHCB_MSR_PSC_REQ


def ghcb_msr_psc_req_to_gfn(msr: int) -> int:
    """GHCB_MSR_PSC_REQ_TO_GFN(msr): GHCBData[51:12]."""
    return (msr >> 12) & ((1 << 40) - 1)


def ghcb_msr_psc_req_to_op(msr: int) -> int:
    """GHCB_MSR_PSC_REQ_TO_OP(msr): GHCBData[55:52]."""
    return (msr >> 52) & 0xF


def ghcb_sev_term_reason(reason_set: int, reason_val: int) -> int:
    """GHCB_SEV_TERM_REASON(reason_set, reason_val) without the request code; OR in
    GHCB_MSR_TERM_REQ to build the MSR value."""
    return ((reason_set & 0xF) << 12) | ((reason_val & 0xFF) << 16)


class SevTermSet(IntEnum):
    """Termination reason sets (sev-common.h)."""

    SEV_TERM_SET_GEN = 0
    SEV_TERM_SET_LINUX = 1


class SevTermGeneral(IntEnum):
    """Reason codes of set 0, SEV_TERM_SET_GEN (sev-common.h)."""

    GHCB_SEV_ES_GEN_REQ = 0
    GHCB_SEV_ES_PROT_UNSUPPORTED = 1
    GHCB_SNP_UNSUPPORTED = 2


class SevTermLinux(IntEnum):
    """Linux-specific reason codes of set 1, SEV_TERM_SET_LINUX (sev-common.h)."""

    GHCB_TERM_REGISTER = 0
    GHCB_TERM_PSC = 1
    GHCB_TERM_PVALIDATE = 2
    GHCB_TERM_NOT_VMPL0 = 3
    GHCB_TERM_CPUID = 4
    GHCB_TERM_CPUID_HV = 5
    GHCB_TERM_SECRETS_PAGE = 6
    GHCB_TERM_NO_SVSM = 7
    GHCB_TERM_SVSM_VMPL0 = 8
    GHCB_TERM_SVSM_CAA = 9
    GHCB_TERM_SECURE_TSC = 10
    GHCB_TERM_SVSM_CA_REMAP_FAIL = 11


# =============================================================================================
# SW_EXITCODE values (uapi/asm/svm.h); also the #VC error codes of the intercepted events
# =============================================================================================


class SwExitCode(IntEnum):
    """The SW_EXITCODE values KVM accepts through the GHCB, and the ones it knows it rejects.

    The SVM_EXIT_* members are hardware exit codes the guest's #VC handler forwards; the
    SVM_VMGEXIT_* members are software-defined ("non-automatic exit") events.
    """

    SVM_EXIT_READ_DR7 = 0x027
    SVM_EXIT_WRITE_DR7 = 0x037
    SVM_EXIT_RDTSC = 0x06E
    SVM_EXIT_RDPMC = 0x06F
    SVM_EXIT_CPUID = 0x072
    SVM_EXIT_INVD = 0x076
    SVM_EXIT_IOIO = 0x07B
    SVM_EXIT_MSR = 0x07C
    SVM_EXIT_VMMCALL = 0x081
    SVM_EXIT_RDTSCP = 0x087
    SVM_EXIT_WBINVD = 0x089
    SVM_EXIT_MONITOR = 0x08A
    SVM_EXIT_MWAIT = 0x08B
    SVM_EXIT_NPF = 0x400
    SVM_EXIT_VMGEXIT = 0x403
    SVM_VMGEXIT_MMIO_READ = 0x80000001
    SVM_VMGEXIT_MMIO_WRITE = 0x80000002
    SVM_VMGEXIT_NMI_COMPLETE = 0x80000003
    SVM_VMGEXIT_AP_HLT_LOOP = 0x80000004
    SVM_VMGEXIT_AP_JUMP_TABLE = 0x80000005
    SVM_VMGEXIT_PSC = 0x80000010
    SVM_VMGEXIT_GUEST_REQUEST = 0x80000011
    SVM_VMGEXIT_EXT_GUEST_REQUEST = 0x80000012
    SVM_VMGEXIT_AP_CREATION = 0x80000013
    SVM_VMGEXIT_SNP_RUN_VMPL = 0x80000018  # not handled by KVM (INVALID_EVENT)
    SVM_VMGEXIT_SAVIC = 0x8000001A  # Secure AVIC, newer than the sev.c modelled here
    SVM_VMGEXIT_HV_FEATURES = 0x8000FFFD
    SVM_VMGEXIT_TERM_REQUEST = 0x8000FFFE
    SVM_VMGEXIT_UNSUPPORTED_EVENT = 0x8000FFFF


# SVM_VMGEXIT_AP_JUMP_TABLE, SW_EXITINFO1
SVM_VMGEXIT_SET_AP_JUMP_TABLE = 0
SVM_VMGEXIT_GET_AP_JUMP_TABLE = 1

# SVM_VMGEXIT_AP_CREATION, SW_EXITINFO1[31:0]
SVM_VMGEXIT_AP_CREATE_ON_INIT = 0
SVM_VMGEXIT_AP_CREATE = 1
SVM_VMGEXIT_AP_DESTROY = 2

#: SEV_FEATURES bit 0 (asm/svm.h SVM_SEV_FEAT_SNP_ACTIVE): __sev_guest_init() sets it in an SNP
#: VM's vmsa_features, which an AP creation request must repeat in RAX (sev_snp_ap_creation).
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0

#: The exit codes only an SNP guest may use (sev.c is_snp_only_vmgexit).
SNP_ONLY_VMGEXITS = frozenset({
    SwExitCode.SVM_VMGEXIT_AP_CREATION, SwExitCode.SVM_VMGEXIT_GUEST_REQUEST,
    SwExitCode.SVM_VMGEXIT_EXT_GUEST_REQUEST, SwExitCode.SVM_VMGEXIT_PSC,
})


def svm_vmgexit_term_reason(reason_set: int, reason_code: int) -> int:
    """SVM_VMGEXIT_TERM_REASON(): SW_EXITINFO1[3:0] = set, [11:4] = code."""
    return (reason_set & 0xF) | ((reason_code & 0xFF) << 4)


# SVM IOIO EXITINFO1 size field (uapi svm.h / asm/svm.h); the other IOIO bits are in hw/exits.py.
SVM_IOIO_SIZE_SHIFT = 4
SVM_IOIO_SIZE_MASK = 7 << SVM_IOIO_SIZE_SHIFT

# Event injection format used in SW_EXITINFO2 with GHCB_HV_RESP_ISSUE_EXCEPTION (asm/svm.h).
SVM_EVTINJ_VEC_MASK = 0xFF
SVM_EVTINJ_TYPE_SHIFT = 8
SVM_EVTINJ_TYPE_EXEPT = 3 << SVM_EVTINJ_TYPE_SHIFT
SVM_EVTINJ_VALID = 1 << 31


# =============================================================================================
# Return status in SW_EXITINFO1 / SW_EXITINFO2 (sev-common.h)
# =============================================================================================


class GhcbHvResp(IntEnum):
    """SW_EXITINFO1[31:0] on return to the guest."""

    GHCB_HV_RESP_NO_ACTION = 0
    GHCB_HV_RESP_ISSUE_EXCEPTION = 1
    GHCB_HV_RESP_MALFORMED_INPUT = 2


class GhcbErr(IntEnum):
    """SW_EXITINFO2 with GHCB_HV_RESP_MALFORMED_INPUT: what was wrong with the request."""

    GHCB_ERR_NOT_REGISTERED = 1
    GHCB_ERR_INVALID_USAGE = 2
    GHCB_ERR_INVALID_SCRATCH_AREA = 3
    GHCB_ERR_MISSING_INPUT = 4
    GHCB_ERR_INVALID_INPUT = 5
    GHCB_ERR_INVALID_EVENT = 6


# =============================================================================================
# The GHCB page (asm/svm.h: struct ghcb, struct ghcb_save_area)
# =============================================================================================


class GhcbSave(IntEnum):
    """Offsets of the struct ghcb_save_area fields that have accessors (member names as in the
    struct). The field's bit in the valid bitmap is offset // 8 (GHCB_BITMAP_IDX)."""

    cpl = 0x0CB
    xss = 0x140
    dr7 = 0x160
    rip = 0x178
    rsp = 0x1D8
    rax = 0x1F8
    rcx = 0x308
    rdx = 0x310
    rbx = 0x318
    rbp = 0x328
    rsi = 0x330
    rdi = 0x338
    r8 = 0x340
    r9 = 0x348
    r10 = 0x350
    r11 = 0x358
    r12 = 0x360
    r13 = 0x368
    r14 = 0x370
    r15 = 0x378
    sw_exit_code = 0x390
    sw_exit_info_1 = 0x398
    sw_exit_info_2 = 0x3A0
    sw_scratch = 0x3A8
    xcr0 = 0x3E8


GHCB_VALID_BITMAP_OFFSET = 0x3F0  # u8 valid_bitmap[16]: 128 bits covering 0x000-0x3FF
GHCB_VALID_BITMAP_SIZE = 16
GHCB_X87_STATE_GPA_OFFSET = 0x400
GHCB_SHARED_BUFFER_OFFSET = 0x800  # offsetof(struct ghcb, shared_buffer)
GHCB_SHARED_BUF_SIZE = 0x7F0  # 2032
GHCB_RESERVED_0XFF0_OFFSET = 0xFF0  # offsetof(struct ghcb, reserved_0xff0): end of the shared buffer
GHCB_PROTOCOL_VERSION_OFFSET = 0xFFA  # u16
GHCB_USAGE_OFFSET = 0xFFC  # u32 ghcb_usage
GHCB_DEFAULT_USAGE = 0  # the only usage KVM accepts
GHCB_SIZE = PAGE_SIZE

assert GHCB_SHARED_BUFFER_OFFSET + GHCB_SHARED_BUF_SIZE == GHCB_RESERVED_0XFF0_OFFSET


def ghcb_bitmap_idx(field: GhcbSave) -> int:
    """GHCB_BITMAP_IDX(field): the field's bit in the valid bitmap."""
    return int(field) // 8


def _field_size(field: GhcbSave) -> int:
    return 1 if field is GhcbSave.cpl else 8


class Ghcb:
    """A GHCB page in guest memory, read and written as the host sees it (the page is shared).

    `get`/`set` are the kernel's ghcb_get_<field>() / ghcb_set_<field>(): a set also marks the
    field valid, which is how both the guest's requests and KVM's answers are written. Every
    access goes to memory, so a hostile guest (or a test playing one) can change a field between
    two reads exactly as it could on hardware. The caller keeps `gpa` inside memory.
    """

    def __init__(self, memory: HostMemory, gpa: int) -> None:
        self.memory = memory
        self.gpa = gpa

    # -- save-area fields ----------------------------------------------------------------------
    def get(self, field: GhcbSave) -> int:
        """ghcb_get_<field>(): the raw value, valid or not."""
        size = _field_size(field)
        return int.from_bytes(self.memory.read(self.gpa + field, size), "little")

    def set(self, field: GhcbSave, value: int) -> None:
        """ghcb_set_<field>(): store the value (truncated to the field) and mark it valid."""
        size = _field_size(field)
        self.memory.write(self.gpa + field, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        self.valid_bitmap = self.valid_bitmap | (1 << ghcb_bitmap_idx(field))

    def is_valid(self, field: GhcbSave) -> bool:
        """ghcb_<field>_is_valid(): the field's bit in the page's valid bitmap."""
        return bool(self.valid_bitmap >> ghcb_bitmap_idx(field) & 1)

    @property
    def valid_bitmap(self) -> int:
        """The 128-bit valid bitmap as an integer (bit n = byte n // 8, bit n % 8)."""
        raw = self.memory.read(self.gpa + GHCB_VALID_BITMAP_OFFSET, GHCB_VALID_BITMAP_SIZE)
        return int.from_bytes(raw, "little")

    @valid_bitmap.setter
    def valid_bitmap(self, value: int) -> None:
        data = (value & ((1 << 128) - 1)).to_bytes(GHCB_VALID_BITMAP_SIZE, "little")
        self.memory.write(self.gpa + GHCB_VALID_BITMAP_OFFSET, data)

    # -- trailer ---------------------------------------------------------------------------------
    @property
    def ghcb_usage(self) -> int:
        """ghcb->ghcb_usage (u32 at 0xFFC)."""
        return int.from_bytes(self.memory.read(self.gpa + GHCB_USAGE_OFFSET, 4), "little")

    @ghcb_usage.setter
    def ghcb_usage(self, value: int) -> None:
        self.memory.write(self.gpa + GHCB_USAGE_OFFSET, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    @property
    def protocol_version(self) -> int:
        """ghcb->protocol_version (u16 at 0xFFA); KVM never reads it."""
        return int.from_bytes(self.memory.read(self.gpa + GHCB_PROTOCOL_VERSION_OFFSET, 2), "little")

    @protocol_version.setter
    def protocol_version(self, value: int) -> None:
        self.memory.write(self.gpa + GHCB_PROTOCOL_VERSION_OFFSET, (value & 0xFFFF).to_bytes(2, "little"))

    @property
    def shared_buffer_gpa(self) -> int:
        """GPA of ghcb->shared_buffer, where GHCB v2 requires the scratch area to live."""
        return self.gpa + GHCB_SHARED_BUFFER_OFFSET


# =============================================================================================
# Page State Change (sev-common.h: struct psc_hdr, struct psc_entry)
# =============================================================================================

VMGEXIT_PSC_MAX_ENTRY = 64  # what the Linux guest builds (stack-size reason)
VMGEXIT_PSC_MAX_COUNT = 253  # (GHCB_SHARED_BUF_SIZE - sizeof(psc_hdr)) / sizeof(psc_entry)
PSC_HDR_SIZE = 8  # u16 cur_entry, u16 end_entry, u32 reserved
PSC_ENTRY_SIZE = 8
PSC_HDR_CUR_ENTRY_OFFSET = 0
PSC_HDR_END_ENTRY_OFFSET = 2
PSC_HDR_RESERVED_OFFSET = 4


class PscOp(IntEnum):
    """psc_entry.operation. The kernel names only 1 and 2 (VMGEXIT_PSC_OP_*); 3 and 4 are the
    GHCB spec's PSMASH / UNSMASH as other implementations name them (ABI.md 4.5, 2nd-hand)."""

    VMGEXIT_PSC_OP_PRIVATE = 1
    VMGEXIT_PSC_OP_SHARED = 2
    VMGEXIT_PSC_OP_PSMASH = 3
    VMGEXIT_PSC_OP_UNSMASH = 4


class PscError(IntEnum):
    """PSC status in SW_EXITINFO2 (0 = success). GENERIC is KVM's choice for "anything else"."""

    VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
    VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
    VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32


_PSC_HDR = struct.Struct("<HHI")


@dataclass(frozen=True, slots=True)
class PscHdr:
    """struct psc_hdr: cur_entry and end_entry are indices, end_entry inclusive."""

    cur_entry: int
    end_entry: int
    reserved: int = 0

    def to_bytes(self) -> bytes:
        """The 8 little-endian bytes at the start of the PSC buffer."""
        return _PSC_HDR.pack(self.cur_entry & 0xFFFF, self.end_entry & 0xFFFF, self.reserved & 0xFFFFFFFF)

    @classmethod
    def from_bytes(cls, data: bytes) -> PscHdr:
        """Decode the 8-byte header."""
        cur, end, reserved = _PSC_HDR.unpack(data[:PSC_HDR_SIZE])
        return cls(cur, end, reserved)


@dataclass(frozen=True, slots=True)
class PscEntry:
    """struct psc_entry, a little-endian u64 bitfield:
    [11:0] cur_page, [51:12] gfn, [55:52] operation, [56] pagesize (1 = 2M), [63:57] reserved."""

    cur_page: int
    gfn: int
    operation: int
    pagesize: int
    reserved: int = 0

    def to_u64(self) -> int:
        """Pack the bitfield (each field truncated to its width, as C does)."""
        return (
            (self.cur_page & 0xFFF)
            | ((self.gfn & ((1 << 40) - 1)) << 12)
            | ((self.operation & 0xF) << 52)
            | ((self.pagesize & 1) << 56)
            | ((self.reserved & 0x7F) << 57)
        )

    @classmethod
    def from_u64(cls, value: int) -> PscEntry:
        """Unpack the bitfield."""
        value &= U64
        return cls(
            cur_page=value & 0xFFF,
            gfn=(value >> 12) & ((1 << 40) - 1),
            operation=(value >> 52) & 0xF,
            pagesize=(value >> 56) & 1,
            reserved=value >> 57,
        )


PSC_ENTRY_CUR_PAGE_MASK = 0xFFF


def psc_entry_offset(index: int) -> int:
    """Byte offset of entries[index] from the start of the PSC buffer."""
    return PSC_HDR_SIZE + index * PSC_ENTRY_SIZE
