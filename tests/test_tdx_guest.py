"""End to end: the guest runtime under TDX (guests/lib/tdx.s) on the modelled TDX module and KVM.

The same guest sources run unchanged under every VM type: boot detects the TD (CPUID 0x21),
reads the GPA width (TDG.VP.INFO), accepts its memory, and routes CPUID/IO/MSR/HLT through its
#VE handler, KVM_HYPERCALL through tdx_kvm_hypercall and set_memory_* through MapGPA
(Linux's arch/x86/coco/tdx/tdx.c and tdx-shared.c). The answers are those of the other VM types.
"""

from __future__ import annotations

import errno
import io
import json
from typing import Any

import pytest
from test_conversions import MEM as CONV_MEM  # the reference model of guests/conversions.s
from test_conversions import expected_pages, to_ranges

import testbed
from testbed.hw.exits import Vendor
from testbed.kvm import tdx as kvm_tdx
from testbed.kvm.uapi import KVM_HC_VAPIC_POLL_IRQ
from testbed.layout import UCALL_GPA, Layout
from testbed.machine import GUESTS_DIR, VmOptions, run_guest
from testbed.vmm.vmm import RunReport
from testbed.x86 import Reg

MEM = 8 << 20  # a TD accepts its boot memory: a small one boots faster
TIMEOUT = 20.0
GUEST = GUESTS_DIR / "tdx_runtime.s"
FREE = Layout(MEM).free_gpa
ENOSYS_RET = 0xFFFF_FFFF_FFFF_FC18  # -KVM_ENOSYS
EIO_RET = (-errno.EIO) & (2**64 - 1)
TDVMCALL_STATUS_ALIGN_ERROR = 0x8000000000000002
UNKNOWN_NR = 0x999


def td(guest: str | Any, vm_type: str = "tdx", **kw: Any) -> RunReport:
    """Run `guest` (a guests/ file name or path) on Intel under `vm_type`."""
    kw.setdefault("memory", MEM)
    path = guest if not isinstance(guest, str) else GUESTS_DIR / guest
    return run_guest(path, VmOptions(vm_type=vm_type, vendor=Vendor.INTEL, timeout=TIMEOUT, **kw))


def sync_args(report: RunReport) -> list[list[int]]:
    """Every GUEST_SYNC's values, in order."""
    return [list(u["args"]) for u in report.ucalls if u["cmd"] == "sync"]


def done(report: RunReport) -> RunReport:
    """`report`, after checking the guest finished."""
    assert report.outcome == "done", f"{report.outcome}: {report.detail}"
    return report


@pytest.mark.parametrize("gpaw", [48, 52])
def test_boot_detects_the_td_and_its_shared_bit(gpaw: int) -> None:
    """The runtime finds "IntelTDX    " at CPUID 0x21, takes the shared bit from TDG.VP.INFO's
    GPA width and maps the ucall page with it (tdx.c tdx_early_init, tdx_parse_tdinfo)."""
    mask, width, ucall_shared, ebx = sync_args(done(td(GUEST, gpaw=gpaw, defines={"OP": 0})))[0]
    assert (mask, width, ucall_shared, ebx) == (1 << (gpaw - 1), gpaw, 1, int.from_bytes(b"Inte", "little"))


def test_other_vm_types_see_no_td() -> None:
    """Under a default VM the same guest finds no TD: no shared bit, no signature."""
    mask, width, ucall_shared, _ = sync_args(done(td(GUEST, vm_type="default", defines={"OP": 0})))[0]
    assert (mask, width, ucall_shared) == (0, 0, 0)


def test_runtime_shares_only_its_ucall_page() -> None:
    """After boot the only shared page is the ucall page, converted with MapGPA."""
    report = done(td("hypercall_abi_gprs.s", defines={"HC_NR": 1}))
    assert report.shared_ranges == [[UCALL_GPA >> 12, 1]]


@pytest.mark.parametrize("nr", [1, UNKNOWN_NR, 5, 11], ids=["vapic_poll_irq", "unknown", "kick_cpu", "sched_yield"])
def test_hypercall_clobbers_only_rax_in_a_td(nr: int) -> None:
    """KVM_HYPERCALL (tdx_kvm_hypercall: R10 = nr, R11-R14 = args, result R10 -> RAX) changes RAX
    only and answers as on a default VM (kvm/vmx/tdx.c tdx_emulate_vmcall)."""
    answers = [sync_args(done(td("hypercall_abi_gprs.s", vm_type=t, defines={"HC_NR": nr})))
               for t in ("tdx", "default")]
    assert answers[0] == answers[1]
    assert answers[0][-1][0] == (ENOSYS_RET if nr == UNKNOWN_NR else 0)


def test_map_gpa_range_hypercall_exits_in_a_td() -> None:
    """KVM_HC_MAP_GPA_RANGE through tdx_kvm_hypercall is the same KVM_EXIT_HYPERCALL as on a
    default VM, its ret landing in RAX (x86.c __kvm_emulate_hypercall)."""
    defines = {"HC_NR": 12, "HC_A0": FREE, "HC_A1": 1, "HC_A2": 0}
    reports = [done(td("hypercall_abi_call.s", vm_type=t, defines=defines)) for t in ("tdx", "default")]
    assert sync_args(reports[0]) == sync_args(reports[1]) == [[0]]
    exits = [[e for e in r.user_exits if e["reason"] == "hypercall"][-1] for r in reports]
    assert exits[0]["args"][:3] == exits[1]["args"][:3] == [FREE, 1, 0]


@pytest.mark.parametrize("nr", [1, UNKNOWN_NR], ids=["vapic_poll_irq", "unknown"])
def test_cpl3_hypercall_faults_in_a_td(nr: int) -> None:
    """At CPL 3 the TDCALL behind KVM_HYPERCALL raises #GP(0) at the TDCALL before the TDX module
    or KVM see it (the CPU's CPL check; kvm-x86 9d7dfb95da2c "KVM: VMX: Inject #UD if guest tries
    to execute SEAMCALL or TDCALL": "TDCALL and SEAMCALL #GP at CPL > 0"), where on a default VM
    KVM answers the VMCALL -KVM_EPERM (x86.c ____kvm_emulate_hypercall: CPL != 0)."""
    report = td("hypercall_abi_call.s", defines={"HC_NR": nr, "USER": 1})
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["error_code"]) == (13, 0)
    assert report.exception["symbol"] == "__tdx_hypercall"  # at the TDCALL, not after it
    # nothing reached KVM: the only hypercall exit is the boot's MapGPA of the ucall page
    assert [(e["nr"], e["args"][0]) for e in report.user_exits if e["reason"] == "hypercall"] == [(12, UCALL_GPA)]
    default = done(td("hypercall_abi_call.s", vm_type="default", defines={"HC_NR": nr, "USER": 1}))
    assert sync_args(default) == [[(-1) & (2**64 - 1)]]  # -KVM_EPERM


@pytest.mark.parametrize("guest", ["exceptions_handled.s", "exceptions_user.s", "exceptions_unhandled.s",
                                   "hypercall_insn.s"])
def test_guests_give_the_same_answers_in_a_td(guest: str) -> None:
    """Exceptions at CPL 0 and 3, the ucall path through the #VE'd OUT (tdx.c handle_io) and the
    native hypercall: the same syncs and outcome as on a default VM."""
    tdx, default = td(guest), td(guest, vm_type="default")
    assert (tdx.outcome, sync_args(tdx), tdx.exception) == (default.outcome, sync_args(default), default.exception)


def test_vmcall_in_a_td_is_an_unhandled_ve() -> None:
    """VMCALL in a TD is a #VE with exit reason 18 that KVM never sees (the TDX module's
    td_generic_ve_exit); the runtime reports it unhandled, as Linux's virt_exception_kernel."""
    report = td(GUEST, defines={"OP": 1})
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None
    assert (report.exception["vector"], report.exception["exit_reason"]) == (20, 18)
    assert sync_args(done(td(GUEST, vm_type="default", defines={"OP": 1}))) == [[ENOSYS_RET]]


def test_raw_tdvmcall_get_td_vm_call_info() -> None:
    """The TDVMCALL macro speaks GHCI: GetTdVmCallInfo with R12 = 0 answers SUCCESS and R11 = 0
    (kvm/vmx/tdx.c tdx_get_td_vm_call_info)."""
    assert sync_args(done(td(GUEST, defines={"OP": 2}))) == [[0, 0, 0]]


def test_raw_tdvmcall_misaligned_map_gpa() -> None:
    """A misaligned MapGPA answers ALIGN_ERROR with R11 = the GPA (kvm/vmx/tdx.c tdx_map_gpa)."""
    assert sync_args(done(td(GUEST, defines={"OP": 3}))) == [[0, TDVMCALL_STATUS_ALIGN_ERROR, FREE + 0x800]]


def test_tdx_panic_reports_a_fatal_error() -> None:
    """tdx_panic ends the TD with ReportFatalError; the message comes back to the host
    (coco/tdx/tdx.c tdx_panic; kvm/vmx/tdx.c tdx_report_fatal_error)."""
    report = td(GUEST, defines={"OP": 5})
    assert report.outcome == "terminated"
    assert "testbed: fatal" in report.detail


def test_memory_beyond_boot_is_accepted_lazily() -> None:
    """Memory above GUEST_ACCEPTED_END starts pending; guest_memset accepts it first
    (accept_memory -> tdx_accept_memory), so the write and read back work."""
    assert sync_args(done(td(GUEST, memory=32 << 20, defines={"OP": 6}))) == [[0x5A5A5A5A5A5A5A5A]]


def test_conversion_round_trip_in_a_td() -> None:
    """set_memory_shared then set_memory_private both succeed (MapGPA, then accept after
    shared->private: tdx_enc_status_changed) and leave only the ucall page shared."""
    report = done(td(GUEST, defines={"OP": 4, "PAGES": 3}))
    assert sync_args(report) == [[0, 0]]
    assert report.shared_ranges == [[UCALL_GPA >> 12, 1]]


def test_map_gpa_retry_resumes_from_r11() -> None:
    """With an event pending after each chunk KVM answers RETRY, R11 = the next chunk; the guest
    resumes there and the 4 MiB conversion succeeds (tdx.c tdx_map_gpa; kvm tdx_complete_vmcall_map_gpa)."""
    report = done(td(GUEST, memory=32 << 20, pending_event_every=1, defines={"OP": 4, "PAGES": 1024}))
    assert sync_args(report) == [[0, 0]]
    hypercalls = [e for e in report.user_exits if e["reason"] == "hypercall"]
    assert len(hypercalls) == 1 + 2 + 2  # the ucall page, then two 2 MiB chunks each way


def _retries(how: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """RETRYs KVM answered to the guest's MapGPAs in OP 4 of 1,024 pages with an event made
    pending at every third MapGPA exit, the VMM driven `how`."""
    statuses: list[int] = []
    real = kvm_tdx.TdxVcpu._propagate

    def propagate(self: kvm_tdx.TdxVcpu, status: int) -> None:
        statuses.append(status)
        real(self, status)

    monkeypatch.setattr(kvm_tdx.TdxVcpu, "_propagate", propagate)
    options: dict[str, Any] = {"vm_type": "tdx", "vendor": "intel", "memory": "32M", "timeout": TIMEOUT,
                               "pending_event_every": 3}
    if how == "run_guest":
        done(run_guest(GUEST, VmOptions(**{**options, "vendor": Vendor.INTEL, "memory": 32 << 20,
                                           "defines": {"OP": 4, "PAGES": 1024}})))
    else:
        with testbed.Vm(**options) as vm:
            vcpu = vm.load(GUEST, defines={"OP": 4, "PAGES": 1024})
            ucall = None
            while ucall is None or ucall.cmd != "done":
                ucall = vcpu.run_to_ucall() if how == "run_to_ucall" else vm.handle(vcpu.run())
    return statuses.count(kvm_tdx.TDVMCALL_STATUS_RETRY)


def test_an_event_is_consumed_when_the_guest_is_entered_however_the_vmm_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The VMM answering inside KVM_RUN (run_to_ucall, run_guest) re-enters the guest as the next
    KVM_RUN would: an event made pending at a MapGPA's last chunk is consumed then, not left to
    turn a later MapGPA's chunk into a RETRY; all three ways see the RETRYs of a vcpu.run() /
    vm.handle() loop."""
    loop = _retries("loop", monkeypatch)
    assert _retries("run_to_ucall", monkeypatch) == loop
    assert _retries("run_guest", monkeypatch) == loop


def test_run_to_ucall_takes_over_a_mapgpa_answered_by_hand() -> None:
    """A test takes the first 2 MiB chunk of a 4 MiB MapGPA from vcpu.run() and has the VMM answer
    it (vm.handle); run_to_ucall's KVM_RUN then runs that completion, which exits for the next
    chunk before the guest runs (KVM_RUN returns it at once, outside the fast path), and the
    default VMM answers it and the rest: both conversions succeed, as without the hand-over."""
    with testbed.Vm(vm_type="tdx", vendor="intel", memory="32M", timeout=TIMEOUT) as vm:
        vcpu = vm.load(GUEST, defines={"OP": 4, "PAGES": 1024})
        while True:
            exit = vcpu.run()
            if isinstance(exit, testbed.HypercallExit) and exit.args[1] == 512 and exit.args[0] != UCALL_GPA:
                break  # the first chunk of set_memory_shared
            assert vm.handle(exit) is None
        assert vm.handle(exit) is None
        assert vcpu.run_to_ucall() == testbed.Ucall(cmd="sync", args=[0, 0])
        assert vcpu.run_to_ucall().cmd == "done"


def _run_with_vmm(ret: int, **kw: Any) -> tuple[int, int]:
    """OP 4 of one page through the host API, answering every MapGPA of the guest's page with
    `ret`: (set_memory_shared's rax, the to-shared MapGPA exits for that page)."""
    exits = 0
    with testbed.Vm(vm_type="tdx", vendor="intel", memory="16M", timeout=TIMEOUT, **kw) as vm:
        vcpu = vm.load(GUEST, defines={"OP": 4, "PAGES": 1})
        while True:
            match vcpu.run():
                case testbed.HypercallExit() as exit if exit.args[0] == FREE:
                    exits += exit.args[2] == 0  # DECRYPTED: set_memory_shared's
                    exit.ret = ret
                    continue
                case exit:
                    uc = vm.handle(exit)
            if uc is not None and uc.cmd == "sync":
                return uc.args[0], exits


def test_vmm_that_always_says_eagain_fails_after_three_retries() -> None:
    """A VMM answering EAGAIN makes KVM return RETRY with R11 = start: no progress, so the guest
    gives up after 3 tries and set_memory_shared fails with -EIO (tdx.c tdx_map_gpa)."""
    assert _run_with_vmm(errno.EAGAIN) == (EIO_RET, 3)


def test_retry_with_r11_outside_the_range_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile host answering RETRY with R11 outside [start, end) makes set_memory_shared fail
    at once with -EIO: R11 comes from the untrusted VMM (tdx.c tdx_map_gpa)."""

    def lying_propagate(self: kvm_tdx.TdxVcpu, status: int) -> None:
        self._set_return_code(kvm_tdx.TDVMCALL_STATUS_RETRY)
        self._set_return_val(self.map_gpa_end)  # one past the range
        self._resume()

    monkeypatch.setattr(kvm_tdx.TdxVcpu, "_propagate", lying_propagate)
    assert _run_with_vmm(errno.EAGAIN) == (EIO_RET, 1)


@pytest.mark.parametrize("shape", [0, 1, 2, 3])
def test_tracker_equals_what_the_guest_converted_in_a_td(shape: int) -> None:
    """guests/conversions.s under tdx: the VMM's shared ranges equal the reference model's (plus
    the ucall page), as on the other VM types (tests/test_conversions.py)."""
    report = done(td(GUESTS_DIR / "conversions.s", memory=CONV_MEM, defines={"SHAPE": shape}, seed=7))
    assert report.shared_ranges == to_ranges(expected_pages(shape) | {UCALL_GPA >> 12})


def _text_td(text: str) -> RunReport:
    return run_guest("<td>", VmOptions(vm_type="tdx", vendor=Vendor.INTEL, memory=MEM, timeout=TIMEOUT), text=text)


def test_hlt_with_interrupts_enabled_is_refused_without_a_tdvmcall() -> None:
    """Linux's handle_halt() (since 6.15): "HLT emulation with IRQs enabled" is -EIO, a fault, and
    no TDVMCALL<HLT> reaches the host; the runtime reports the #VE unhandled (vector 20, exit
    reason 12)."""
    trace = io.StringIO()
    report = run_guest("<td>", VmOptions(vm_type="tdx", vendor=Vendor.INTEL, memory=MEM, timeout=TIMEOUT,
                                         trace=trace), text="guest_main:\n    sti\n    hlt\n    ret\n")
    assert report.outcome == "unhandled_exception", report.detail
    assert report.exception is not None and (report.exception["vector"], report.exception["exit_reason"]) == (20, 12)
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    assert not [e for e in events if e["event"] == "tdvmcall" and e["r11"] == 12]


LEAK_MARKERS = """
guest_main:
    push rbx
    movabs rbx, 0x5EC2E7000000000B
    movabs rdx, 0x5EC2E7000000000D
    movabs rsi, 0x5EC2E7000000005E
    movabs rdi, 0x5EC2E700000000D1
    movabs r8,  0x5EC2E70000000008
    movabs r9,  0x5EC2E70000000009
    movabs r13, 0x5EC2E70000000013
    movabs r14, 0x5EC2E70000000014
    movabs r15, 0x5EC2E70000000015
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid                              # #VE -> TDVMCALL<CPUID>
    movabs rdi, 0x5EC2E700000000D1
    movabs r15, 0x5EC2E70000000015
    mov eax, KVM_HC_VAPIC_POLL_IRQ
    xor ebx, ebx
    xor ecx, ecx
    xor edx, edx
    xor esi, esi
    KVM_HYPERCALL                      # tdx_kvm_hypercall: R10 = nr, R11-R14 = a0-a3
    pop rbx
    GUEST_DONE
"""


def test_a_tdvmcall_exposes_zero_in_every_register_it_does_not_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux builds a struct tdx_module_args naming only the call's registers (handle_cpuid,
    tdx_kvm_hypercall, __tdx_hypercall via __tdcall_saved_ret), so every other exposed register
    reaches the host as 0: no guest value leaks through a TDVMCALL."""
    seen: list[dict[str, int]] = []
    handle = kvm_tdx.TdxVcpu.handle_tdcall

    def spy(self: kvm_tdx.TdxVcpu) -> None:
        seen.append({r.name.lower(): self._reg(r) for r in (Reg.RDX, Reg.RBX, Reg.RSI, Reg.RDI, Reg.R8, Reg.R9,
                                                               Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15)})
        handle(self)

    monkeypatch.setattr(kvm_tdx.TdxVcpu, "handle_tdcall", spy)
    report = done(_text_td(LEAK_MARKERS))
    cpuid = [s for s in seen if s["r10"] == 0 and s["r11"] == 10]
    hypercall = [s for s in seen if s["r10"] == KVM_HC_VAPIC_POLL_IRQ]
    assert len(cpuid) == 1 and len(hypercall) == 1, seen
    assert {k: v for k, v in cpuid[0].items() if k not in ("r11", "r12")} == dict.fromkeys(
        ("rdx", "rbx", "rsi", "rdi", "r8", "r9", "r10", "r13", "r14", "r15"), 0)
    assert cpuid[0]["r12"] == 0x40000000
    assert {k: v for k, v in hypercall[0].items() if k != "r10"} == dict.fromkeys(
        ("rdx", "rbx", "rsi", "rdi", "r8", "r9", "r11", "r12", "r13", "r14", "r15"), 0)
    assert report.outcome == "done"
