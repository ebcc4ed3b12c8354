"""The host API (testbed/api.py): Vm, Vcpu, the exit types and the errors a run ends with.

1. load boots to guest_main; run_to_ucall returns each Ucall; the host's view of memory, the
   attributes and the tracker's export; a second load, a bad option and use after close are
   clear errors, and the Vm releases its machine.
2. vcpu.run() returns each user exit unanswered: a test answers MAP_GPA_RANGE itself (EAGAIN,
   refusal, garbage in ret) in a `match` and passes the rest to vm.handle; an IN is answered in
   its data slot. Exits are read-only but for their reply slots, and serialise once (to_json).
3. A failed GUEST_ASSERT raises GuestAssertionError (file, line, values; str "file:line: ...");
   an unhandled exception GuestExceptionError; a spinning guest VmTimeoutError.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import testbed
from testbed.errors import MachineClosedError, UsageError
from testbed.hw.memory import UnmappableMemoryError
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import (
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_HC_MAP_GPA_RANGE,
    KVM_X86_QUIRK_OUT_7E_INC_RIP,
    KvmExitReason,
)
from testbed.layout import Layout
from testbed.pytest_plugin import TestbedCombination

VM_TYPES = ["default", "sev", "sev-snp"]
SMALL = {"memory": "8M", "timeout": 20}
U64 = (1 << 64) - 1

SYNCS = """
guest_main:
    GUEST_SYNC 1, 2
    GUEST_SYNC 3, 4, 5, 6, 7, 8
    ret
"""


@pytest.mark.testbed(vm_types=VM_TYPES, vendors=["amd"], **SMALL)
def test_run_to_ucall_returns_each_ucall(testbed_vm: Callable[..., testbed.Vm]) -> None:
    """load boots to guest_main; run_to_ucall returns the syncs (up to six values), then done."""
    with testbed_vm() as vm:
        vcpu = vm.load("syncs.s", text=SYNCS)
        assert vm.machine.cpu.read_reg(_reg("RIP")) == vm.machine.program.symbols["guest_main"]
        assert vcpu.run_to_ucall() == testbed.Ucall(cmd="sync", args=[1, 2])
        assert vcpu.run_to_ucall() == testbed.Ucall(cmd="sync", args=[3, 4, 5, 6, 7, 8])
        assert vcpu.run_to_ucall().cmd == "done"


CONVERT_EIGHT = """
guest_main:
    mov r12, 8
    mov rdi, GUEST_FREE_GPA
1:
    mov rsi, 1
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    add rdi, 4096
    dec r12
    jnz 1b
    GUEST_SYNC r12
    ret
"""


@pytest.mark.parametrize("vm_type", ["sev", "sev-snp"])
def test_run_to_ucall_answers_the_vmms_exits_inside_one_kvm_run(vm_type: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """run_to_ucall answers the exits the default VMM takes (here eight KVM_HC_MAP_GPA_RANGE and,
    on SNP, the GHCB's) inside KVM_RUN, as a whole run does (the internal fast path: no emulator
    stop per exit): the eight conversions and the ucall are one KVM_RUN, and all eight happened."""
    from testbed.kvm.vcpu import KvmVcpu

    runs: list[object] = []
    real = KvmVcpu.run

    def counted(self: KvmVcpu, *args: object, **kwargs: object) -> object:
        runs.append(kwargs.get("handled", args[1] if len(args) > 1 else None))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    with testbed.Vm(vm_type=vm_type, **SMALL) as vm:
        vcpu = vm.load("convert.s", text=CONVERT_EIGHT)
        monkeypatch.setattr(KvmVcpu, "run", counted)
        assert vcpu.run_to_ucall() == testbed.Ucall(cmd="sync", args=[0])
        assert len(runs) == 1 and runs[0] is not None
        free = Layout(8 << 20).free_gpa
        assert all(not vm.is_private(free + i * 4096) for i in range(8))
        assert vm.is_private(free + 8 * 4096)
        assert vcpu.run_to_ucall().cmd == "done"


def test_an_error_the_vmm_raises_comes_out_of_run_to_ucall_as_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception the default VMM raises while answering an exit inside KVM_RUN comes out of
    run_to_ucall as itself, the run not ended, as it would from vm.handle() after vcpu.run()."""
    with testbed.Vm(vm_type="sev", **SMALL) as vm:
        vcpu = vm.load("convert.s", text=CONVERT_EIGHT)

        def refuse(*_args: object) -> int:
            raise KvmIoctlError("TEST", errno.ENOMEM, "the VMM ran out")

        monkeypatch.setattr(vm.machine.map_gpa, "handle", refuse)
        with pytest.raises(KvmIoctlError) as info:
            vcpu.run_to_ucall()
        assert type(info.value) is KvmIoctlError and info.value.errno == errno.ENOMEM
        assert vm.machine.vmm.ended is None


def _reg(name: str) -> object:
    from testbed.x86 import Reg

    return Reg[name]


MEMORY_VIEW = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 0x5a
    mov rdx, 4096
    call guest_memset               # private on sev / sev-snp, plain on default
    mov rdi, GUEST_FREE_GPA + 4096
    mov rsi, 1
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rdi, GUEST_FREE_GPA + 4096
    mov rsi, 0xa5
    mov rdx, 4096
    call guest_memset
    GUEST_SYNC GUEST_FREE_GPA
    mov rax, qword ptr [GUEST_FREE_GPA + 4096]
    GUEST_ASSERT_EQ rax, 0x0707070707070707
    ret
"""


@pytest.mark.testbed(vm_types=VM_TYPES, vendors=["amd"], **SMALL)
def test_host_view_attributes_and_tracker(testbed_vm: Callable[..., testbed.Vm],
                                          testbed_combination: TestbedCombination) -> None:
    """vm.read/write are the VMM's view: plaintext, ciphertext (sev) or a refusal (sev-snp's
    guest_memfd); is_private is KVM's attribute; shared_ranges the VMM tracker's export."""
    vm_type = testbed_combination.vm_type
    with testbed_vm() as vm:
        vcpu = vm.load("view.s", text=MEMORY_VIEW)
        uc = vcpu.run_to_ucall()
        private_gpa = uc.args[0]
        shared_gpa = private_gpa + 4096
        assert vm.read(shared_gpa, 16) == b"\xa5" * 16
        assert not vm.is_private(shared_gpa)
        assert (shared_gpa >> 12, 1) in vm.shared_ranges()
        if vm_type == "default":
            assert not vm.is_private(private_gpa) and vm.read(private_gpa, 16) == b"\x5a" * 16
        elif vm_type == "sev":
            assert vm.is_private(private_gpa) and vm.read(private_gpa, 16) != b"\x5a" * 16  # ciphertext
        else:
            assert vm.is_private(private_gpa)
            with pytest.raises(UnmappableMemoryError):
                vm.read(private_gpa, 16)
        vm.write(shared_gpa, b"\x07" * 8)
        assert vcpu.run_to_ucall().cmd == "done"  # the guest saw the host's write


def test_set_memory_attributes_is_kvms_ioctl() -> None:
    """set_memory_attributes flips KVM's attribute only (the tracker is the VMM's) and KVM rejects
    what it rejects (kvm_main.c kvm_vm_ioctl_set_mem_attributes: PAGE_ALIGNED, supported attributes)."""
    with testbed.Vm(vm_type="sev-snp", **SMALL) as vm:
        vm.load("syncs.s", text=SYNCS)
        gpa = int(vm.machine.layout.defines()["GUEST_FREE_GPA"])
        before = vm.shared_ranges()
        vm.set_memory_attributes(gpa, 4096, private=False)
        assert not vm.is_private(gpa) and vm.shared_ranges() == before
        vm.set_memory_attributes(gpa, 4096, private=True)
        assert vm.is_private(gpa)
        with pytest.raises(KvmIoctlError):
            vm.set_memory_attributes(gpa + 1, 4096)
    with testbed.Vm(**SMALL) as vm:
        vm.load("syncs.s", text=SYNCS)
        with pytest.raises(KvmIoctlError):
            vm.set_memory_attributes(0, 4096, private=True)  # no private memory on the default VM


def test_memory_ioctls_refuse_what_kvm_refuses() -> None:
    """KVM_SET_MEMORY_ATTRIBUTES reads address and size as __u64: a negative one wraps and is
    EINVAL (kvm_vm_ioctl_set_mem_attributes); fallocate on guest_memfd needs a page-aligned offset
    and length (kvm_gmem_fallocate: EINVAL); a closed VM refuses inject_pending_event as every
    other call."""
    with testbed.Vm(vm_type="sw-protected", **SMALL) as vm:
        vcpu = vm.load("syncs.s", text=SYNCS)
        for gpa, size in ((-8192, 16384), (-4096, 4096)):
            with pytest.raises(KvmIoctlError) as info:
                vm.set_memory_attributes(gpa, size)
            assert info.value.errno == errno.EINVAL
        for gpa, size in ((0x1001, 4096), (0x1000, 100)):
            with pytest.raises(KvmIoctlError) as info:
                vm.guest_mem_fallocate(gpa, size, punch_hole=True)
            assert info.value.errno == errno.EINVAL
    with pytest.raises(MachineClosedError):
        vcpu.inject_pending_event()


PUNCHED = """
guest_main:
    mov rdi, GPA
    mov rsi, 0x5a
    mov rdx, 0x1000
    call guest_memset
    GUEST_SYNC 1
    mov rax, GPA
    mov rax, qword ptr [rax]
    GUEST_SYNC 2, rax
    mov rax, GPA
    mov qword ptr [rax], 0x77
    GUEST_SYNC 3
    ret
"""
PUNCHED_GPA = 0x700000


@pytest.mark.parametrize("vm_type", ["sw-protected", "sev-snp", "tdx"])
def test_a_punched_private_page_faults_in_anew(vm_type: str) -> None:
    """fallocate(PUNCH_HOLE) on guest_memfd while the attribute stays private: KVM zaps the page
    from stage 2 (kvm_gmem_punch_hole -> kvm_mmu_unmap_gfn_range), so the next private access
    faults in a fresh page - zeros on sw-protected, allocated again; on SNP not validated
    (sev_gmem_invalidate / sev_gmem_prepare: #VC PAGE_NOT_VALIDATED); in a TD pending
    (TDH.MEM.PAGE.REMOVE, then tdx_handle_ept_violation: the VM is dead, EIO)."""
    vendor = "intel" if vm_type == "tdx" else "amd"
    with testbed.Vm(vm_type=vm_type, vendor=vendor, **SMALL) as vm:
        vcpu = vm.load("punched.s", text=PUNCHED, defines={"GPA": PUNCHED_GPA})
        if vm_type == "sw-protected":
            vm.set_memory_attributes(PUNCHED_GPA, 0x1000, private=True)
        assert list(vcpu.run_to_ucall().args) == [1] and vm.guest_mem_allocated(PUNCHED_GPA)
        vm.guest_mem_fallocate(PUNCHED_GPA, 0x1000, punch_hole=True)
        assert not vm.guest_mem_allocated(PUNCHED_GPA) and vm.is_private(PUNCHED_GPA)
        if vm_type == "sw-protected":
            assert list(vcpu.run_to_ucall().args) == [2, 0]
            assert list(vcpu.run_to_ucall().args) == [3] and vm.guest_mem_allocated(PUNCHED_GPA)
        elif vm_type == "sev-snp":
            with pytest.raises(testbed.GuestExceptionError) as vc:
                vcpu.run_to_ucall()
            assert (vc.value.vector, vc.value.error_code) == (29, 0x404)
        else:
            with pytest.raises(testbed.KvmRunError) as eio:
                vcpu.run_to_ucall()
            assert eio.value.errno == errno.EIO and "before accepting" in str(eio.value)


@pytest.mark.parametrize("vm_type", ["sw-protected", "sev-snp"])
@pytest.mark.parametrize("punch", [False, True])
def test_an_attribute_round_trip_keeps_the_private_page_unless_it_was_freed(vm_type: str, punch: bool) -> None:
    """private -> shared -> private with KVM_SET_MEMORY_ATTRIBUTES alone keeps the guest_memfd
    page: the guest reads its data again, and on SNP the page is still validated (mmu.c
    kvm_arch_pre_set_memory_attributes only unmaps; the RMP changes when the folio is freed,
    sev_gmem_invalidate). With a punched hole in between the page is new: zeros, and on SNP
    not validated (#VC 0x404)."""
    with testbed.Vm(vm_type=vm_type, **SMALL) as vm:
        vcpu = vm.load("punched.s", text=PUNCHED, defines={"GPA": PUNCHED_GPA})
        if vm_type == "sw-protected":
            vm.set_memory_attributes(PUNCHED_GPA, 0x1000, private=True)
        assert list(vcpu.run_to_ucall().args) == [1]
        vm.set_memory_attributes(PUNCHED_GPA, 0x1000, private=False)
        if punch:
            vm.guest_mem_fallocate(PUNCHED_GPA, 0x1000, punch_hole=True)
        vm.set_memory_attributes(PUNCHED_GPA, 0x1000, private=True)
        assert vm.guest_mem_allocated(PUNCHED_GPA) is not punch
        if punch and vm_type == "sev-snp":
            with pytest.raises(testbed.GuestExceptionError) as vc:
                vcpu.run_to_ucall()
            assert (vc.value.vector, vc.value.error_code) == (29, 0x404)
        else:
            assert list(vcpu.run_to_ucall().args) == [2, 0 if punch else 0x5A5A5A5A5A5A5A5A]


def test_fallocate_allocates_and_refuses_a_zero_length() -> None:
    """fallocate without PUNCH_HOLE allocates the guest_memfd pages (kvm_gmem_allocate: SEEK_DATA
    then finds them); a length of 0 is EINVAL (vfs_fallocate: len <= 0)."""
    with testbed.Vm(vm_type="sw-protected", **SMALL) as vm:
        vm.load("syncs.s", text=SYNCS)
        assert not vm.guest_mem_allocated(0x600000)
        vm.guest_mem_fallocate(0x600000, 0x2000, punch_hole=False)
        assert vm.guest_mem_allocated(0x600000) and vm.guest_mem_allocated(0x601000)
        assert not vm.guest_mem_allocated(0x602000)
        for punch in (False, True):
            with pytest.raises(KvmIoctlError) as info:
                vm.guest_mem_fallocate(0x600000, 0, punch_hole=punch)
            assert info.value.errno == errno.EINVAL


def test_host_memory_calls_name_a_wrong_type() -> None:
    """A float or str address, a non-bytes payload, a truthy string for a flag: UsageError naming
    the argument and its type, not a TypeError from inside the memory model (or a crash
    formatting the message) or a silent yes."""
    with testbed.Vm(**SMALL) as vm:
        vm.load("syncs.s", text=SYNCS)
        for call, what in ((lambda: vm.read(0.5, 4), "gpa 0.5: expected an int, not float"),  # type: ignore[arg-type]
                           (lambda: vm.read("0", 4), "gpa '0': expected an int, not str"),  # type: ignore[arg-type]
                           (lambda: vm.write(0x1000, "abc"), "expected bytes, not str"),  # type: ignore[arg-type]
                           (lambda: vm.guest_mem_fallocate(4096.0, 4096, True),  # type: ignore[arg-type]
                            "gpa 4096.0: expected an int, not float"),
                           (lambda: vm.set_memory_attributes(0, 4096, private="yes"),  # type: ignore[arg-type]
                            "private 'yes': expected True or False, not str"),
                           (lambda: vm.set_memory_attributes(4096.0, 4096),  # type: ignore[arg-type]
                            "gpa 4096.0: expected an int, not float"),
                           (lambda: vm.enable_dirty_logging("x"),  # type: ignore[arg-type]
                            "enabled 'x': expected True or False, not str")):
            with pytest.raises(UsageError, match=what):
                call()


MAP_GPA = """
.macro MAP_ONE
    mov rax, KVM_HC_MAP_GPA_RANGE
    mov rbx, GUEST_FREE_GPA
    mov rcx, 1
    xor rdx, rdx                    # to shared, 4K
    KVM_HYPERCALL
    GUEST_SYNC rax
.endm
guest_main:
    MAP_ONE
    MAP_ONE
    MAP_ONE
    MAP_ONE
    ret
"""


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_test_answers_map_gpa_range_itself(vm_type: str) -> None:
    """A test answers KVM_EXIT_HYPERCALL itself (EAGAIN, a refusal, garbage) and passes the rest
    to vm.handle: KVM writes ret raw into RAX (x86.c complete_hypercall_exit)."""
    answers = [-11 & U64, -22 & U64, 0xDEADBEEF]
    got: list[int] = []
    with testbed.Vm(vm_type=vm_type, **SMALL) as vm:
        vcpu = vm.load("map.s", text=MAP_GPA)
        free_gfn = -1
        while True:
            match vcpu.run():
                case testbed.HypercallExit(nr=nr, args=args) as exit if answers:
                    assert nr == KVM_HC_MAP_GPA_RANGE and args[1:3] == (1, 0)
                    assert exit.reason == "hypercall" and exit.exit_reason == KvmExitReason.KVM_EXIT_HYPERCALL
                    free_gfn = args[0] >> 12
                    exit.ret = answers.pop(0)
                case exit:
                    uc = vm.handle(exit)
                    if uc is not None and uc.cmd == "done":
                        break
                    if uc is not None:
                        got.append(uc.args[0])
                        # The three answered by the test never reached the VMM's tracker.
                        assert ((free_gfn, 1) in vm.shared_ranges()) == (len(got) == 4)
    assert got == [-11 & U64, -22 & U64, 0xDEADBEEF, 0]


IN_PORT = """
guest_main:
    mov dx, 0x70
    in eax, dx
    GUEST_SYNC rax
    in al, 0x71
    GUEST_SYNC rax
    ret
"""


@pytest.mark.parametrize("vm_type", ["default", "sev-snp"])
def test_in_is_answered_in_its_data_slot(vm_type: str) -> None:
    """An IN's value is what userspace writes into the exit's data (x86.c complete_fast_pio_in;
    on SEV-ES/SNP through the GHCB, sev.c)."""
    with testbed.Vm(vm_type=vm_type, **SMALL) as vm:
        vcpu = vm.load("in.s", text=IN_PORT)
        exit = vcpu.run()
        assert isinstance(exit, testbed.IoInExit) and (exit.port, exit.size) == (0x70, 4)
        exit.data = bytes.fromhex("78563412")
        assert vcpu.run_to_ucall() == testbed.Ucall(cmd="sync", args=[0x12345678])
        exit = vcpu.run()
        assert isinstance(exit, testbed.IoInExit) and (exit.port, exit.size) == (0x71, 1)
        assert vm.handle(exit) is None  # the default VMM: no device, all ones
        assert vcpu.run_to_ucall().args[0] & 0xFF == 0xFF


PIO_REDIRECT = """
guest_main:
    mov dx, 0x80
    mov eax, 0x11
    xor r15d, r15d
port_io:
    .ifdef IN_PORT
    in al, dx
    .else
    out dx, al
    .endif
    add r15, 0x55
    GUEST_SYNC r15, rax
    ret
elsewhere:
    add r15, 0x77
    GUEST_SYNC r15, rax
    ret
"""


@pytest.mark.parametrize("direction", ["out", "in"])
def test_a_rip_moved_at_a_port_io_exit_gets_no_completion(direction: str) -> None:
    """Userspace that moves RIP at a port I/O exit gets neither the IN's RAX nor the skip past the
    instruction: the guest resumes at the new RIP (x86.c complete_fast_pio_out/in:
    `if (unlikely(!kvm_is_linear_rip(vcpu, vcpu->arch.pio.linear_rip))) return 1;`); left where
    it was, the completion runs."""
    defines = {"IN_PORT": 1} if direction == "in" else {}
    for moved in (False, True):
        with testbed.Vm(**SMALL) as vm:
            vcpu = vm.load("pio.s", text=PIO_REDIRECT, defines=defines)
            exit = vcpu.run()
            assert isinstance(exit, testbed.IoInExit if direction == "in" else testbed.IoOutExit)
            assert exit.port == 0x80
            if isinstance(exit, testbed.IoInExit):
                exit.data = b"\x5a"
            state = vm.get_vcpu_state()
            assert state.regs is not None and state.regs.rip == vm.machine.program.symbols["port_io"]
            if moved:
                regs = dataclasses.replace(state.regs, rip=vm.machine.program.symbols["elsewhere"])
                vm.set_vcpu_state(dataclasses.replace(state, regs=regs))
            ucall = vcpu.run_to_ucall()
        rax = 0x5A if direction == "in" and not moved else 0x11
        assert ucall.args == [0x77 if moved else 0x55, rax]


OUT_7E = """
guest_main:
    mov eax, 0x11
port_7e:
    out 0x7e, al
after_7e:
    GUEST_SYNC 1
    ret
"""


@pytest.mark.parametrize("quirk", [True, False])
def test_out_0x7e_is_skipped_before_its_exit_while_the_quirk_is_on(quirk: bool) -> None:
    """An OUT to port 0x7e exits with RIP already past it while KVM_X86_QUIRK_OUT_7E_INC_RIP is
    on (the default), and its completion does nothing; with the quirk
    disabled (KVM_CAP_DISABLE_QUIRKS2) it is an ordinary OUT (x86.c kvm_fast_pio_out,
    complete_fast_pio_out_port_0x7e)."""
    with testbed.Vm(**SMALL) as vm:
        vcpu = vm.load("out7e.s", text=OUT_7E)
        if not quirk:
            vm.machine.kvm_vm.enable_cap(KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_OUT_7E_INC_RIP)
        exit = vcpu.run()
        assert isinstance(exit, testbed.IoOutExit) and (exit.port, exit.data) == (0x7E, b"\x11")
        symbols = vm.machine.program.symbols
        state = vm.get_vcpu_state()
        assert state.regs is not None and state.regs.rip == symbols["after_7e" if quirk else "port_7e"]
        assert vcpu.run_to_ucall().args == [1]


def test_exits_are_read_only_but_reply_slots() -> None:
    """Exits are frozen but for the slots userspace fills in kvm_run (hypercall.ret, io data, msr data/error)."""
    hc = testbed.HypercallExit(nr=12, args=(0x1000, 1, 0, 0, 0, 0))
    hc.ret = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        hc.nr = 1  # type: ignore[misc]
    out = testbed.IoOutExit(size=4, port=0x1000, data=b"\x00\x10\x00\x00")
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.port = 1  # type: ignore[misc]
    rd = testbed.RdmsrExit(index=0x10, msr_reason=4)
    rd.data, rd.error = 7, 1
    wr = testbed.WrmsrExit(index=0x10, msr_reason=4, data=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        wr.data = 1
    assert hc.to_json() == {"reason": "hypercall", "nr": 12, "args": [0x1000, 1, 0, 0, 0, 0], "ret": 5, "flags": 0}
    assert out.to_json()["direction"] == "out" and out.to_json()["value"] == 0x1000
    assert {t.reason for t in testbed.exits.EXIT_TYPES} >= {"hypercall", "io", "memory_fault", "x86_rdmsr"}


@pytest.mark.parametrize(("make", "slot", "value"), [
    (lambda: testbed.HypercallExit(nr=12, args=(0, 1, 0, 0, 0, 0)), "ret", None),
    (lambda: testbed.HypercallExit(nr=12, args=(0, 1, 0, 0, 0, 0)), "ret", "0"),
    (lambda: testbed.HypercallExit(nr=12, args=(0, 1, 0, 0, 0, 0)), "ret", 1.5),
    (lambda: testbed.HypercallExit(nr=12, args=(0, 1, 0, 0, 0, 0)), "ret", True),
    (lambda: testbed.HypercallExit(nr=12, args=(0, 1, 0, 0, 0, 0)), "ret", 1 << 64),
    (lambda: testbed.IoInExit(size=1, port=0x70), "data", "x"),
    (lambda: testbed.RdmsrExit(index=0x10, msr_reason=4), "data", b"\x01"),
], ids=["none", "str", "float", "bool", "wide", "in-str", "msr-bytes"])
def test_a_reply_slot_takes_only_what_kvm_run_can_hold(make: Callable[[], Any], slot: str, value: object) -> None:
    """A reply slot refuses what kvm_run's __u64 fields (or IN's data bytes) cannot hold, at the
    assignment, naming the slot; the slot keeps its value."""
    exit = make()
    before = getattr(exit, slot)
    with pytest.raises(UsageError, match=f"{type(exit).__name__}.{slot} = "):
        setattr(exit, slot, value)
    assert getattr(exit, slot) == before


def test_a_reply_slot_takes_negative_errnos_and_u64s() -> None:
    """-22 (as C stores -KVM_EINVAL into __u64) and 2**64 - 1 are valid replies; IN's data takes bytes or an int."""
    exit = testbed.HypercallExit(nr=12, args=(0, 1, 0, 0, 0, 0))
    exit.ret = -22
    exit.ret = (1 << 64) - 1
    io = testbed.IoInExit(size=2, port=0x70)
    io.data = b"\x01\x02"
    io.data = 0x0201
    assert io.reply(2) == b"\x01\x02"


def test_handle_refuses_what_is_no_exit() -> None:
    """vm.handle() of something vcpu.run() never returns is a UsageError naming it, not an AttributeError."""
    with testbed.Vm(**SMALL) as vm:
        vm.load("syncs.s", text=SYNCS)
        with pytest.raises(UsageError, match="expected an exit"):
            vm.handle("foo")  # type: ignore[arg-type]


def test_report_user_exits_are_each_exits_to_json() -> None:
    """run_guest is built on the API: its user_exits are the exits' to_json(), each exit serialised once."""
    report = testbed.run_guest("syncs.s", testbed.VmOptions(**SMALL), text=SYNCS)
    assert report.outcome == "done" and report.syncs() == [1, 3]
    assert report.user_exits[0] == testbed.IoOutExit(size=4, port=0x1000, data=report.user_exits[0]["value"]
                                                     .to_bytes(4, "little")).to_json()


ASSERT_IN_HELPER = """
guest_main:
    mov rax, 5
    call helper
helper:
    GUEST_HELPER_ENTER
    GUEST_ASSERT_EQ rax, 6
    GUEST_HELPER_RET
"""


def test_guest_assert_raises_with_file_line_values() -> None:
    """A failed GUEST_ASSERT_EQ raises GuestAssertionError with file, line, values; str is file:line: ..."""
    with testbed.Vm(**SMALL) as vm:
        vcpu = vm.load("asserts.s", text=ASSERT_IN_HELPER)
        with pytest.raises(testbed.GuestAssertionError) as info:
            vcpu.run_to_ucall()
    err = info.value
    assert (err.file, err.line, err.values) == ("asserts.s", 7, (5, 6))
    assert str(err).startswith("asserts.s:7: ") and "0x5 != 0x6" in str(err)
    assert err.outcome == "guest_assert" and isinstance(err, testbed.VmExitError)


def test_unhandled_exception_and_timeout_raise() -> None:
    """An unhandled #UD raises GuestExceptionError (vector 6); a spinning guest VmTimeoutError."""
    with testbed.Vm(**SMALL) as vm:
        vcpu = vm.load("ud.s", text="guest_main:\n    ud2\n")
        with pytest.raises(testbed.GuestExceptionError) as info:
            vcpu.run_to_ucall()
        assert info.value.vector == 6 and info.value.outcome == "unhandled_exception"
    with testbed.Vm(**SMALL) as vm:
        vcpu = vm.load("spin.s", text="guest_main:\nspin:\n    jmp spin\n")
        with pytest.raises(testbed.VmTimeoutError):
            vcpu.run(timeout=0.05)
        with pytest.raises(testbed.VmTimeoutError):
            vcpu.run_to_ucall(timeout=0.05)


def test_vm_releases_its_machine_and_refuses_misuse() -> None:
    """The Vm's `with` closes the machine (emulator, memory); a second load, an unknown option,
    memory access before load, and running after close are clear errors."""
    with pytest.raises(UsageError, match="unknown option 'memroy'"):
        testbed.Vm(memroy="8M")
    with pytest.raises(UsageError, match="memory"):
        testbed.Vm(memory=1.5)
    with testbed.Vm(**SMALL) as vm:
        with pytest.raises(UsageError, match="load"):
            vm.read(0, 1)
        vcpu = vm.load("syncs.s", text=SYNCS)
        with pytest.raises(UsageError, match="one load per Vm"):
            vm.load("syncs.s", text=SYNCS)
        machine = weakref.ref(vm.machine)
        engine = vm.machine.cpu
    assert engine is not None and machine() is not None and machine().closed  # type: ignore[union-attr]
    with pytest.raises(MachineClosedError):
        vcpu.run()
    del vm, vcpu, engine
    gc.collect()
    assert machine() is None


def test_run_to_ucall_completes_the_ucalls_port_io() -> None:
    """run_to_ucall completes the ucall's OUT before returning, as the selftests' get_ucall does
    (vcpu_run_complete_io): RIP is past the OUT, the state can be snapshotted, and a restore
    runs on to the next ucall instead of replaying this one."""
    with testbed.Vm(**SMALL) as vm:
        vcpu = vm.load("syncs.s", text=SYNCS)
        assert vcpu.run_to_ucall().args == [1, 2]
        snapshot = vm.snapshot()
        assert vcpu.run_to_ucall().args == [3, 4, 5, 6, 7, 8]
        vm.restore(snapshot)
        assert vcpu.run_to_ucall().args == [3, 4, 5, 6, 7, 8]


def test_complete_io_runs_the_completion_without_entering_the_guest() -> None:
    """vcpu.complete_io() is KVM_RUN with immediate_exit: after vcpu.run() returned the ucall's OUT
    (RIP at the OUT, no snapshot possible), it moves RIP past the OUT and returns None; the guest
    has not run (the next ucall is still to come)."""
    with testbed.Vm(**SMALL) as vm:
        vcpu = vm.load("syncs.s", text=SYNCS)
        exit = vcpu.run()
        assert isinstance(exit, testbed.IoOutExit)
        state = vm.get_vcpu_state()
        assert state.regs is not None
        at_out = state.regs.rip
        with pytest.raises(testbed.SnapshotError, match="unanswered"):
            vm.snapshot()
        assert vcpu.complete_io() is None
        state = vm.get_vcpu_state()
        assert state.regs is not None and state.regs.rip == at_out + 1  # out dx, eax
        vm.snapshot().close()
        assert vcpu.run_to_ucall().args == [3, 4, 5, 6, 7, 8]


def test_a_vcpu_of_a_closed_pooled_vm_cannot_run() -> None:
    """Closing a Vm loaded with reuse=True returns its machine to the pool, but its Vcpu is dead:
    running it is MachineClosedError, and the next Vm the pool serves sees all its own ucalls."""
    with testbed.Vm(**SMALL) as vm:
        old = vm.load("syncs.s", text=SYNCS, reuse=True)
        assert old.run_to_ucall().args == [1, 2]
    with pytest.raises(MachineClosedError):
        old.run_to_ucall()
    with pytest.raises(MachineClosedError):
        old.complete_io()
    with testbed.Vm(**SMALL) as vm:
        vcpu = vm.load("syncs.s", text=SYNCS, reuse=True)
        with pytest.raises(MachineClosedError):
            old.run()
        assert vcpu.run_to_ucall().args == [1, 2]
        assert vcpu.run_to_ucall().args == [3, 4, 5, 6, 7, 8]


def test_every_error_the_readme_names_is_exported() -> None:
    """README ("The host API"): "every name below is exported by `import testbed`" - the errors
    the host API raises included, each the class its module defines."""
    from testbed.control_plane import ControlPlaneError
    from testbed.errors import MachineClosedError as Closed
    from testbed.hw.memory import UnmappableMemoryError
    from testbed.kvm.ioctl import KvmIoctlError as Ioctl
    from testbed.snapshot import SnapshotError

    assert (testbed.MachineClosedError, testbed.KvmIoctlError, testbed.UnmappableMemoryError,
            testbed.ControlPlaneError, testbed.SnapshotError) == (Closed, Ioctl, UnmappableMemoryError,
                                                                  ControlPlaneError, SnapshotError)
    assert {"MachineClosedError", "KvmIoctlError", "UnmappableMemoryError", "ControlPlaneError",
            "SnapshotError"} <= set(testbed.__all__)
