"""Instruction intercepts: which instructions leave the guest, and how.

VMCALL/VMMCALL/VMGEXIT/PVALIDATE/TDCALL raise Unicorn's invalid-instruction hook, and the
vendor's rules decide between a VM exit to the hypervisor and an exception into the guest;
CPUID, IN/OUT and HLT exit to the hypervisor. Unicorn has no RDMSR/WRMSR hook, so MSR
instructions (and, on SEV-ES/SNP, CPUID and IN/OUT, which must raise #VC before they run) are
found by scanning each code frame as it is first fetched and hooking each site
(`_scan_sites`). The MSRs the hardware itself implements (SEV_STATUS, the GHCB MSR) live here.

Every exit goes through `_exit` (testbed/hw/events.py), the native hypercall included: the
snapshot of RAX, CS, RBX, RCX, RDX and RSI taken at the invalid-instruction hook (the VMCB
save area) only spares KVM register reads, it is not a second way in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from testbed.errors import TestbedError
from testbed.hw.events import _CTX_CPUID, _CTX_INVALID, _CTX_IO, _CTX_NONE, EventDelivery
from testbed.hw.exits import (
    NPF_GUEST_ENC,
    NPF_GUEST_FINAL,
    SVM_IOIO_ADDR_SHIFT,
    SVM_IOIO_PORT_SHIFT,
    SVM_IOIO_REP,
    SVM_IOIO_SEG_SHIFT,
    SVM_IOIO_SIZE_SHIFT,
    SVM_IOIO_STR,
    SVM_IOIO_TYPE_IN,
    VMX_INTR_INFO_VALID,
    VMX_INTR_TYPE_HARD_EXCEPTION,
    VMX_IO_IN,
    VMX_IO_PORT_SHIFT,
    VMX_IO_REP,
    VMX_IO_STRING,
    GhcbMsrRegister,
    SvmExitCode,
    Vendor,
    VmxExitReason,
)
from testbed.hw.mmu import _DeliveryFault, _NestedFault
from testbed.hw.rmp import PVALIDATE_FAIL_INPUT, PvalidateResult
from testbed.hw.unicorn_binding import HardwareError
from testbed.x86 import (
    MSR_AMD64_SEV_ES_GHCB,
    PAGE_SHIFT,
    PAGE_SIZE,
    PVALIDATE_BYTES,
    RFLAGS_CF,
    RFLAGS_TF,
    RMPADJUST_BYTES,
    TDCALL_BYTES,
    VMCALL_BYTES,
    VMGEXIT_BYTES,
    VMMCALL_BYTES,
    Reg,
    Vector,
)
from testbed.x86.addr import Gfn, Gva
from testbed.x86.paging import ACCESS_READ
from testbed.x86.pio import (
    IMM8_PORT_OPCODES,
    IO_OPCODES,
    LEGACY_PREFIXES,
    MAX_INSN_LENGTH,
    MAX_PREFIXES,
    REX_PREFIXES,
    IoInsn,
    decode_io,
    prefix_count,
)

#: Bound on the per-address code hooks of intercepted-instruction sites (see _scan_sites).
#: Every UC_HOOK_CODE is visited at each translated instruction and for each translated block
#: (Unicorn's HOOK_EXISTS_BOUNDED, hooked_regions_check), so their number must stay small.
MAX_SITE_HOOKS = 4096

# Opcode byte patterns of the instruction sites the hardware intercepts by code hooks.
_IO_SITE_FIRST = frozenset(bytes([op]) for op in IO_OPCODES)
# IN/OUT are intercepted at their address on every VM: Unicorn's IN/OUT hooks can neither move
# RIP nor stop before the end of the block (UNICORN.md), and KVM_RUN returns at each one.
# CPUID is a site on every VM too: SEV-ES/SNP (#VC) and TDX (#VE, or the module's own answer)
# take it there, and with LOCK it is #UD everywhere; elsewhere _on_site leaves it to Unicorn's
# CPUID hook.
# WBINVD and INVD exit on every VM (KVM intercepts them: a no-op), #VC on SEV-ES/SNP and #VE in a
# TD; RDPMC, RDTSCP, MONITOR/MWAIT and (on SEV-ES/SNP) MOV to/from DR7 exit or fault where
# Unicorn would run them or raise another exception, and are not modelled: the run ends naming
# them (`_UNMODELLED`) instead of a silently wrong answer.
_SITE_PATTERNS = (
    b"\x0f\x30", b"\x0f\x32", b"\x0f\xa2",  # WRMSR, RDMSR, CPUID
    *(bytes([op]) for op in sorted(IO_OPCODES)),  # IN/OUT (their prefixes are walked back over)
    b"\x0f\x09", b"\x0f\x08", b"\x0f\x33",  # WBINVD, INVD, RDPMC
    b"\x0f\x01\xf9", b"\x0f\x01\xc8", b"\x0f\x01\xc9",  # RDTSCP, MONITOR, MWAIT
    b"\x0f\x21", b"\x0f\x23",  # MOV from / to a debug register (DR7: ModRM.reg = 7)
)
#: Where a site may start, whatever the code's mode (`_on_site` decodes with the mode): the
#: legacy prefixes, which move where an RDMSR, WRMSR, CPUID or IN/OUT starts and change nothing
#: in it but LOCK (#UD: Unicorn runs it, the hardware raises it) and, for IN/OUT, 66, 67, REP and
#: the segment (`decode_io`), and REX (64-bit code only: INC/DEC in compatibility mode).
_SITE_PREFIXES = LEGACY_PREFIXES | REX_PREFIXES
_LOCK = 0xF0


_WRMSR, _RDMSR, _CPUID = b"\x0f\x30", b"\x0f\x32", b"\x0f\xa2"
_WBINVD, _INVD, _RDPMC = b"\x0f\x09", b"\x0f\x08", b"\x0f\x33"
_TWO_BYTE_SITES = frozenset({_WRMSR, _RDMSR, _CPUID, _WBINVD, _INVD, _RDPMC})
_RDTSCP, _MONITOR, _MWAIT = b"\x0f\x01\xf9", b"\x0f\x01\xc8", b"\x0f\x01\xc9"
_MOV_DR = frozenset({b"\x0f\x21", b"\x0f\x23"})  # then ModRM: reg = the debug register
_MSR_IA32_TSC = 0x10
#: Sites that are privileged instructions: at CPL > 0 the CPU raises #GP before any intercept
#: (SDM vol. 3C 26.1.1; QEMU checks CPL before the SVM intercept too), which Unicorn does.
_CPL0_SITES = frozenset({_WBINVD, _INVD, _RDMSR, _WRMSR, *_MOV_DR})
_CR4_PCE = 1 << 8
_CR4_TSD = 1 << 2
#: What real hardware and KVM do with the sites the testbed does not model (see _SITE_PATTERNS):
#: opcode -> (name, the real behaviour, whether a TD's behaviour is Unicorn's own)
_UNMODELLED: dict[bytes, tuple[str, str, bool]] = {
    _RDPMC: ("RDPMC", "KVM emulates it (kvm_emulate_rdpmc), SEV-ES takes #VC SVM_EXIT_RDPMC, a TD #GP(0)", False),
    _RDTSCP: ("RDTSCP", "KVM intercepts it while the guest's CPUID lacks it (#UD), SEV-ES takes #VC "
              "SVM_EXIT_RDTSCP", True),
    _MONITOR: ("MONITOR", "KVM makes it a no-op (KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS), SEV-ES takes #VC", True),
    _MWAIT: ("MWAIT", "KVM makes it a no-op (KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS), SEV-ES takes #VC", True),
}


def _site_length(code: bytes, prefixes: int) -> int:
    """The length of the site whose opcode follows `prefixes` prefix bytes of `code` (0 when
    none does): RDMSR, WRMSR, CPUID, WBINVD, INVD, RDPMC and IN/OUT imm8 two bytes after them,
    RDTSCP, MONITOR, MWAIT and MOV to/from DR7 three, IN/OUT DX one."""
    opcode = code[prefixes : prefixes + 3]
    if opcode[:2] in _TWO_BYTE_SITES:
        return prefixes + 2
    if opcode in _UNMODELLED or (opcode[:2] in _MOV_DR and len(opcode) == 3 and (opcode[2] >> 3) & 7 == 7):
        return prefixes + 3
    if opcode[:1] in _IO_SITE_FIRST:
        return prefixes + (2 if opcode[0] in IMM8_PORT_OPCODES else 1)
    return 0


def _may_continue_into_site(code: bytes) -> bool:
    """Whether bytes that end a page may begin a site the next page completes: prefixes only,
    or prefixes and the first bytes of a site's opcode (0F, 0F 01, 0F 21, an IN/OUT imm8)."""
    n = prefix_count(code, _SITE_PREFIXES)
    rest = code[n:]
    return n == len(code) or rest in _OPCODE_HEADS


#: The proper beginnings of the sites' opcodes (with their ModRM or imm8): what a page's last
#: bytes after any prefixes may hold of a site the next page completes.
_OPCODE_HEADS = frozenset(
    head for op in (*_SITE_PATTERNS, *(p + b"\xf8" for p in _MOV_DR), *(bytes([o, 0]) for o in IMM8_PORT_OPCODES))
    for head in (op[:i] for i in range(1, len(op)))
)


def _prefix_run_start(page: bytes, end: int, most: int = MAX_PREFIXES) -> int:
    """Where the run of prefix bytes (REX counted, at most `most`) ending at `end` starts: each
    position from there to `end` may start the instruction whose opcode is at `end`."""
    first = end
    while first > 0 and end - first < most and page[first - 1] in _SITE_PREFIXES:
        first -= 1
    return first


def _may_start_site(code: bytes) -> bool:
    """Whether an instruction starting at `code` may be a site in some mode: prefixes (REX
    counted) before RDMSR, WRMSR, CPUID or an IN/OUT, 15 bytes at most in all."""
    return 0 < _site_length(code, prefix_count(code, _SITE_PREFIXES)) <= MAX_INSN_LENGTH


def _fetches_of(insn: bytes) -> frozenset[bytes]:
    """The exit's four fetched bytes that are `insn` (three bytes): its three, then any byte, or
    nothing more (the end of what could be fetched). A set lookup costs a fifth of a slice and
    compare on the most frequent exit, the native hypercall."""
    return frozenset([insn, *(insn + bytes([b]) for b in range(256))])


_VMMCALL_FETCHES = _fetches_of(VMMCALL_BYTES)
_VMCALL_FETCHES = _fetches_of(VMCALL_BYTES)


#: `_page_sites` answers by page contents (and the two VM-type flags it reads): a fresh machine
#: scans the same runtime pages its predecessors did, and a guest the same pages at each rescan.
#: Bounded (least recently used out): ~4 KiB of key per entry.
_PAGE_SITES_MEMO: OrderedDict[tuple[bytes, bool, bool], tuple[tuple[int, ...], tuple[int, ...]]] = OrderedDict()
_PAGE_SITES_MEMO_SIZE = 512


def _page_sites(page: bytes, sev_es: bool, cpuid_sites: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The offsets in `page` where a site may start (each match of an opcode pattern, each prefix
    before its opcode; `_scan_sites`), and the offsets among its last bytes that may begin a site
    the next page completes (`_may_continue_into_site`). MOV DR7 is a site on SEV-ES/SNP only
    (`sev_es`); a CPUID without LOCK only where `cpuid_sites` (SEV-ES/SNP, TDX)."""
    key = (page, sev_es, cpuid_sites)
    memo = _PAGE_SITES_MEMO
    found = memo.get(key)
    if found is not None:
        memo.move_to_end(key)
        return found
    starts: set[int] = set()
    for pattern in _SITE_PATTERNS:
        start = 0
        while (off := page.find(pattern, start)) >= 0:
            start = off + 1
            if pattern in _MOV_DR and (not sev_es or (off + 2 < PAGE_SIZE and (page[off + 2] >> 3) & 7 != 7)):
                continue  # DR7 is a site on SEV-ES/SNP only; another debug register is none
            locked_only = pattern == _CPUID and not cpuid_sites
            # A site may start at its opcode or at any prefix before it, 15 bytes in all.
            most = MAX_INSN_LENGTH - _site_length(pattern + b"\xf8", 0)
            starts.update(first for first in range(_prefix_run_start(page, off, most), off + 1)
                          if not locked_only or _LOCK in page[first:off])
    heads = tuple(off for off in range(PAGE_SIZE - MAX_PREFIXES, PAGE_SIZE) if _may_continue_into_site(page[off:]))
    found = (tuple(sorted(starts)), heads)
    memo[key] = found
    if len(memo) > _PAGE_SITES_MEMO_SIZE:
        memo.popitem(last=False)
    return found


class Intercepts(EventDelivery):
    """The instructions the hardware intercepts, and the MSRs it implements itself."""

    def _init_intercepts(self, sev_es: bool) -> None:
        self._sev_es = sev_es
        #: SEV-ES/SNP or a TD: an invalid-instruction exit is never the plain native hypercall
        #: (the GHCB's VMMCALL, TDCALL), and PVALIDATE / TDG.MEM.PAGE.ACCEPT have their own fast paths
        self._protected_exits = sev_es or self._tdx is not None
        self._intercept_ud = False
        self._cpuid_skip = False
        self._io_in_value = 0
        #: the last IN/OUT exit came from Unicorn's IN/OUT hook (an instruction the site scan
        #: did not hook, e.g. one completed by a page changed after the scan): it completed
        #: natively, nothing to skip
        self._native_io = False
        self._native_hypercall_fetches = _VMMCALL_FETCHES if self.vendor is Vendor.AMD else _VMCALL_FETCHES
        self._native_hypercall_exit = int(SvmExitCode.SVM_EXIT_VMMCALL if self.vendor is Vendor.AMD
                                          else VmxExitReason.EXIT_REASON_VMCALL)
        #: MSRs the hardware itself implements (SEV_STATUS, the GHCB MSR): index -> (read, write)
        self.hw_msrs: dict[int, tuple[Callable[[], int], Callable[[int], bool] | None]] = {}
        #: the GHCB MSR (MSR_AMD64_SEV_ES_GHCB): hardware state, the VMCB's GHCB GPA field
        self._ghcb = GhcbMsrRegister()
        if sev_es:
            self.hw_msrs[MSR_AMD64_SEV_ES_GHCB] = (self._ghcb.ghcb_msr_value, self._write_ghcb_msr)
        #: MSRs the hypervisor does not intercept (its MSR permission bitmap); all others exit
        self._msr_passthrough: frozenset[int] = frozenset()
        #: intercepted-instruction sites: guest-virtual address -> its UC_HOOK_CODE handle
        #: (one hook per address, all sharing one callback; bounded, see _scan_sites)
        self._site_hooks: dict[int, int] = {}
        #: one-shot UC_HOOK_BLOCK that ends the run for a site-hook reset or a W^X TLB flush
        self._stop_hook: int | None = None
        self._site_reset_pending = False
        self._tlb_flush_pending = False  # the stop hook ends the run for a TLB flush (W^X)
        #: the stop hook fired in this emulator run (it stopped before a block, which has not run)
        self._stop_block_hit = False
        self.site_hooks_peak = 0
        self.site_hook_resets = 0
        #: Diagnostic callback when a #UD goes straight to the guest: (RIP, the instruction's
        #: linear address CS.base + RIP, its plaintext bytes).
        self.on_guest_ud: Callable[[int, int, bytes], None] | None = None
        #: why the hardware stopped a run on something it does not model (TDG.MR.REPORT)
        self._unmodelled: str | None = None

    # -------------------------------------------------- what the hypervisor may set
    def skip_instruction(self) -> bool:
        """Advance past the intercepted instruction (kvm_skip_emulated_instruction). True when
        the emulator retires the instruction itself (CPUID, IN/OUT: their single-step trap
        included), False when RIP was moved past it (KVM then owes the trap flag's #DB)."""
        if self._ctx == _CTX_CPUID:
            self._cpuid_skip = True
            return True
        if self._ctx == _CTX_IO or self._native_io:
            self._native_io = False  # IN/OUT completed natively after the hook
            return True
        self.write_reg(Reg.RIP, self._cur_rip + self._cur_len)
        return False

    def set_io_in_result(self, value: int) -> None:
        """The value an intercepted IN instruction returns."""
        self._io_in_value = value

    def set_intercept_ud(self, enabled: bool) -> None:
        """Whether #UD exits to the hypervisor (the VMCB/VMCS exception intercept)."""
        self._intercept_ud = enabled

    def set_msr_passthrough(self, indices: frozenset[int]) -> None:
        """The MSRs the hypervisor lets the guest access without an exit (the VMCB's MSRPM /
        the VMCS MSR bitmaps); they run on the emulator's own MSR implementation."""
        self._msr_passthrough = frozenset(indices)

    @property
    def ghcb_msr(self) -> int:
        """The GHCB MSR as the guest last wrote it (the VMCB's GHCB GPA field)."""
        return self._ghcb.ghcb_msr_value()

    def ghcb_msr_value(self) -> int:
        """The GHCB MSR (read by the hypervisor at VMGEXIT through the VMCB)."""
        return self._ghcb.ghcb_msr_value()

    def set_ghcb_msr(self, value: int) -> None:
        """The hypervisor's write of the GHCB MSR (its replies of the MSR protocol)."""
        self._ghcb.set_ghcb_msr(value)

    def _write_ghcb_msr(self, value: int) -> bool:
        self._ghcb.set_ghcb_msr(value)
        return True

    # ------------------------------------------------------------- MSR instruction sites
    def _scan_sites(self, frame: int, va_page: int, private: bool) -> None:
        """Hook every instruction site the hardware must intercept before Unicorn translates it.

        Unicorn offers no RDMSR/WRMSR hook and silently drops MSRs QEMU does not model
        (UNICORN.md), so MSRs the hardware owns (SEV_STATUS, the GHCB MSR) need a per-address
        code hook at each instruction; on SEV-ES/SNP so do CPUID and IN/OUT, which must raise
        #VC *before* they execute (Unicorn's CPUID/IN/OUT hooks cannot redirect RIP). A hook on
        bytes that are not an instruction start never fires, so hooking every place a site may
        start is exact: each match of an opcode pattern, each prefix before its opcode (REX,
        66, a segment override...: `_SITE_PREFIXES`), and the bytes at the page's end that
        begin one the next page completes. Hooks are per guest-virtual address: a frame fetched
        through another page than the one it was scanned at is scanned again there
        (`_scan_vas`, which the C fill checks too).

        One hook per address, shared by every frame mapped there, all with one callback. Hooks
        are bounded: once more than MAX_SITE_HOOKS exist (a guest that keeps generating code,
        or whose rewritten pages left stale sites behind), the run stops before the block being
        translated executes and `_reset_site_hooks` drops them all; the code the guest runs
        next is rescanned as it is fetched. Unicorn visits every code hook at each translated
        instruction, and a 30 s hostile run used to reach 1.3 M hooks and 2.4 GiB.
        """
        self._scanned_frames.add(frame)
        self._scan_vas.set(frame, va_page)
        page = self._mem.cpu_read(frame << PAGE_SHIFT, PAGE_SIZE, private)
        hooks = self._site_hooks
        before = len(hooks)
        # Elsewhere than SEV-ES/SNP and TDX a CPUID is Unicorn's CPUID hook's, unless LOCK
        # makes it #UD: only its starts with a LOCK before the opcode are sites.
        found, heads = _page_sites(page, self._sev_es, self._sev_es or self._tdx is not None)
        starts = set(found)
        # A site may straddle the page's end (0F here, 32 on the next page, which may map another
        # frame or nothing yet; or prefixes here, the rest there): no pattern in the page sees it, and
        # Unicorn would run the RDMSR itself and read 0 for the GHCB MSR: `heads` are the starts
        # its last bytes can be (prefixes, then nothing or the first bytes of a site's opcode).
        if heads:
            # The next page's bytes decide which of those start a site (a hook that fires on
            # every execution of a REX- or 0F-led instruction across the boundary costs a Python
            # call each time). Unreadable now: all are hooked.
            ahead = self._peek_code(va_page + PAGE_SIZE, MAX_INSN_LENGTH)
            completed = {off for off in heads if ahead is None or _may_start_site(page[off:] + ahead)}
            starts.update(completed)
            if len(completed) < len(heads):
                self._watch_next_page(frame, va_page + PAGE_SIZE)
        for off in sorted(starts):
            va = va_page + off
            if va not in hooks:
                hooks[va] = self._add_code_hook(self._on_site, va, va)
        self.site_hooks_peak = max(self.site_hooks_peak, len(hooks))
        if len(hooks) > MAX_SITE_HOOKS and before > 0 and not self._site_reset_pending:
            # Not from here: uc_hook_del re-translates through get_page_addr_code, which would
            # re-enter this TLB fill. A one-shot block hook (shared with a pending W^X flush)
            # stops the run at the start of the next block; until then every hook stays, so no
            # site runs unhooked. run() then resets. `before > 0`: a page that alone exceeds the
            # bound still gets to run.
            self._site_reset_pending = True
            if self._stop_hook is None:
                self._stop_hook = self._add_block_hook(self._on_stop_block)

    def _watch_next_page(self, frame: int, next_va: int) -> None:
        """A head at the end of `frame`'s page is no site with what the next page holds now, but
        could be one with what it holds later: the frame stays unrecorded as scanned, so every
        fetch fill of it (the C fill sends those to Python) scans it again and peeks at the next
        page then; and the next page's frame is write-protected as code is (W^X), so a guest or
        host write to it flushes the TLB and this page is fetched, and scanned, again before it
        runs. A remap of the next page shows at the first fetch fill after a full TLB flush
        (README's deviation list: not after an INVLPG of that page alone)."""
        self._scanned_frames.discard(frame)
        try:
            nxt = self.translate(Gva(next_va), ACCESS_READ, supervisor=True)
        except (_DeliveryFault, _NestedFault, TestbedError):
            return  # not mapped now: its mapping, when it comes, is a fill after a TLB flush
        watched = nxt.gpa >> PAGE_SHIFT
        if watched not in self._exec_frames:
            self._exec_frames.add(watched)
            self._request_tlb_flush()  # a writable entry for it from before would not trap

    def _on_stop_block(self, _address: int) -> None:
        self._stop_block_hit = True
        self._emu_stop()

    def _request_tlb_flush(self) -> None:
        """End the run before the next block and flush the TLB there (`flush_pending_tlb`): a
        guest write took execute away from a code frame, and addresses other than the one
        written through may still hold an executable entry for it (an alias): after the flush
        each refetches it, and rescans it first. From a TLB fill, which cannot flush itself."""
        self._tlb_flush_pending = True
        if self._stop_hook is None:
            self._stop_hook = self._add_block_hook(self._on_stop_block)

    def flush_pending_tlb(self) -> None:
        """Between runs: the flush `_request_tlb_flush` asked for, and the stop hook gone."""
        self._tlb_flush_pending = False
        if self._stop_hook is not None:
            self._del_hook_quiesced(self._stop_hook)
            self._stop_hook = None
        # The frames whose code is unchanged stay scanned (not flush_code). Deleting the block
        # hook also drops the blocks translated while it existed (Unicorn), so a block an alias
        # translated from the new code before the stop is translated, and hooked, again.
        self.flush_tlb()

    @property
    def site_hook_count(self) -> int:
        """Code hooks currently installed at intercepted-instruction sites."""
        return len(self._site_hooks)

    def _reset_site_hooks(self) -> None:
        """Delete every site hook, forget which frames were scanned, and drop the TLB and the
        translated code, so whatever the guest runs next is fetched, rescanned and hooked
        again before it executes. Only between runs (see _scan_sites)."""
        self._site_reset_pending = False
        self._tlb_flush_pending = False  # flushed below too
        self.site_hook_resets += 1
        # uc_hook_del invalidates the blocks each hook instrumented, translating their
        # addresses through a TLB fill: let those fills map anything (the TLB and all
        # translated code are flushed right after) and scan nothing.
        self._quiesced = True
        try:
            for handle in self._site_hooks.values():
                self._del_hook(handle)
            if self._stop_hook is not None:
                self._del_hook(self._stop_hook)
                self._stop_hook = None
        finally:
            self._quiesced = False
        self._site_hooks.clear()
        self._scanned_frames.clear()
        self._scan_vas.clear()
        self._exec_frames.clear()
        self.flush_tlb()
        self.flush_code()

    def _peek_code(self, va: int, length: int) -> bytes | None:
        """The `length` bytes at guest-virtual `va` as a fetch would read them, without side
        effects, or None if they cannot be read now."""
        try:
            return self.fetch_bytes(Gva(va), length)
        except (_DeliveryFault, _NestedFault, TestbedError):
            return None

    def _on_site(self, linear: int) -> None:
        """The instruction at `linear` (CS.base + RIP), before it executes, if it is a site."""
        # Its bytes, fewer where the next page cannot be read (a site hooked at a page's end):
        # no site then, and the instruction's own fetch raises the fault.
        insn = self._fetch_at_rip(linear, 2 + MAX_PREFIXES)
        cs = self.read_reg(Reg.CS) & 0xFFFF
        long_mode = self.mode_of(cs)
        prefixes = prefix_count(insn, _SITE_PREFIXES if long_mode else LEGACY_PREFIXES)
        length = _site_length(insn, prefixes)
        if length > MAX_INSN_LENGTH or length > len(insn):
            # longer than 15 bytes: Unicorn raises its #GP, before any intercept; or its last
            # bytes are on a page that cannot be read: its fetch faults
            return
        opcode, opcode3 = insn[prefixes : prefixes + 2], insn[prefixes : prefixes + 3]
        rip = linear - self._code_base(cs)  # what RIP holds: CS-relative outside 64-bit code
        io = (decode_io(insn, prefixes, long_mode, self.read_reg(Reg.RDX))
              if length and insn[prefixes : prefixes + 1] in _IO_SITE_FIRST else None)
        unmodelled = _UNMODELLED.get(opcode) or _UNMODELLED.get(opcode3)
        if length and _LOCK in insn[:prefixes]:
            with self._at_site(rip):
                self._raise_ud(rip, linear, insn[:length])
        elif self.cpl() != 0 and (opcode in _CPL0_SITES or opcode3 in (_MONITOR, _MWAIT)
                                  or (opcode3 == _RDTSCP and self.read_reg(Reg.CR4) & _CR4_TSD)):
            pass  # privileged (RDTSCP with CR4.TSD): Unicorn raises the #GP (#UD for MONITOR/MWAIT) first
        elif opcode == _RDPMC and self.cpl() != 0 and not self.read_reg(Reg.CR4) & _CR4_PCE:
            with self._at_site(rip):
                self._deliver_now(Vector.GP, 0)  # RDPMC at CPL > 0 without CR4.PCE
        elif opcode in (_WBINVD, _INVD):
            self._cache_site(rip, opcode == _WBINVD, length)
        elif length and unmodelled is not None:
            name, real, td_native = unmodelled
            if not (td_native and self._tdx is not None):
                self._unmodelled_site(rip, f"{name} is not modelled ({real})")
        elif length and opcode in _MOV_DR:
            rex = insn[prefixes - 1] if long_mode and prefixes else 0
            if self._sev_es and not (rex in REX_PREFIXES and rex & 4):  # REX.R: DR15, #UD
                self._unmodelled_site(rip, "MOV to/from DR7 in an SEV-ES guest is not modelled (#VC "
                                           "SVM_EXIT_READ_DR7/WRITE_DR7: the guest caches DR7, KVM never arms it)")
        elif opcode in (_WRMSR, _RDMSR):
            self._msr_instruction(rip, opcode == _RDMSR, prefixes + 2)
        elif opcode == _CPUID and self._tdx is not None:
            self._td_cpuid(rip, prefixes + 2)
        elif opcode == _CPUID and self._sev_es:
            self._vc_at(rip, SvmExitCode.SVM_EXIT_CPUID)
        elif io is not None and not self._io_permitted(io):
            with self._at_site(rip):
                self._deliver_now(Vector.GP, 0)  # before any intercept (SDM vol. 3C 26.1.1)
        elif io is not None:
            if self._tdx is not None:
                self._td_io(rip, io)
            elif self._sev_es:
                self._vc_at(rip, SvmExitCode.SVM_EXIT_IOIO)
            else:
                self._io_site(rip, io)
        # else: not a site (a prefix or 0F of another instruction, or a CPUID Unicorn's hook
        # takes), or the page changed since the scan: the rescan hooks the new sites

    @contextmanager
    def _at_site(self, rip: int) -> Iterator[None]:
        """The hardware acting on the intercepted instruction at `rip`, before it executes (an
        exit, an exception): RIP writes take effect, as in the invalid-instruction hook."""
        self._cur_rip = rip
        self._ctx = _CTX_INVALID
        try:
            yield
        finally:
            self._ctx = _CTX_NONE

    def _io_permitted(self, io: IoInsn) -> bool:
        """The I/O permission check the CPU makes before an IN/OUT/INS/OUTS (SDM vol. 1 19.5):
        with CPL > IOPL every bit of the access in the TSS's I/O permission bit map must be
        clear, and the map's bytes must lie within the TSS limit; otherwise #GP(0), which takes
        priority over the VM exit. (A TSS that cannot be read counts as no permission.)"""
        if self.cpl() <= (self.read_reg(Reg.RFLAGS) >> 12) & 3:
            return True
        base, limit = self.descriptor_table("tr")
        if limit < 0x67:
            return False
        try:
            at = int.from_bytes(self.read_virtual(Gva(base + 0x66), 2), "little") + (io.port >> 3)
            if at + 1 > limit:
                return False
            bits = int.from_bytes(self.read_virtual(Gva(base + at), 2), "little")
        except (_DeliveryFault, _NestedFault, TestbedError):
            return False
        return not (bits >> (io.port & 7)) & ((1 << io.size) - 1)

    def _cache_site(self, address: int, wbinvd: bool, length: int) -> None:
        """WBINVD / INVD, before it executes: #VC on SEV-ES/SNP, #VE in a TD (td_generic_ve_exit),
        elsewhere SVM_EXIT_WBINVD/INVD / EXIT_REASON_WBINVD/INVD, which KVM skips (no caches)."""
        self._cur_len = length
        with self._at_site(address):
            if self._sev_es:
                self._vc_at(address, SvmExitCode.SVM_EXIT_WBINVD if wbinvd else SvmExitCode.SVM_EXIT_INVD)
            elif self._tdx is not None:
                self._tdx.instruction_ve(VmxExitReason.EXIT_REASON_WBINVD if wbinvd else VmxExitReason.EXIT_REASON_INVD,
                                         length)
            elif self.vendor is Vendor.AMD:
                self._exit(SvmExitCode.SVM_EXIT_WBINVD if wbinvd else SvmExitCode.SVM_EXIT_INVD, 0, 0)
            else:
                self._exit(VmxExitReason.EXIT_REASON_WBINVD if wbinvd else VmxExitReason.EXIT_REASON_INVD, 0, 0)
        if self.read_reg(Reg.RIP) == address:
            self.write_reg(Reg.RIP, address)  # not completed: a RIP write stops it (UNICORN.md)

    def _unmodelled_site(self, address: int, detail: str) -> None:
        """End the run before the instruction at `address` executes: Unicorn would run it (or
        raise another exception) where the real hardware and KVM would not."""
        self.stop_unmodelled(f"{detail} at rip 0x{address:x}")
        self.write_reg(Reg.RIP, address)

    def _io_site(self, address: int, io: IoInsn) -> None:
        """IN/OUT at its address, before it executes: SVM_EXIT_IOIO / EXIT_REASON_IO_INSTRUCTION
        with the port, size and direction decoded from the bytes. The hypervisor completes it
        (RAX for an IN, RIP past it: skip_instruction), now or on the next run; until then RIP
        stays at the instruction, which does not run natively."""
        self._native_io = False
        self._cur_len = io.length
        with self._at_site(address):
            self._io_vmexit(io)
        if self.read_reg(Reg.RIP) == address:
            # Not completed yet: a RIP write in a code hook stops the instruction (UNICORN.md).
            self.write_reg(Reg.RIP, address)

    def _td_cpuid(self, address: int, length: int) -> None:
        """CPUID (`length` bytes with its prefixes) in a TD, before it executes: the TDX module
        answers a leaf it virtualises (td_cpuid.c) and turns the rest into #VE."""
        tdx = self._tdx
        assert tdx is not None
        self._cur_rip = address
        self._ctx = _CTX_INVALID
        try:
            values = tdx.cpuid(self.read_reg(Reg.RAX) & 0xFFFFFFFF, self.read_reg(Reg.RCX) & 0xFFFFFFFF)
            if values is None:
                tdx.instruction_ve(VmxExitReason.EXIT_REASON_CPUID, length)
                return
            for reg, value in zip((Reg.RAX, Reg.RBX, Reg.RCX, Reg.RDX), values, strict=True):
                self.write_reg(reg, value & 0xFFFFFFFF)
            self.write_reg(Reg.RIP, address + length)
        finally:
            self._ctx = _CTX_NONE

    def _td_io(self, address: int, io: IoInsn) -> None:
        """IN/OUT in a TD, before it executes: the TDX module turns all port I/O into #VE."""
        tdx = self._tdx
        assert tdx is not None
        with self._at_site(address):
            # VE_INFO's exit qualification is the VMX I/O one (Linux's handle_io decodes it).
            tdx.instruction_ve(VmxExitReason.EXIT_REASON_IO_INSTRUCTION, io.length, _vmx_io_qualification(io))

    def complete_tdcall(self) -> None:
        """KVM's completion of TDG.VP.VMCALL: the TDCALL's status RAX = 0, RIP past it."""
        if self._tdx is None:
            raise HardwareError("complete_tdcall() on a vCPU that is not a TD")
        self._tdx.complete_tdcall()

    def stop_unmodelled(self, detail: str) -> None:
        """End the run: the guest used something the hardware model does not model."""
        self._unmodelled = detail
        self.request_stop()

    def _vc_at(self, address: int, exit_code: int) -> None:
        """#VC for an intercepted instruction of an SEV-ES guest, before it executes."""
        with self._at_site(address):
            self._tracer.emit("hw", "vc", error_code=exit_code, rip=address)
            self._deliver_now(Vector.VC, exit_code)

    def _msr_instruction(self, address: int, is_read: bool, length: int = 2) -> None:
        """RDMSR/WRMSR at `address`, `length` bytes with its prefixes, before it executes."""
        index = self.read_reg(Reg.RCX) & 0xFFFFFFFF
        handler = self.hw_msrs.get(index)
        if handler is None:
            if index in self._msr_passthrough:
                if index == _MSR_IA32_TSC:
                    # Unicorn reads IA32_TSC as 0 and drops writes, while RDTSC counts on: the
                    # same counter on real hardware (SDM vol. 3B 18.17), which KVM offsets.
                    self._unmodelled_site(address, f"{'RDMSR' if is_read else 'WRMSR'} of IA32_TSC is not modelled "
                                                   "(the emulator reads 0 and drops writes; RDTSC reads the TSC)")
                return  # not intercepted: Unicorn's own MSR emulation runs
            if self._tdx is not None:
                # The module virtualises the architectural MSRs the emulator implements (the
                # passthrough set); every other MSR is a #VE (td_msr_access.c).
                with self._at_site(address):
                    self._tdx.instruction_ve(VmxExitReason.EXIT_REASON_MSR_READ if is_read
                                             else VmxExitReason.EXIT_REASON_MSR_WRITE, length)
                return
            if self._sev_es:
                self._vc_at(address, SvmExitCode.SVM_EXIT_MSR)
                return
            self._msr_exit(address, is_read, length)
            return
        read, write = handler
        self._cur_rip = address
        self._cur_len = length
        if is_read:
            value = read()
            self.write_reg(Reg.RAX, value & 0xFFFFFFFF)
            self.write_reg(Reg.RDX, (value >> 32) & 0xFFFFFFFF)
        else:
            value = (self.read_reg(Reg.RAX) & 0xFFFFFFFF) | ((self.read_reg(Reg.RDX) & 0xFFFFFFFF) << 32)
            if write is None or not write(value):
                with self._at_site(address):
                    self._deliver_now(Vector.GP, 0)
                return
        self.write_reg(Reg.RIP, address + length)

    def _msr_exit(self, address: int, is_read: bool, length: int = 2) -> None:
        """An intercepted RDMSR/WRMSR: SVM_EXIT_MSR (EXITINFO1 0 read, 1 write) or
        EXIT_REASON_MSR_READ/WRITE. The hypervisor skips it, injects #GP, or leaves it pending
        (a user exit the VMM has not answered): then RIP is rewritten to the instruction so
        that it does not run natively, and the run stops there."""
        self._cur_rip = address
        self._cur_len = length
        self._ctx = _CTX_INVALID
        try:
            if self.vendor is Vendor.AMD:
                self._exit(SvmExitCode.SVM_EXIT_MSR, 0 if is_read else 1, 0)
            else:
                self._exit(VmxExitReason.EXIT_REASON_MSR_READ if is_read else VmxExitReason.EXIT_REASON_MSR_WRITE,
                           0, 0)
        finally:
            self._ctx = _CTX_NONE
        if self.read_reg(Reg.RIP) == address:
            # Neither completed nor faulted: a single RIP write in a code hook stops the
            # instruction (UNICORN.md); it re-runs, and exits again, only if not completed.
            self.write_reg(Reg.RIP, address)

    # ----------------------------------------------------------- invalid instructions
    def _on_invalid_exit(self, rip: int, rax: int, cs: int, rbx: int, rcx: int, rdx: int, rsi: int,
                         rflags: int) -> bool:
        """An instruction Unicorn cannot execute, with the exit's register snapshot.

        The native hypercall outside SEV-ES, by far the most frequent exit, is recognised
        first and goes to the hypervisor's fastpath with the snapshot's registers (or, when
        it has none or a tracer records, through the same `_exit` as every other exit, with
        the snapshot as the VMCB save area KVM reads: hypercall_regs / hypercall_args);
        PVALIDATE on SNP and TDCALL in a TD go to `_accept_exit` with the snapshot's RAX, RCX
        and RDX (an SNP or TD boot runs ~520 of them, which read nothing else but RFLAGS, and
        write their results back in one batch); everything else goes through `_on_invalid`.
        Exceptions are caught here as `_guard` would catch them."""
        try:
            # _code_base and _fetch_at_rip inlined for their common case (a cached CS.base, a
            # recorded translation of RIP's page read in C): two frames less per exit. Four
            # bytes, the longest instruction decoded here, fetched once for every decoder.
            base = self._cs_bases.get(cs)
            if base is None:
                base = self._code_base(cs)
            native = self._native_mmu
            insn = native.fetch(rip + base, 4) if native is not None else None
            if insn is None:
                insn = self._fetch_at_rip(rip + base, 4)
            if self._protected_exits:
                # PVALIDATE and TDCALL exist only here (SNP is SEV-ES; a TD's exits are all
                # protected): an SNP or TD boot runs ~520 of them, each straight to its handler.
                if self.vendor is Vendor.AMD:
                    if insn == PVALIDATE_BYTES and self._snp:
                        return self._accept_exit(rip, rax, rcx, rdx, cs, tdcall=False)
                elif self._tdx is not None and insn == TDCALL_BYTES:
                    return self._accept_exit(rip, rax, rcx, rdx, cs, tdcall=True)
                return self._on_invalid(rip, insn, cs)
            if insn in self._native_hypercall_fetches:
                self._cur_rip = rip
                self._cur_len = 3
                self._ctx = _CTX_INVALID
                sel = cs & 0xFFFF
                long_mode = self._cs64_cache.get(sel)
                if long_mode is None:
                    long_mode = self.mode_of(sel)
                fastpath = self._hypercall_fastpath
                try:
                    if fastpath is not None and not self._tracer.enabled and not rflags & RFLAGS_TF:
                        # The hypervisor's fastpath (exits.HypercallFastpath): the registers
                        # handed over, no vmexit frame and no read-back through the snapshot;
                        # its answer written back here, RAX and RIP in one batch.
                        ret = fastpath(rax, sel, long_mode, rbx, rcx, rdx, rsi)
                        if ret is not None:
                            self._write_rax_rip(ret, rip + 3)
                    else:
                        self._snapshot = (rax, sel, rbx, rcx, rdx, rsi, long_mode)
                        self._exit(self._native_hypercall_exit, 0, 0)
                finally:
                    self._ctx = _CTX_NONE
                    self._snapshot = None
                return not self._stop_requested
            return self._on_invalid(rip, insn, cs)
        except BaseException as exc:
            return self._hook_failed(exc)

    def _accept_exit(self, rip: int, rax: int, rcx: int, rdx: int, cs: int, *, tdcall: bool) -> bool:
        """TDCALL in a TD, PVALIDATE on SNP (the exit's RAX, RCX, RDX and CS)."""
        self._cur_rip = rip
        self._cur_len = 4
        self._ctx = _CTX_INVALID
        try:
            if tdcall:
                assert self._tdx is not None
                sel = cs & 0xFFFF
                long_mode = self._cs64_cache.get(sel)
                if long_mode is None:
                    long_mode = self.mode_of(sel)
                self._tdx.tdcall(rax, rcx, cs & 3, long_mode)
            elif cs & 3:
                self._deliver_now(Vector.GP, 0)  # PVALIDATE is CPL 0 only (APM vol. 3: #GP(0))
            else:
                self._pvalidate(rip, rax, rcx, rdx)
        finally:
            self._ctx = _CTX_NONE
        return self._resume()

    def complete_hypercall(self, rax: int) -> None:
        """RAX = the result and RIP past the instruction, in one batched write."""
        self._write_rax_rip(rax, self._cur_rip + self._cur_len)

    def _on_invalid(self, rip: int, insn: bytes, cs: int) -> bool:
        """The instruction at `rip` that Unicorn could not execute, other than the native
        hypercall, PVALIDATE on SNP and TDCALL in a TD (_on_invalid_exit takes those): `insn`
        its first bytes (up to 4, fetched at CS.base + RIP: RIP is CS-relative outside 64-bit
        mode); `cs` as the exit saved it."""
        self._cur_rip = rip
        self._ctx = _CTX_INVALID
        try:
            head = insn[:3]
            if self.vendor is Vendor.AMD:
                if head == VMMCALL_BYTES:
                    self._cur_len = 3
                    if self._sev_es:
                        self._deliver_now(Vector.VC, SvmExitCode.SVM_EXIT_VMMCALL)
                    else:
                        self._exit(SvmExitCode.SVM_EXIT_VMMCALL, 0, 0)
                    return self._resume()
                if insn == VMGEXIT_BYTES:
                    self._cur_len = 4
                    if not self._sev_es:
                        # Outside an SEV-ES guest the REP prefix is ignored: it is VMMCALL.
                        self._exit(SvmExitCode.SVM_EXIT_VMMCALL, 0, 0)
                        return self._resume()
                    self._exit(SvmExitCode.SVM_EXIT_VMGEXIT, 0, 0)
                    # The hardware resumes an SEV-ES guest after VMGEXIT; KVM cannot (and need
                    # not) move the encrypted RIP. Also when KVM_RUN returns to userspace here:
                    # the completion writes only the GHCB (or the GHCB MSR).
                    self.write_reg(Reg.RIP, rip + 4)
                    return self._resume()
                if insn == RMPADJUST_BYTES and self._snp:
                    # RMPADJUST (APM vol. 3): CPL 0 only (#GP(0)); at VMPL0 it sets a lower VMPL's
                    # permissions on a validated page - VMPLs are not modelled, so the run ends
                    # naming it (Linux's boot checks it runs at VMPL0 with one: enforce_vmpl0).
                    self._cur_len = 4
                    if cs & 3:
                        self._deliver_now(Vector.GP, 0)
                    else:
                        self.stop_unmodelled(f"RMPADJUST is not modelled (no VMPLs) at rip 0x{rip:x}")
                    return self._resume()
            elif head == VMCALL_BYTES:
                self._cur_len = 3
                if self._tdx is not None:
                    # In a TD, VMCALL is a #VE with exit reason 18 (td_generic_ve_exit): KVM
                    # never sees it.
                    self._tdx.instruction_ve(VmxExitReason.EXIT_REASON_VMCALL, 3)
                    return self._resume()
                self._exit(VmxExitReason.EXIT_REASON_VMCALL, 0, 0)
                return self._resume()
            # Everything else Unicorn cannot execute is #UD on this CPU (VMCALL on AMD,
            # VMMCALL on Intel, UD2, TDCALL outside a TD, ...).
            self._cur_len = 3 if head in (VMCALL_BYTES, VMMCALL_BYTES) else 0
            if insn == TDCALL_BYTES:
                self._cur_len = 4
            self._raise_ud(rip, self._code_base(cs) + rip, insn)
            return self._resume()
        finally:
            self._ctx = _CTX_NONE

    def _pvalidate(self, rip: int, rax: int, rcx: int, rdx: int) -> None:
        """PVALIDATE (F2 0F 01 FF): RAX = VA, ECX = size, EDX = validate (APM vol. 3)."""
        assert self.rmp is not None
        size = rcx & 0xFFFFFFFF
        validate = bool(rdx & 1)
        if not -(1 << 47) <= (rax if rax < (1 << 63) else rax - (1 << 64)) < (1 << 47):
            # A non-canonical address is never translated: #GP(0), the RMP untouched.
            self._deliver_now(Vector.GP, 0)
            return
        gpa = self._supervisor_read_gpa(rax & ~0xFFF)
        if gpa is None:
            return  # the walk faulted: delivered
        frame = gpa >> PAGE_SHIFT
        if rax & 0xFFF or (size == 1 and rax & 0x1FFFFF):
            result = PvalidateResult(PVALIDATE_FAIL_INPUT, False)
        elif self._stage2 is not None and not self._stage2.is_private(Gfn(frame)):
            # PVALIDATE is a private access: against a shared (unassigned) GFN the stage-2
            # walk faults, and KVM sees KVM_EXIT_MEMORY_FAULT (sev.c, sev_handle_rmp_fault).
            self._exit(SvmExitCode.SVM_EXIT_NPF, NPF_GUEST_ENC, gpa)
            return  # RIP unchanged: retried if the VMM converted the page
        else:
            # The nested walk of a private access faults the guest_memfd page in (KVM's private
            # fault: kvm_gmem_get_pfn), validated or not: the first private fault. One 4 KiB page
            # for a 2 MiB PVALIDATE too: guest_memfd allocates order-0 folios only (its huge
            # page support is not upstream: kvm_gmem_get_folio), and the 4 KiB RMP entry then
            # fails the 2 MiB size (FAIL_SIZEMISMATCH).
            self._mem.materialise(frame, 1, True)
            result = self.rmp.pvalidate(frame, size, validate)
        if self._tracer.enabled:
            self._tracer.emit("hw", "pvalidate", gpa=gpa, size=size, validate=validate, eax=result.eax,
                              cf=result.cf)
        flags = (self._read_rflags() & ~RFLAGS_CF) | (RFLAGS_CF if result.cf else 0)
        self._write_rax_rip_rflags(result.eax, rip + 4, flags)

    def _supervisor_read_gpa(self, va: int) -> int | None:
        """The GPA of page `va` for a supervisor read, as the CPU's walk finds it: the C walker
        (CR3/CR0 read in C) when it answers, else the Python one, which also raises the fault
        (delivered here: None)."""
        native = self._native_mmu
        walk_now = getattr(native, "walk_now", None) if native is not None else None
        if walk_now is not None:
            walked = walk_now(va, ACCESS_READ, False)
            if walked is not None and walked[0] == 0 and walked[1] < self._mem.size:
                return int(walked[1])
        try:
            gpa = self.translate(Gva(va), ACCESS_READ, supervisor=True).gpa
        except _NestedFault as nested:
            # A table of the walk lies outside guest memory: the nested walk faults (an NPF
            # exit, KVM's no-memslot path), not a #PF.
            self._npf_linear = va
            self._exit(self._npf_exit_code(), nested.npf_error, nested.gpa)
            return None
        except _DeliveryFault as fault:
            self._deliver_now(fault.vector, fault.error_code, cr2=fault.cr2)
            return None
        if gpa >= self._mem.size:
            # The final GPA lies outside guest memory: the nested walk faults as a data access
            # there does (mmu.py _tlb_fill), not a #PF.
            self._npf_linear = va
            self._exit(self._npf_exit_code(), NPF_GUEST_ENC | NPF_GUEST_FINAL, gpa)
            return None
        return gpa

    def _npf_exit_code(self) -> int:
        """The nested page fault's exit: NPF on AMD, EPT violation on Intel."""
        return int(SvmExitCode.SVM_EXIT_NPF if self.vendor is Vendor.AMD else VmxExitReason.EXIT_REASON_EPT_VIOLATION)

    def _raise_ud(self, rip: int, linear: int, insn: bytes) -> None:
        """#UD for the instruction at `rip` (`linear`: CS.base + RIP, where its bytes `insn` are)."""
        if self._intercept_ud:
            if self.vendor is Vendor.AMD:
                self._exit(SvmExitCode.SVM_EXIT_UD, 0, 0)
            else:
                info = VMX_INTR_INFO_VALID | VMX_INTR_TYPE_HARD_EXCEPTION | Vector.UD
                self._exit(VmxExitReason.EXIT_REASON_EXCEPTION_NMI, info, 0)
            return
        self._tracer.emit("hw", "exception", vector=int(Vector.UD), rip=rip, bytes=insn.hex(), intercepted=False)
        if self.on_guest_ud is not None:
            self.on_guest_ud(rip, linear, insn)
        self._deliver_now(Vector.UD, None)

    def _resume(self) -> bool:
        # True resumes at the RIP we left. After a stop request, False ends the run right here
        # (Unicorn stops with UC_ERR_INSN_INVALID, RIP unchanged), so an instruction whose
        # completion is still pending (a user exit the VMM has not answered) is not re-run.
        return not self._stop_requested

    # ------------------------------------------------------------------ CPUID, IN/OUT
    def _on_cpuid(self) -> int:
        self._cur_rip = self.read_reg(Reg.RIP)
        self._cur_len = 2
        self._ctx = _CTX_CPUID
        self._cpuid_skip = False
        try:
            if self.vendor is Vendor.AMD:
                self._exit(SvmExitCode.SVM_EXIT_CPUID, 0, 0)
            else:
                self._exit(VmxExitReason.EXIT_REASON_CPUID, 0, 0)
        finally:
            self._ctx = _CTX_NONE
        return 1 if self._cpuid_skip else 0

    def _io_exit(self, port: int, size: int, is_in: bool) -> None:
        self._cur_rip = self.read_reg(Reg.RIP)
        self._cur_len = 1  # not used: IN/OUT complete natively
        self._ctx = _CTX_IO
        self._native_io = True
        try:
            self._io_vmexit(IoInsn(port, size, 1, is_in))
        finally:
            self._ctx = _CTX_NONE

    def _io_vmexit(self, io: IoInsn) -> None:
        if self.vendor is Vendor.AMD:
            self._exit(SvmExitCode.SVM_EXIT_IOIO, _svm_ioio_info(io), 0)
        else:
            self._exit(VmxExitReason.EXIT_REASON_IO_INSTRUCTION, _vmx_io_qualification(io), 0)

    def _on_out(self, port: int, size: int, value: int) -> None:
        self._io_exit(port, size, False)

    def _on_in(self, port: int, size: int) -> int:
        self._io_in_value = 0xFFFFFFFF
        self._io_exit(port, size, True)
        return self._io_in_value & ((1 << (8 * size)) - 1)


def _svm_ioio_info(io: IoInsn) -> int:
    """SVM_EXIT_IOIO's EXITINFO1 (APM vol. 2, 15.10.2): port, size, direction, and for INS/OUTS
    the STR and REP bits, the address size and the segment (ES for INS)."""
    info1 = (io.port << SVM_IOIO_PORT_SHIFT) | ((io.size & 7) << SVM_IOIO_SIZE_SHIFT)
    if io.is_in:
        info1 |= SVM_IOIO_TYPE_IN
    if io.string:
        info1 |= SVM_IOIO_STR | ((io.addr_size // 2) << SVM_IOIO_ADDR_SHIFT)
        info1 |= (0 if io.is_in else io.segment) << SVM_IOIO_SEG_SHIFT
        if io.rep:
            info1 |= SVM_IOIO_REP
    return info1


def _vmx_io_qualification(io: IoInsn) -> int:
    """EXIT_REASON_IO_INSTRUCTION's exit qualification (SDM vol. 3C, table 28-5): size - 1, IN,
    string, REP and the port (bit 6, an immediate operand, is left 0)."""
    qual = (io.port << VMX_IO_PORT_SHIFT) | (io.size - 1)
    if io.is_in:
        qual |= VMX_IO_IN
    if io.string:
        qual |= VMX_IO_STRING | (VMX_IO_REP if io.rep else 0)
    return qual
