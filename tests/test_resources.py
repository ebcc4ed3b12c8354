"""Host resources a run holds are released, and a guest cannot make them grow without bound.

1. A machine releases its emulator and all guest memory on close() (and as a context manager);
   fifty machines in one process leave resident memory where one machine would.
2. A machine that is never closed is garbage-collected: no reference cycle hides from the
   collector (the C exit object reports its handler, a bound method of the vCPU).
3. A closed machine refuses to run with a clear error instead of touching freed memory.
4. A guest that keeps generating code on SEV-ES keeps the vCPU's intercepted-site code hooks
   bounded, and interception stays exact across the resets that bound them.
5. A spinning guest ends within a second of its timeout, and a clean end of a run (HLT, the
   timeout) is not turned into a fault. The timeout is the process's one watchdog thread
   (hw/watchdog.py): a run starts no thread, a later run is never stopped for an earlier
   deadline, and close() leaves nothing armed.
6. A guest in an exit loop keeps the report bounded: first and last REPORT_WINDOW entries,
   the rest counted; the trace still has every exit.
Tests 4 and 6 lower the bound they test so that it is reached in a fraction of a second.
"""

from __future__ import annotations

import gc
import io
import json
import os
import threading
import time
import weakref

import pytest
import unicorn
from unicorn import unicorn_const as ucc

from testbed.errors import MachineClosedError
from testbed.hw import cpu as cpu_module
from testbed.hw.watchdog import WATCHDOG, Alarm, Watchdog
from testbed.machine import GUESTS_DIR, Machine, VmOptions, build_program, run_guest
from testbed.vmm import vmm as vmm_module
from testbed.x86 import PAGE_SIZE, Reg

PAGE = os.sysconf("SC_PAGE_SIZE")

# Touches every 16th page from GUEST_FREE_GPA to the end of memory, so that a machine holds
# resident guest memory beyond what boot touches (the backings are zero-filled lazily).
TOUCH_GUEST = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rcx, GUEST_MEM_SIZE
guest_touch:
    mov byte ptr [rdi], 1
    add rdi, 16 * 4096
    cmp rdi, rcx
    jb guest_touch
    GUEST_DONE
"""


def _native_threads() -> int:
    """Threads of this process as the kernel counts them (Unicorn's own threads included)."""
    return len(os.listdir("/proc/self/task"))


def _rss() -> int:
    """Resident set size now (not the peak), in bytes."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


def _touch_options(vm_type: str, memory: int) -> VmOptions:
    return VmOptions(vm_type=vm_type, memory=memory, timeout=60, seed=1)


def _run_touch(vm_type: str, memory: int) -> None:
    options = _touch_options(vm_type, memory)
    with Machine(build_program("<touch>", options, text=TOUCH_GUEST), options) as machine:
        report = machine.run()
    assert report.outcome == "done", report.detail


def _footprint(vm_type: str, memory: int) -> int:
    """Resident bytes one live machine of this kind adds after its run."""
    options = _touch_options(vm_type, memory)
    program = build_program("<touch>", options, text=TOUCH_GUEST)
    before = _rss()
    with Machine(program, options) as machine:
        assert machine.run().outcome == "done"
        return _rss() - before


def test_fifty_machines_keep_resident_memory_at_one_machine() -> None:
    """Fifty closed machines (default and SEV, 8 MiB and 64 MiB) grow RSS by less than one live machine holds."""
    kinds = [("default", 8 << 20), ("sev", 8 << 20), ("default", 64 << 20)]
    for vm_type, memory in kinds:  # warm the caches (assembler, calibration, imports)
        _run_touch(vm_type, memory)
    one_machine = max(_footprint(vm_type, memory) for vm_type, memory in kinds)
    assert one_machine >= 2 << 20, f"a live machine adds only {one_machine} bytes: the test touches too little"
    gc.collect()
    before = _rss()
    threads, native = threading.active_count(), _native_threads()
    gc.disable()  # only close() may release anything
    try:
        for i in range(50):
            vm_type, memory = kinds[2] if i % 10 == 0 else kinds[i % 2]
            _run_touch(vm_type, memory)
        grown = _rss() - before
    finally:
        gc.enable()
    assert grown <= one_machine, f"RSS grew {grown >> 10} KiB over 50 machines; one machine holds {one_machine >> 10}"
    assert (threading.active_count(), _native_threads()) <= (threads, native), "threads grew over 50 machines"
    assert WATCHDOG.armed == 0  # closed machines leave nothing armed


def _mappings_and_fds() -> tuple[int, int]:
    with open("/proc/self/maps", encoding="ascii") as f:
        maps = sum(1 for _ in f)
    return maps, len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("vm_type", ["default", "sev", "sev-snp", "tdx"])
def test_a_closed_machine_kept_alive_holds_no_mapping_or_fd(vm_type: str) -> None:
    """close() unmaps every per-frame array (memory owner/present, RMP, memory attributes with
    their file descriptor, dirty bitmap, the vCPU's code tables) at once: twenty closed machines
    still referenced (as a test harness keeps them) add no mapping and no fd."""
    vendor = "intel" if vm_type == "tdx" else "amd"
    options = VmOptions(vm_type=vm_type, vendor=vendor, memory=8 << 20, timeout=60, seed=1)
    program = build_program("<touch>", options, text=TOUCH_GUEST)
    kept: list[Machine] = []

    def one() -> None:
        with Machine(program, options) as machine:
            assert machine.run().outcome == "done"
        kept.append(machine)

    one()
    gc.collect()
    before = _mappings_and_fds()
    for _ in range(20):
        one()
    gc.collect()
    maps, fds = _mappings_and_fds()
    assert (maps - before[0], fds - before[1]) <= (2, 0), f"20 closed machines: +{maps - before[0]} mappings, " \
                                                          f"+{fds - before[1]} fds"


@pytest.mark.parametrize("path", ["fastexit", "ctypes"])
def test_unclosed_machine_is_garbage_collected(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """A machine dropped without close() is collected, its vCPU and memory with it (no hidden cycle)."""
    if path == "ctypes":
        monkeypatch.setenv("TESTBED_NO_FASTEXIT", "1")
    else:
        monkeypatch.delenv("TESTBED_NO_FASTEXIT", raising=False)
    options = VmOptions(vm_type="sev", memory=8 << 20)
    machine = Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options)
    assert machine.run().outcome == "done"
    refs: list[weakref.ref[object]] = [weakref.ref(machine), weakref.ref(machine.cpu), weakref.ref(machine.memory)]
    del machine
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
    assert gc.garbage == []


def test_fastexit_reports_its_handler_to_the_collector() -> None:
    """The C exit object is tracked by the collector and lists its handler (the vCPU's bound method)."""
    if cpu_module._fastexit is None:
        pytest.skip("the C fast path is not built")
    options = VmOptions(memory=8 << 20)
    with Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options) as machine:
        fastexit = machine.cpu._fastexit
        if fastexit is None:
            pytest.skip("the C fast path is disabled (TESTBED_NO_FASTEXIT)")
        assert gc.is_tracked(fastexit)
        assert any(getattr(r, "__self__", None) is machine.cpu for r in gc.get_referents(fastexit))
    assert gc.get_referents(fastexit) == []  # close() dropped the handler
    with pytest.raises(RuntimeError, match="after close"):
        fastexit.write2(0, 0)


def test_closed_machine_refuses_use_with_a_clear_error() -> None:
    """After close() (idempotent) run, boot_to, register and memory access raise MachineClosedError."""
    options = VmOptions(memory=8 << 20)
    program = build_program(GUESTS_DIR / "hypercall_insn.s", options)
    with Machine(program, options) as machine:
        report = machine.run()
    assert machine.closed and machine.cpu.closed and machine.memory.closed
    machine.close()
    assert report.outcome == "done" and report.to_json()["outcome"] == "done"  # the report outlives it
    with pytest.raises(MachineClosedError, match="closed"):
        machine.run()
    with pytest.raises(MachineClosedError):
        machine.boot_to(program.symbols["guest_main"])
    with pytest.raises(MachineClosedError):
        machine.cpu.read_reg(Reg.RAX)
    with pytest.raises(MachineClosedError):
        machine.cpu.write_reg(Reg.RIP, 0)
    with pytest.raises(MachineClosedError):
        machine.memory.host_view().read(0x1000, 8)


def test_unicorn_binding_closes_through_its_finalizer() -> None:
    """Canary: the binding's Uc keeps a weakref.finalize that runs uc_close once (close() calls it)."""
    uc = unicorn.Uc(ucc.UC_ARCH_X86, ucc.UC_MODE_64)
    release = getattr(uc, "_Uc__finalizer", None)
    assert isinstance(release, weakref.finalize) and release.alive
    release()
    assert not release.alive


# Writes PAGES pages of code at GUEST_FREE_GPA, twice over, and runs each: RDMSR of SEV_STATUS
# (a site the hardware must intercept: Unicorn would read 0) and RET, then SITES bytes of
# 0xEC (`in al, dx`, an intercepted site on SEV-ES) that never run. R14 sums the MSR values.
REWRITE_GUEST = """
guest_main:
    xor r14, r14
    mov r13, 2
guest_pass:
    mov r12, GUEST_FREE_GPA
    mov r15, PAGES
guest_page:
    mov rdi, r12
    mov rax, 0xc3320fc0010131b9
    mov qword ptr [rdi], rax
    add rdi, 8
    mov al, 0xec
    mov rcx, SITES
    rep stosb
    call r12
    add r14, rax
    add r12, 4096
    dec r15
    jnz guest_page
    dec r13
    jnz guest_pass
    GUEST_ASSERT_EQ r14, EXPECTED
    GUEST_DONE
"""


def test_code_generating_guest_keeps_site_hooks_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """On SEV-ES, code written and run page after page keeps site hooks bounded; every RDMSR is still intercepted."""
    assert cpu_module.MAX_SITE_HOOKS <= 8192  # the real bound: small enough for Unicorn's hook lists
    monkeypatch.setattr(cpu_module, "MAX_SITE_HOOKS", 1024)  # the same mechanism, reached sooner
    pages, sites = 8, 600  # 9,600 sites over the run: far beyond the bound
    sev_status = 0b11  # SEV | SEV-ES
    options = VmOptions(vm_type="sev-es", memory=8 << 20, timeout=60, seed=1,
                        defines={"PAGES": pages, "SITES": sites, "EXPECTED": 2 * pages * sev_status})
    with Machine(build_program("<rewrite>", options, text=REWRITE_GUEST), options) as machine:
        report = machine.run()
        cpu = machine.cpu
        assert report.outcome == "done", report.detail
        assert cpu.site_hook_resets >= 1, "the bound was never reached: the test proves nothing"
        assert cpu.site_hooks_peak <= cpu_module.MAX_SITE_HOOKS + PAGE_SIZE, cpu.site_hooks_peak
        assert cpu.site_hook_count <= cpu_module.MAX_SITE_HOOKS + PAGE_SIZE


@pytest.mark.parametrize("vm_type", ["default", "sev-es"])
def test_spinning_guest_ends_within_a_second_of_its_timeout(vm_type: str) -> None:
    """A guest that never finishes is stopped at its timeout: run() returns well within a second of it."""
    options = VmOptions(vm_type=vm_type, memory=8 << 20, timeout=0.1)
    with Machine(build_program(GUESTS_DIR / "cli_spin.s", options), options) as machine:
        start = time.monotonic()
        report = machine.run()
        elapsed = time.monotonic() - start
    assert report.outcome == "timeout"
    assert 0.1 <= elapsed < 1.1, f"run() took {elapsed:.2f} s with a 0.1 s timeout"


class _ThreadCountingHypervisor:
    """Stands between the hardware and KVM and counts the process's threads at each exit."""

    def __init__(self, kvm: object) -> None:
        self.kvm = kvm
        self.seen: list[int] = []

    def vmexit(self, code: int, info1: int, info2: int) -> None:
        self.seen.append(_native_threads())
        self.kvm.vmexit(code, info1, info2)  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["fastexit", "ctypes"])
def test_a_run_starts_no_thread(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Inside a run the process has the threads it had outside it: no timer thread per run (Unicorn's timeout)."""
    if path == "ctypes":
        monkeypatch.setenv("TESTBED_NO_FASTEXIT", "1")
    else:
        monkeypatch.delenv("TESTBED_NO_FASTEXIT", raising=False)
    options = VmOptions(memory=8 << 20, timeout=30)
    with Machine(build_program(GUESTS_DIR / "hypercall_insn.s", options), options) as machine:
        spy = _ThreadCountingHypervisor(machine.kvm_vcpu)
        machine.cpu.hypervisor = spy  # type: ignore[assignment]
        report = machine.run()
        outside = _native_threads()
    assert report.outcome == "done", report.detail
    assert len(spy.seen) >= 3, "the guest made too few exits: the test proves nothing"
    assert set(spy.seen) == {outside}, (spy.seen, outside)
    assert WATCHDOG.thread is not None and WATCHDOG.thread.daemon


def test_watchdog_stops_a_run_at_its_deadline_and_only_that_run() -> None:
    """A fired alarm names its arming: the next arming reads no timeout and an earlier deadline never stops it."""
    watchdog = Watchdog()
    stops: list[float] = []
    alarm = Alarm(lambda: stops.append(time.monotonic()))
    start = time.monotonic()
    watchdog.arm(alarm, start + 0.05)
    while not stops and time.monotonic() < start + 5:
        time.sleep(0.01)
    assert stops and stops[0] - start < 1.0 and alarm.timed_out
    watchdog.disarm(alarm)
    count = len(stops)
    time.sleep(0.1)  # a disarmed alarm is not stopped again (its deadline was 0.05 s)
    assert len(stops) == count
    # A run that ends before its deadline, then a later run with a later deadline: the first
    # deadline passes during the second run, which must not be stopped or read as timed out.
    watchdog.arm(alarm, time.monotonic() + 0.05)
    watchdog.disarm(alarm)
    watchdog.arm(alarm, time.monotonic() + 30)
    assert not alarm.timed_out  # a new generation
    time.sleep(0.1)  # the first deadline (0.05 s) passes
    assert len(stops) == count and not alarm.timed_out
    watchdog.release(alarm)
    assert watchdog.armed == 0 and alarm.stop is None


def test_watchdog_repeats_a_stop_until_the_run_ends() -> None:
    """A fired alarm is stopped again while armed (a stop landing between two engine calls is reset by the next)."""
    watchdog = Watchdog()
    stops: list[float] = []
    alarm = Alarm(lambda: stops.append(time.monotonic()))
    watchdog.arm(alarm, time.monotonic())
    deadline = time.monotonic() + 5
    while len(stops) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    watchdog.disarm(alarm)
    assert len(stops) >= 3


def test_close_releases_the_watchdog() -> None:
    """After close() the watchdog holds nothing of the machine: nothing armed, the engine's stop dropped."""
    options = VmOptions(memory=8 << 20, timeout=0.1)
    with Machine(build_program(GUESTS_DIR / "cli_spin.s", options), options) as machine:
        assert machine.run().outcome == "timeout"
        alarm = machine.cpu._alarm
        assert alarm.timed_out and alarm.stop is not None
    assert WATCHDOG.armed == 0 and alarm.stop is None


@pytest.mark.parametrize("vm_type", ["default", "sev-es"])
def test_clean_end_of_a_run_raises_no_spurious_fault(vm_type: str) -> None:
    """HLT ends the run as KVM_EXIT_HLT (no in-kernel LAPIC: x86.c __kvm_emulate_halt), and a timeout delivers nothing.

    Canary for the hardware model: Unicorn probes a fetch of `until` - 1 after every run unless
    exits are enabled with none set (hw/unicorn_binding.py); that probe used to come back as a #PF at
    0xfffffffffffff000 that replaced the HLT exit and was delivered into a timed-out guest."""
    report = run_guest("<hlt>", VmOptions(vm_type=vm_type, memory=8 << 20, timeout=5),
                       text="guest_main:\n    hlt\n    GUEST_DONE\n")
    assert report.user_exits[-1] == {"reason": "hlt"}
    assert (report.outcome, report.exception) == ("timeout", None)
    assert report.detail == "vCPU halted with nothing to wake it (no interrupts are modelled)"
    trace = io.StringIO()
    options = VmOptions(vm_type=vm_type, memory=8 << 20, timeout=0.1, trace=trace)
    report = run_guest(GUESTS_DIR / "cli_spin.s", options)
    assert report.outcome == "timeout"
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    assert [e for e in events if e["event"] == "fault" or (e["event"] == "deliver" and e["vector"] == 14)] == []


EXIT_LOOP_GUEST = """
guest_main:
    xor eax, eax
    mov dx, 0x80
guest_out:
    out dx, eax
    inc eax
    cmp eax, OUTS
    jb guest_out
    xor r12, r12
guest_sync:
    GUEST_SYNC r12
    inc r12
    cmp r12, SYNCS
    jb guest_sync
    GUEST_DONE
"""


def test_exit_loop_keeps_the_report_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """user_exits and ucalls keep their first and last REPORT_WINDOW entries and count the rest; the trace has all."""
    assert vmm_module.REPORT_WINDOW == 1000  # as the README documents
    monkeypatch.setattr(vmm_module, "REPORT_WINDOW", 50)  # the same window, reached sooner
    window = vmm_module.REPORT_WINDOW
    outs, syncs = 2 * window + 70, 2 * window + 30
    trace = io.StringIO()
    options = VmOptions(memory=8 << 20, timeout=60, trace=trace, defines={"OUTS": outs, "SYNCS": syncs})
    report = run_guest("<exits>", options, text=EXIT_LOOP_GUEST)
    assert report.outcome == "done", report.detail
    io_exits = outs + syncs + 1  # each ucall is an OUT to the ucall port
    assert report.exit_counts["io"] == io_exits
    assert len(report.user_exits) == 2 * window
    assert report.user_exits_dropped == io_exits - 2 * window
    values = [e["value"] for e in report.user_exits[:window]]
    assert values == list(range(window))  # the first exits, in order
    assert report.user_exits[-1]["port"] == 0x1000  # the last: GUEST_DONE's ucall
    assert len(report.ucalls) == 2 * window
    assert report.ucalls_dropped == syncs + 1 - 2 * window
    assert report.syncs()[:3] == [0, 1, 2] and report.syncs()[-1] == syncs - 1
    assert report.ucalls[-1]["cmd"] == "done"
    out = report.to_json()
    assert (out["user_exits_dropped"], out["ucalls_dropped"]) == (report.user_exits_dropped, report.ucalls_dropped)
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    assert sum(1 for e in events if e["layer"] == "vmm" and e["event"] == "exit") == io_exits
