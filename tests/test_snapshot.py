"""Machine snapshots (testbed/snapshot.py): a restored machine is a freshly booted one.

Every test compares against the real thing: the same scenario on a VM built and booted anew.
The report is compared whole (ucalls, user_exits, shared_ranges, outcome, exit counts, the
exception; not the wall time), and the machine's state byte for byte (guest memory of every
backing, the emulator's CPU context, KVM's memory attributes, the RMP).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

import testbed
from testbed.api import run_report
from testbed.errors import MachineClosedError
from testbed.hw.memory import GuestMemory
from testbed.kvm.uapi import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED
from testbed.machine import GUESTS_DIR, Machine, VmOptions
from testbed.snapshot import POOL, SnapshotError, pool_key

VM_TYPES = ["default", "sev", "sev-es", "sev-snp", "sw-protected"]
MEMORY = "8M"
PAGE = 4096
#: uc_context's header (context_size, mode, arch, snapshot_level, ramblock_freed, last_block):
#: the emulator's bookkeeping, not CPU state; it differs between two fresh machines too
UC_CONTEXT_HEADER = 32


def report_of(report: testbed.RunReport) -> str:
    """The whole report but its wall time, as comparable text."""
    out = report.to_json()
    out["stats"].pop("wall_s")
    return json.dumps(out, sort_keys=True, default=str)


def run_fresh(guest: str, vm_type: str, **options: Any) -> str:
    with testbed.Vm(vm_type=vm_type, memory=MEMORY, **options) as vm:
        vcpu = vm.load(GUESTS_DIR / guest)
        return report_of(run_report(vm, vcpu, 30))


def machine_state(machine: Machine) -> dict[str, Any]:
    """What a run can observe of a machine between runs, byte for byte."""
    cpu = machine.cpu
    state: dict[str, Any] = {
        "memory": [hashlib.sha256(view).hexdigest() for view in
                   (machine.memory.dram, machine.memory.private) if view is not None],
        "owner": bytes(machine.memory.owner),
        "context": bytes(cpu._save_context())[UC_CONTEXT_HEADER:],
        "site_hooks": sorted(cpu._site_hooks),
        "shared_ranges": list(machine.vmm.shared_source.shared_ranges()),
        "ghcb_msr": cpu._ghcb.ghcb_msr_value(),
    }
    attrs = machine.kvm_vm.mem_attrs
    if attrs is not None:
        state["attrs"] = bytes(attrs.private)
    if cpu.rmp is not None:
        state["rmp"] = (bytes(cpu.rmp._assigned_diff), cpu.rmp._base, bytes(cpu.rmp.validated))
    return state


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_restored_machine_runs_as_a_fresh_one(vm_type: str) -> None:
    """A scenario that converts pages and writes memory reports the same on a fresh VM and on
    a VM restored to its boot snapshot, restored twice in a row."""
    fresh = run_fresh("conversions.s", vm_type)
    with testbed.Vm(vm_type=vm_type, memory=MEMORY) as vm:
        vcpu = vm.load(GUESTS_DIR / "conversions.s")
        snap = vm.snapshot()
        assert report_of(run_report(vm, vcpu, 30)) == fresh
        for _ in range(2):
            vm.restore(snap)
            assert report_of(run_report(vm, vcpu, 30)) == fresh
        snap.close()


@pytest.mark.parametrize("vm_type", ["default", "sev", "sev-snp"])
def test_restored_machine_state_is_a_fresh_boot(vm_type: str) -> None:
    """After a run and a restore, memory (every backing), ownership, the CPU context (hflags,
    old_exception, MSRs), site hooks, attributes and the RMP equal a freshly booted machine's."""
    # seed: legacy SEV's memory key (a fresh machine otherwise draws its own, and its ciphertext differs)
    with testbed.Vm(vm_type=vm_type, memory=MEMORY, seed=1) as fresh:
        fresh.load(GUESTS_DIR / "conversions.s")
        want = machine_state(fresh.machine)
    with testbed.Vm(vm_type=vm_type, memory=MEMORY, seed=1) as vm:
        vcpu = vm.load(GUESTS_DIR / "conversions.s")
        snap = vm.snapshot()
        run_report(vm, vcpu, 30)
        assert machine_state(vm.machine) != want  # the run changed it
        vm.restore(snap)
        assert machine_state(vm.machine) == want


@pytest.mark.parametrize(("guest", "vm_type"), [
    ("exceptions_user.s", "default"),  # ends at CPL 0 after a CPL-3 routine: hflags, TSS stack
    ("exceptions_handled.s", "sev-snp"),  # exceptions delivered through the IDT, #VC on SNP
    ("exceptions_triple.s", "default"),  # a triple fault: the run ends in shutdown
    ("exceptions_unhandled.s", "sev"),
])
def test_restore_after_a_run_that_ended_in_an_exception(guest: str, vm_type: str) -> None:
    """A run that took exceptions, changed CPL or ended in a triple fault leaves nothing behind:
    the restored machine reports as a fresh one."""
    fresh = run_fresh(guest, vm_type)
    with testbed.Vm(vm_type=vm_type, memory=MEMORY) as vm:
        vcpu = vm.load(GUESTS_DIR / guest)
        snap = vm.snapshot()
        assert report_of(run_report(vm, vcpu, 30)) == fresh
        vm.restore(snap)
        assert report_of(run_report(vm, vcpu, 30)) == fresh


def _host_loop(vm: testbed.Vm, vcpu: testbed.Vcpu) -> list[Any]:
    """private_mem_conversions_test's host half: attributes and punch-holes for each
    conversion, host writes into shared ranges; returns what each sync saw."""
    seen: list[Any] = []
    while True:
        match vcpu.run():
            case testbed.HypercallExit() as exit:
                assert exit.nr == KVM_HC_MAP_GPA_RANGE
                gpa, npages, attrs = exit.args[:3]
                private = bool(attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)
                if not private:
                    vm.guest_mem_fallocate(gpa, npages * PAGE, punch_hole=True)
                vm.set_memory_attributes(gpa, npages * PAGE, private=private)
                exit.ret = 0
                continue
            case exit:
                uc = vm.handle(exit)
        if uc is None:
            continue
        if uc.cmd == "done":
            return seen
        kind, gpa, size = uc.args[:3]
        seen.append((list(uc.args), vm.is_private(gpa)))
        if kind == 0:  # shared: the host reads the guest's pattern and writes its own
            seen.append(vm.read(gpa, size))
            vm.write(gpa, bytes([uc.args[4]]) * size)


@pytest.mark.parametrize("vm_type", ["sev", "sev-snp"])  # legacy aliases; guest_memfd with the RMP
def test_restore_after_host_conversions_and_writes(vm_type: str) -> None:
    """After a host half that sets attributes, punches guest_memfd holes and writes shared
    memory, a restored VM runs the scenario as a fresh one, twice (the selftest's loop)."""
    with testbed.Vm(vm_type=vm_type, memory="16M") as vm:  # the guest's test region sits above 8M
        vcpu = vm.load(GUESTS_DIR / "private_mem_conversions.s")
        snap = vm.snapshot()
        want = _host_loop(vm, vcpu)  # the fresh boot's run (taking the snapshot changes nothing)
        fresh_report = report_of(vm.machine.vmm.finalize(0))
        assert sum(isinstance(seen, tuple) for seen in want) == 1 + 5 + 3 * 2  # the selftest's syncs
        for _ in range(2):
            vm.restore(snap)
            assert _host_loop(vm, vcpu) == want
            assert report_of(vm.machine.vmm.finalize(0)) == fresh_report


def test_a_report_handed_out_survives_the_restore() -> None:
    """The report a run returned is the caller's: restoring the machine gives the VMM a fresh
    report instead of rewinding the returned one."""
    with testbed.Vm(memory=MEMORY) as vm:
        vcpu = vm.load(GUESTS_DIR / "exceptions_user.s")
        snap = vm.snapshot()
        report = run_report(vm, vcpu, 30)
        before = report_of(report)
        vm.restore(snap)
        assert report_of(report) == before and report.passed and report.syncs() == [0x23, 0x08]
        assert vm.machine.vmm.report is not report and not vm.machine.vmm.report.ucalls


def test_a_discard_after_restore_reads_zeros() -> None:
    """A page discarded after a restore reads zeros, not the snapshot's bytes (DONTNEED on a
    private file mapping would bring the image back; QEMU's discard leaves zeros)."""
    mem = GuestMemory(4 * PAGE, guest_memfd=True)
    try:
        mem.dram[PAGE : 2 * PAGE] = b"\x5a" * PAGE
        image = mem.save_image()
        mem.dram[PAGE : PAGE + 4] = b"\x01\x02\x03\x04"
        mem.restore_image(image)
        assert bytes(mem.dram[PAGE : 2 * PAGE]) == b"\x5a" * PAGE  # the image, not the later write
        mem.discard_shared(1, 1)
        assert bytes(mem.dram[PAGE : 2 * PAGE]) == bytes(PAGE)
        mem.restore_image(image)
        assert bytes(mem.dram[PAGE : 2 * PAGE]) == b"\x5a" * PAGE
        image.close()
    finally:
        mem.close()


def test_snapshot_refuses_an_unanswered_exit() -> None:
    """A snapshot between an exit and its completion is refused (KVM_RUN completes the exit
    first); after the next run it is taken."""
    with testbed.Vm(memory=MEMORY) as vm:
        vcpu = vm.load(GUESTS_DIR / "conversions.s")
        exit = vcpu.run()
        with pytest.raises(SnapshotError, match="exit unanswered"):
            vm.snapshot()
        vm.handle(exit)


def test_restore_refuses_another_vm_and_closed_snapshots() -> None:
    """A snapshot restores only into its own VM, not once closed, and not into a closed VM."""
    with testbed.Vm(memory=MEMORY) as a, testbed.Vm(memory=MEMORY) as b:
        a.load(GUESTS_DIR / "exceptions_user.s")
        b.load(GUESTS_DIR / "exceptions_user.s")
        snap = a.snapshot()
        with pytest.raises(SnapshotError, match="only into the machine it was taken from"):
            b.restore(snap)
        a.close()
        with pytest.raises(MachineClosedError):
            a.restore(snap)
        snap.close()
        with pytest.raises(SnapshotError, match="closed"):
            b.restore(snap)


@pytest.mark.parametrize("vm_type", ["default", "sev-snp"])
def test_run_guest_reuse_reports_as_a_fresh_run(vm_type: str) -> None:
    """run_guest(reuse=True) reports what a fresh run reports, and the second such run reuses
    the pooled machine instead of booting one."""
    POOL.clear()
    options = VmOptions(vm_type=vm_type, memory=MEMORY)
    fresh = report_of(testbed.run_guest(GUESTS_DIR / "conversions.s", options))
    assert report_of(testbed.run_guest(GUESTS_DIR / "conversions.s", options, reuse=True)) == fresh
    hits = POOL.hits
    for _ in range(2):
        assert report_of(testbed.run_guest(GUESTS_DIR / "conversions.s", options, reuse=True)) == fresh
    assert POOL.hits == hits + 2
    POOL.clear()
    assert POOL.idle == 0


def test_pool_keys_separate_configurations() -> None:
    """Machines are shared only by the same program and options (the timeout aside); a
    traced run is never pooled."""
    from testbed.machine import build_program

    a = VmOptions(memory=MEMORY)
    program = build_program(GUESTS_DIR / "conversions.s", a)
    assert pool_key(program, a) == pool_key(program, VmOptions(memory=MEMORY, timeout=3))
    assert pool_key(program, a) != pool_key(program, VmOptions(memory=MEMORY, vm_type="sev"))
    assert pool_key(program, a) != pool_key(program, VmOptions(memory=MEMORY, seed=7))
    with open("/dev/null", "w", encoding="utf-8") as sink:
        assert pool_key(program, VmOptions(memory=MEMORY, trace=sink)) is None


@pytest.mark.parametrize("vm_type", ["sev", "sev-snp"])
def test_attributes_made_shared_in_whole_pages_of_the_array_come_back_shared(vm_type: str) -> None:
    """On a VM whose attributes start private (a copy-on-write mapping of a file of 0x01 bytes),
    a 16 MiB run made shared fills whole pages of the attribute array with zeros: restoring a
    snapshot of that keeps them shared (MADV_DONTNEED alone would read the file's 0x01 again)."""
    with testbed.Vm(vm_type=vm_type, memory="64M") as vm:
        vm.load(GUESTS_DIR / "conversions.s")
        vm.set_memory_attributes(16 << 20, 16 << 20, private=False)
        snapshot = vm.snapshot()
        vm.set_memory_attributes(16 << 20, 16 << 20, private=True)
        vm.restore(snapshot)
        assert not vm.is_private(16 << 20) and not vm.is_private(31 << 20) and vm.is_private(40 << 20)


def test_a_snapshot_is_not_restored_after_a_hotplug_and_a_hotplugged_machine_is_not_pooled() -> None:
    """Memory hotplug grows guest memory, which a snapshot does not hold: restoring one taken
    before is a SnapshotError (README), and a machine hotplugged under load(reuse=True) is not
    handed to the next VM of the boot configuration."""
    from testbed.vmm.hotplug import hotplug

    options = {"vm_type": "sev", "memory": 8 << 20, "max_memory": 64 << 20,
               "defines": {"BOOT_MEM": 8 << 20, "DONATED": 0}}
    with testbed.Vm(**options) as vm:
        vm.load(GUESTS_DIR / "donate_hotplug.s")
        snapshot = vm.snapshot()
        hotplug(vm.machine, 64 << 20)
        with pytest.raises(SnapshotError, match="memory hotplug"):
            vm.restore(snapshot)
    with testbed.Vm(**options) as vm:
        vm.load(GUESTS_DIR / "donate_hotplug.s", reuse=True)
        hotplug(vm.machine, 64 << 20)
    with testbed.Vm(**options) as vm:
        vm.load(GUESTS_DIR / "donate_hotplug.s", reuse=True)
        assert vm.machine.memory.size == 8 << 20


@pytest.mark.parametrize("tracker", ["bitmap", "ranges", "tree", "native-bitmap", "native-ranges", "native-tree"])
def test_a_trackers_ranges_are_restored(tracker: str) -> None:
    """A restore gives back the tracker's ranges of the snapshot, for every tracker: the native ones
    keep them in C and the bitmap in a bitarray, out of the walk's sight, and save and restore them
    themselves; the others are restored by the walk."""
    with testbed.Vm(vm_type="sev-snp", memory=MEMORY, tracker=tracker) as vm:
        vcpu = vm.load(GUESTS_DIR / "conversions.s")
        at_boot = vm.shared_ranges()
        snapshot = vm.snapshot()
        run_report(vm, vcpu, 30.0)
        assert vm.shared_ranges() != at_boot
        vm.restore(snapshot)
        assert vm.shared_ranges() == at_boot
