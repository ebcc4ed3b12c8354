"""Event delivery: exceptions into the guest through its IDT, #DF and the triple fault, and
VM exits out to the hypervisor.

Unicorn never delivers an exception itself (UNICORN.md, "Exceptions"): every exception it
raises, every fault a TLB fill reports and every event the hypervisor injects is delivered
here, as the SDM describes for 64-bit mode (vol. 3 6.14), with the #DF / triple-fault rules
of table 6-5 (simplified). A delivery that touches a GPA outside guest memory is an NPF exit
carrying the event in EXITINTINFO. Every VM exit, whatever raised it, leaves through `_exit`:
the one entry into the hypervisor (`Hypervisor.vmexit`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from testbed.errors import TestbedError
from testbed.hw.exits import (
    EXITINTINFO_ERROR_VALID,
    EXITINTINFO_TYPE_EXCEPTION,
    EXITINTINFO_TYPE_SOFT_INT,
    EXITINTINFO_VALID,
    Hypervisor,
    SvmExitCode,
    Vendor,
    VmxExitReason,
)
from testbed.hw.mmu import Mmu, _DeliveryFault, _NestedFault, _PendingFault
from testbed.hw.unicorn_binding import HardwareError
from testbed.trace import Tracer
from testbed.x86 import (
    CONTRIBUTORY_VECTORS,
    ERROR_CODE_VECTORS,
    RFLAGS_IF,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
    U64,
    Reg,
    Vector,
    vector_name,
)
from testbed.x86.addr import Gva

_U64S = struct.Struct("<Q")
#: SDM vol. 3 table 6-4's "page faults" class: #PF and #VE
_PAGE_FAULT_CLASS = frozenset({Vector.PF, Vector.VE})

# Contexts in which the hypervisor runs (they decide how RIP and injections take effect).
_CTX_NONE = 0
_CTX_INVALID = 1  # UC_HOOK_INSN_INVALID: RIP writes take effect, returning True resumes
_CTX_CPUID = 2  # UC_HOOK_INSN(CPUID): RIP writes ignored; returning 1 skips the instruction
_CTX_IO = 3  # UC_HOOK_INSN(IN/OUT): RIP writes ignored; the instruction completes natively


class EventDelivery(Mmu):
    """Exceptions into the guest and VM exits to the hypervisor."""

    vendor: Vendor

    def _init_events(self, vendor: Vendor, tracer: Tracer) -> None:
        self.vendor = vendor
        self._tracer = tracer
        self.hypervisor: Hypervisor | None = None
        #: the attached hypervisor's native_hypercall (exits.HypercallFastpath), or None
        self._hypercall_fastpath: Callable[[int, int, bool, int, int, int, int], int | None] | None = None
        self._ctx = _CTX_NONE
        self._cur_rip = 0
        self._cur_len = 0
        self._stop_requested = False
        #: EXITINTINFO of the exit being taken: the event being delivered, 0 if none
        self._exit_int_info = 0
        self._pending_events: list[_PendingFault] = []
        self._shutdown = False
        self.exceptions_delivered = 0

    def attach_hypervisor(self, hypervisor: Hypervisor) -> None:
        """The hypervisor that takes this vCPU's exits (KVM sets it up with the VMCB/VMCS), and
        its native-hypercall fastpath if it has one (exits.HypercallFastpath)."""
        self.hypervisor = hypervisor
        self._hypercall_fastpath = getattr(hypervisor, "native_hypercall", None)

    def _exit(self, code: int, info1: int, info2: int) -> None:
        """A VM exit: the one way out of the guest into the hypervisor (traced as `hw vmexit`)."""
        hypervisor = self.hypervisor
        if hypervisor is None:
            raise HardwareError("VM exit with no hypervisor attached")
        if self._tracer.enabled:
            self._tracer.emit("hw", "vmexit", code=code, info1=info1, info2=info2, rip=self._cur_rip)
        hypervisor.vmexit(code, info1, info2)

    def request_stop(self) -> None:
        """End the current run as soon as the current instruction completes."""
        self._stop_requested = True
        self._emu_stop()

    def exit_int_info(self) -> int:
        """EXITINTINFO (SVM) / IDT-vectoring information (VMX) of the current exit: the event
        the CPU was delivering when it exited (EXITINTINFO_*), 0 when it was not delivering."""
        return self._exit_int_info

    def _on_exception(self, vector: int, error_code: int) -> None:
        rip = self.read_reg(Reg.RIP)
        software = vector >= 32 or vector in (Vector.BP, Vector.OF)
        error = error_code if vector in ERROR_CODE_VECTORS and not software else None
        self._tracer.emit("hw", "exception", vector=vector, rip=rip, software=software)
        self._deliver_now(vector, error, software=software)

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Inject an exception (the VMCB EVENTINJ / VMCS entry-interruption field)."""
        self._tracer.emit("hw", "inject", vector=vector, error_code=error_code)
        if self._ctx == _CTX_INVALID or (self._ctx == _CTX_NONE and not self._running):
            self._deliver_now(vector, error_code)
        else:
            self._pending_events.append(_PendingFault(vector, error_code))
            self.request_stop()

    def _deliver_now(self, vector: int, error_code: int | None, software: bool = False, cr2: int | None = None) -> None:
        if cr2 is not None:
            self.write_reg(Reg.CR2, cr2)
        try:
            self._deliver(vector, error_code, software)
        except _NestedFault as nested:
            self._vectoring_npf(vector, error_code, software, nested)
        except _DeliveryFault as fault:
            if fault.cr2 is not None:
                self.write_reg(Reg.CR2, fault.cr2)
            # SDM vol. 3 table 6-5 (AMD APM vol. 2 8.2.9): a fault while delivering #DF is a
            # triple fault; #DF only for contributory + contributory, #PF + contributory and
            # #PF + #PF (#VE counts as a page fault); every other pair - a benign first event
            # (INT n, #BP, #UD, ...) with anything, contributory + #PF - is handled serially: the
            # second is delivered, as a fault of the instruction that raised the first.
            if vector == Vector.DF:
                self._triple_fault()
                return
            first_pf = vector in _PAGE_FAULT_CLASS
            second_contributory = fault.vector in CONTRIBUTORY_VECTORS
            double = ((vector in CONTRIBUTORY_VECTORS and second_contributory)
                      or (first_pf and (second_contributory or fault.vector in _PAGE_FAULT_CLASS)))
            if not double:
                if software:
                    # A trap's RIP is past the INT: the fault's frame names the INT itself.
                    self.write_reg(Reg.RIP, self.read_reg(Reg.RIP) - self._software_int_length(vector))
                self._deliver_now(fault.vector, fault.error_code)
                return
            try:
                self._deliver(Vector.DF, 0, False)
            except _NestedFault as nested:
                self._vectoring_npf(Vector.DF, 0, False, nested)
            except _DeliveryFault:
                self._triple_fault()

    def _gate_code_segment(self, selector: int, cpl: int, ext: int) -> int:
        """The checks the INT n pseudocode (IA-32e mode, SDM vol. 2) makes of a gate's code
        segment, and the handler's CPL: the descriptor's DPL (a conforming segment keeps the
        CPL). A null selector is #GP(EXT); beyond the table's limit, not a code segment, DPL >
        CPL or not a 64-bit code segment (L = 1, D = 0) #GP(selector + EXT); not present
        #NP(selector + EXT)."""
        if not selector & 0xFFFC:
            raise _DeliveryFault(Vector.GP, ext)
        error = (selector & 0xFFFC) | ext
        base, limit = self.descriptor_table("ldt" if selector & 4 else "gdt")
        index = selector & 0xFFF8
        if index + 7 > limit:
            raise _DeliveryFault(Vector.GP, error)
        desc = _U64S.unpack(self.read_virtual(Gva(base + index), 8))[0]
        access = (desc >> 40) & 0xFF
        dpl = (access >> 5) & 3
        if access & 0x18 != 0x18 or dpl > cpl:  # S = 1 and executable: a code segment
            raise _DeliveryFault(Vector.GP, error)
        if not access & 0x80:
            raise _DeliveryFault(Vector.NP, error)
        if not (desc >> 53) & 1 or (desc >> 54) & 1:
            raise _DeliveryFault(Vector.GP, error)
        return cpl if access & 0x04 else dpl  # conforming: no privilege change

    def _push_frame(self, base: int, data: bytes) -> None:
        """Write the exception frame at `base` as the CPU pushes it, from the top down: a page
        fault names the first push that faults (CR2 = its address), in the higher of the
        frame's two pages first."""
        end = base + len(data)
        split = (end - 1) & ~0xFFF  # the start of the page holding the frame's last byte
        parts = [(max(base, split), end)] + ([(base, split)] if base < split else [])
        for lo, hi in parts:
            try:
                self.write_virtual(Gva(lo), data[lo - base : hi - base])
            except _DeliveryFault as fault:
                if fault.vector == Vector.PF:
                    fault.cr2 = hi - 8
                raise

    def _software_int_length(self, vector: int) -> int:
        """The length of the INT n (CD ib: 2), INT3 (CC: 1, or CD 03: 2) or INTO (CE: 1) that
        raised software `vector`, RIP being past it."""
        if vector == Vector.OF:
            return 1
        if vector == Vector.BP:
            try:
                before = self.fetch_bytes(Gva(self.linear_rip(self.read_reg(Reg.RIP)) - 2), 2)
            except (_DeliveryFault, TestbedError):
                return 1
            return 2 if before == b"\xcd\x03" else 1
        return 2

    def _vectoring_npf(self, vector: int, error_code: int | None, software: bool, nested: _NestedFault) -> None:
        """Delivering `vector` touched a GPA outside guest memory (the IDT, the TSS or the stack,
        or a page table on the way to one): the NPF exit carries the event in EXITINTINFO."""
        info = EXITINTINFO_VALID | vector | (EXITINTINFO_TYPE_SOFT_INT if software else EXITINTINFO_TYPE_EXCEPTION)
        if error_code is not None:
            info |= EXITINTINFO_ERROR_VALID | ((error_code & 0xFFFFFFFF) << 32)
        self._tracer.emit("hw", "npf_vectoring", vector=vector, gpa=nested.gpa, error=nested.npf_error)
        self._exit_int_info = info
        self._npf_linear = nested.cr2 if nested.cr2 is not None else 0
        self._cur_rip = self.read_reg(Reg.RIP)
        code = SvmExitCode.SVM_EXIT_NPF if self.vendor is Vendor.AMD else VmxExitReason.EXIT_REASON_EPT_VIOLATION
        try:
            self._exit(code, nested.npf_error, nested.gpa)
        finally:
            self._exit_int_info = 0

    def _triple_fault(self) -> None:
        self._tracer.emit("hw", "triple_fault", rip=self.read_reg(Reg.RIP))
        self._shutdown = True
        self._stop_requested = True
        self._emu_stop()

    def _deliver(self, vector: int, error_code: int | None, software: bool) -> None:
        """Deliver through the 64-bit IDT (SDM vol. 3 6.14): push the frame, load the gate."""
        idt_base, idt_limit = self.descriptor_table("idt")
        ext = 0 if software else 1
        if vector * 16 + 15 > idt_limit:
            raise _DeliveryFault(Vector.GP, vector * 8 + 2 + ext)
        gate = self.read_virtual(Gva(idt_base + vector * 16), 16)
        lo, hi = struct.unpack("<QQ", gate)
        attrs = (lo >> 40) & 0xFF
        # The INT n pseudocode's order in IA-32e mode (SDM vol. 2): the gate's type (#GP), a
        # software interrupt's DPL < CPL (#GP, EXT = 0), then present (#NP).
        if (attrs & 0xF) not in (0xE, 0xF):
            raise _DeliveryFault(Vector.GP, vector * 8 + 2 + ext)
        cpl = self.cpl()
        if software and ((attrs >> 5) & 3) < cpl:
            raise _DeliveryFault(Vector.GP, vector * 8 + 2)
        if not attrs & 0x80:
            raise _DeliveryFault(Vector.NP, vector * 8 + 2 + ext)
        selector = (lo >> 16) & 0xFFFF
        target = (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & 0xFFFFFFFF) << 32)
        ist = (lo >> 32) & 7
        new_cpl = self._gate_code_segment(selector, cpl, ext)
        rsp = self.read_reg(Reg.RSP)
        ss = self.read_reg(Reg.SS)
        rflags = self.read_reg(Reg.RFLAGS)
        cs = self.read_reg(Reg.CS)
        rip = self.read_reg(Reg.RIP)
        if ist or new_cpl < cpl:
            tss_base, _ = self.descriptor_table("tr")
            off = 0x24 + (ist - 1) * 8 if ist else 4 + new_cpl * 8
            new_rsp = _U64S.unpack(self.read_virtual(Gva(tss_base + off), 8))[0]
        else:
            new_rsp = rsp
        new_rsp &= ~0xF
        frame = [ss, rsp, rflags, cs, rip]
        if error_code is not None:
            frame.append(error_code)
        data = b"".join(_U64S.pack(v & U64) for v in reversed(frame))
        new_rsp -= len(data)
        self._push_frame(new_rsp, data)
        if new_cpl < cpl:
            self._set_cpl(new_cpl)
            self.write_reg(Reg.SS, new_cpl)  # NULL selector with RPL = new CPL
        from_compat = not self.mode_of(cs & 0xFFFF)
        self.write_reg(Reg.CS, (selector & 0xFFFC) | new_cpl)  # CS.RPL = the new CPL
        if from_compat:
            # Unicorn's CS write changes only the selector: QEMU's HF_CS64 and CS.base stay
            # those of the 32-bit code, so the 64-bit handler would run as 32-bit code at
            # base + RIP (canary in tests/test_hostile_guests.py). Load both as the gate does.
            self._enter_64bit_code()
        self.write_reg(Reg.RSP, new_rsp)
        new_flags = rflags & ~(RFLAGS_TF | RFLAGS_RF | RFLAGS_VM | (1 << 14))
        if (attrs & 0xF) == 0xE:
            new_flags &= ~RFLAGS_IF
        self.write_reg(Reg.RFLAGS, new_flags)
        self.write_reg(Reg.RIP, target)
        self.exceptions_delivered += 1
        self._tracer.emit(
            "hw", "deliver", vector=vector, error_code=error_code, rip=rip, handler=target, name=vector_name(vector)
        )
