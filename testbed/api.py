"""The host API: a KVM-selftests-style Vm and Vcpu over the testbed's layers.

    import testbed
    with testbed.Vm(vm_type="sev-snp", memory="16M") as vm:
        vcpu = vm.load("guest.s", defines={"N": 4})   # assembled, booted to guest_main
        uc = vcpu.run_to_ucall()                     # Ucall(cmd="sync", args=[...])
        exit = vcpu.run()                            # one user exit, unanswered
        uc = vm.handle(exit)                         # the default VMM's answer

`Vcpu.run` is KVM_RUN: it returns each user exit (kvm/uapi.py types) to the caller, which
answers in the exit's reply slot (or passes it to `Vm.handle`, the default VMM); the next run
completes the exit with that answer. A run that ends — a failed GUEST_ASSERT, an unhandled
guest exception, a shutdown, a termination request, KVM_RUN failing, the time running out —
raises a `VmExitError` subclass carrying the outcome `testbed run --json` reports.

`run_guest` and `testbed run` are this loop plus the report (`run_report`).
"""

from __future__ import annotations

import dataclasses
import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.errors import TestbedError, UsageError
from testbed.hw.exits import RunStop, StopReason
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KvmExit
from testbed.vmm.ucall import GuestFailure, Ucall
from testbed.vmm.vmm import RunReport, VmEnd

if TYPE_CHECKING:
    from testbed.asm import Program
    from testbed.kvm.migration import KvmVcpuState, ReceiveContext, SendContext, TransportSession
    from testbed.machine import Machine, VmOptions
    from testbed.snapshot import Snapshot

__all__ = [
    "GuestAssertionError",
    "GuestExceptionError",
    "KvmRunError",
    "Vcpu",
    "Vm",
    "VmExitError",
    "VmTimeoutError",
    "run_guest",
    "run_report",
]


# ----------------------------------------------------------------------------- errors
class VmExitError(TestbedError):
    """The guest's run ended: `outcome` and `detail` as `testbed run --json` reports them
    ("shutdown", "terminated", "internal_error", "memory_fault", "bad_ucall", ...), `exit` the
    exit that ended it (None when none did), `info` the report's keys for it (`termination`,
    `internal`, `bad_ucall`, ...). str() is the detail."""

    def __init__(self, outcome: str, detail: str, exit: KvmExit | None = None,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(f"{outcome}: {detail}" if detail else outcome)
        self.outcome = outcome
        self.detail = detail
        self.exit = exit
        self.info = dict(info or {})


class GuestAssertionError(VmExitError):
    """A GUEST_ASSERT* or GUEST_FAIL failed in the guest (outcome guest_assert).

    `file`, `line`: where the assert is written; `values`: the values it compared; `failure`
    the whole GuestFailure (message, caller). str() is "file:line: ..." as the selftests'
    REPORT_GUEST_ASSERT prints it."""

    def __init__(self, failure: GuestFailure, ucall: Ucall | None = None) -> None:
        super().__init__("guest_assert", str(failure))
        self.failure = failure
        self.file = failure.file
        self.line = failure.line
        self.values = failure.values
        self.ucall = ucall

    def __str__(self) -> str:
        return str(self.failure)


class GuestExceptionError(VmExitError):
    """The guest took an exception it had no handler for (outcome unhandled_exception);
    `exception` holds vector, error_code (None for a vector that pushes none), rip (cr2 for a
    #PF, exit_reason for a #VE; file, line, symbol, offset where rip is in the program), also as
    `vector`, `error_code`, `exit_reason`, `rip`."""

    def __init__(self, detail: str, exception: dict[str, Any]) -> None:
        super().__init__("unhandled_exception", detail, info={"exception": exception})
        self.exception = exception
        self.vector: int = exception.get("vector", -1)
        self.error_code: int | None = exception.get("error_code")
        self.exit_reason: int | None = exception.get("exit_reason")
        self.rip: int = exception.get("rip", 0)


class VmTimeoutError(VmExitError):
    """The vCPU did not exit to userspace within the timeout (outcome timeout). `halted`: KVM
    had the vCPU halted with nothing to wake it (a TD's TDVMCALL<HLT>), why KVM_RUN blocked."""

    def __init__(self, outcome: str, detail: str, exit: KvmExit | None = None,
                 info: dict[str, Any] | None = None, *, halted: str = "") -> None:
        super().__init__(outcome, detail, exit, info)
        self.halted = halted


class KvmRunError(VmExitError):
    """KVM_RUN failed with -1/`errno` and no exit reason (outcome kvm_run_error): an exit
    handler returned -errno, e.g. an SEV-ES VMGEXIT KVM rejects. The VM cannot run on."""

    def __init__(self, errno: int, detail: str) -> None:
        super().__init__("kvm_run_error", detail, info={"errno": errno})
        self.errno = errno


def _ucall_or_raise(result: Ucall | VmEnd | None) -> Ucall | None:
    """The default VMM's answer to one exit as the API gives it: the ucall (or None), or the
    end of the run raised as its VmExitError."""
    if isinstance(result, VmEnd):
        raise _raise_for(result)
    return result


def _raise_for(end: VmEnd) -> VmExitError:
    """The error for a run the default VMM ended."""
    info = dict(end.info)
    if end.outcome == "guest_assert":
        ucall = info.get("ucall")
        failure = ucall.failure if isinstance(ucall, Ucall) else None
        if failure is None:
            failure = GuestFailure(file="<guest>", line=0, values=(), message=end.detail)
        return GuestAssertionError(failure, ucall if isinstance(ucall, Ucall) else None)
    if end.outcome == "unhandled_exception":
        return GuestExceptionError(end.detail, info.get("exception", {}))
    if end.outcome == "kvm_run_error":
        return KvmRunError(info.get("errno", 0), end.detail)
    if end.outcome == "timeout":
        return VmTimeoutError(end.outcome, end.detail, end.exit, info)
    return VmExitError(end.outcome, end.detail, end.exit, info)


def _check_bool(name: str, value: object) -> None:
    """A flag argument must be a bool: a truthy string or number is a mistake, not a yes."""
    if not isinstance(value, bool):
        raise UsageError(f"{name} {value!r}: expected True or False, not {type(value).__name__}")


def _timeout(value: float | None, default: float) -> float:
    if value is None:
        return default
    from testbed.options import parse_timeout

    return parse_timeout(value)


# ------------------------------------------------------------------------------- Vm
class Vm:
    """One VM: `Vm(vm_type="sev-snp", memory="16M", ...)` takes VmOptions' fields with the
    same spellings (or a VmOptions as its one positional argument). A context manager: the
    end of the `with` (or close()) releases the emulator and all guest memory.

    The machine is built by `load`, which assembles the guest and boots it; the memory
    accessors need a loaded guest."""

    def __init__(self, options: VmOptions | None = None, /, **fields: Any) -> None:
        from testbed.machine import VmOptions

        if options is not None:
            if fields:
                raise UsageError("Vm(): pass a VmOptions or keyword options, not both")
            if not isinstance(options, VmOptions):
                raise UsageError(f"Vm(): expected a VmOptions, not {type(options).__name__}")
            self.options = dataclasses.replace(options, defines=dict(options.defines))
        else:
            known = {f.name for f in dataclasses.fields(VmOptions)}
            unknown = sorted(set(fields) - known)
            if unknown:
                raise UsageError(f"Vm(): unknown option {unknown[0]!r}; the options are {', '.join(sorted(known))}")
            self.options = VmOptions(**fields)
        self.options.validate()
        self._machine: Machine | None = None
        self._vcpu: Vcpu | None = None
        self._closed = False
        #: load(reuse=True): (pool key, boot snapshot, program); close() hands the machine back
        self._pooled: tuple[tuple[Any, ...], Snapshot, Program] | None = None

    @classmethod
    def attach(cls, machine: Machine) -> tuple[Vm, Vcpu]:
        """A Vm and its Vcpu over a machine built (and maybe booted) already: the run picks up
        where the vCPU stands. Closing this Vm closes the machine."""
        vm = cls.__new__(cls)
        vm.options = machine.options
        vm._machine = machine
        vm._closed = False
        vm._pooled = None
        vm._vcpu = Vcpu(vm, machine)
        return vm, vm._vcpu

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the machine (emulator, hooks, guest memory). Idempotent. A machine loaded
        with `reuse=True` goes back to the process's pool instead (testbed/snapshot.py)."""
        self._closed = True
        pooled, self._pooled = self._pooled, None
        if self._machine is not None:
            if pooled is not None:
                from testbed.snapshot import POOL

                POOL.release(pooled[0], self._machine, pooled[1], pooled[2])
            else:
                self._machine.close()

    @property
    def machine(self) -> Machine:
        """The composition root under this VM (hardware, KVM, VMM objects), for inspection."""
        if self._closed:
            from testbed.errors import MachineClosedError

            raise MachineClosedError("this VM is closed: its emulator and guest memory were released")
        if self._machine is None:
            raise UsageError("this VM has no guest yet: call vm.load(path) first")
        return self._machine

    # ------------------------------------------------------------------- loading
    def load(self, path: str | Path | None = None, *, text: str | None = None,
             defines: dict[str, int | str] | None = None, timeout: float | None = None,
             reuse: bool = False, force: bool = False) -> Vcpu:
        """Assemble the guest (`path`, relative to the current directory, or `text`, which `path`
        then only names) with the
        runtime, build the machine, boot the runtime to guest_main, and return the one vCPU,
        stopped there: the first run continues at guest_main. `defines` add to the options'.

        Exits during the boot are answered by the default VMM; a boot that ends raises the
        VmExitError for it. One guest per Vm: a second load is a UsageError.

        `reuse=True`: a fresh VM of the same configuration (program and options but the
        timeout) without the build and boot, when this process booted one before: a machine
        from the process's pool, restored to its boot snapshot (testbed/snapshot.py); close()
        gives it back. The first such load boots and snapshots as usual.

        The control plane (testbed/control_plane.py) refuses a legacy image (GUEST_IMAGE_LEGACY:
        no KVM_HC_MAP_GPA_RANGE) on a guest_memfd VM type with ControlPlaneError (a UsageError)
        before anything is built; `force=True` launches it anyway."""
        from testbed.control_plane import check_launch
        from testbed.machine import Machine, build_program
        from testbed.options import parse_defines
        from testbed.snapshot import POOL, pool_key, take

        if self._closed:
            raise UsageError("this VM is closed")
        if self._machine is not None:
            raise UsageError("this VM already holds a guest: one load per Vm (use a new Vm)")
        if path is None and text is None:
            raise UsageError("vm.load(): give a guest source path, or text= (path then only names it)")
        options = self.options
        if defines:
            options = dataclasses.replace(options, defines={**options.defines, **parse_defines(defines)})
        source = "<text>" if path is None else path
        program = build_program(source, options, text=text)
        if "guest_main" not in program.symbols:
            raise UsageError(f"{source}: the guest defines no guest_main")
        check_launch(program, options.vm_type, str(source), force=force)
        key = pool_key(program, options) if reuse else None
        if key is not None and (pooled := POOL.acquire(key)) is not None:
            self._machine, snapshot = pooled
            self._machine.options = options  # the same but for the timeout
            self._pooled = (key, snapshot, program)
            self._vcpu = Vcpu(self, self._machine)
            return self._vcpu
        self._machine = Machine(program, options)
        self._vcpu = Vcpu(self, self._machine)
        self._vcpu._boot(program.symbols["guest_main"], _timeout(timeout, options.timeout))
        if key is not None:
            self._pooled = (key, take(self._machine), program)
        return self._vcpu

    # ------------------------------------------------------------- snapshots
    def snapshot(self) -> Snapshot:
        """The machine's state now (CPU, memory, hardware, KVM and VMM state), restorable into
        this VM with `restore` any number of times. Between runs only: after `load`, or after a
        run whose exit was answered and completed (SnapshotError otherwise). close() the
        snapshot (or drop it) to free its memory images."""
        from testbed.snapshot import SnapshotError, take

        if self._vcpu is not None and self._vcpu._early_exit is not None:
            raise SnapshotError("the vCPU has an exit unanswered (returned by complete_io): answer it and run "
                                "the vCPU once more before taking a snapshot")
        return take(self.machine)

    def restore(self, snapshot: Snapshot) -> None:
        """Put the VM back into the state `snapshot` saw: what a fresh VM at that point would
        hold (the report of a later run starts from the snapshot's). Only into the VM the
        snapshot was taken from; not from inside a run."""
        from testbed.snapshot import restore

        restore(self.machine, snapshot)
        if self._vcpu is not None:
            self._vcpu._early_exit = None  # the snapshot had none (snapshot() refuses one)

    # ------------------------------------------------------------- host's view
    def read(self, gpa: int, n: int) -> bytes:
        """`n` bytes at `gpa` as the VMM sees them: plaintext of shared pages, ciphertext of a
        legacy SEV private page, and for a private page of a guest_memfd VM (sw-protected,
        sev-snp) an UnmappableMemoryError (README: Memory)."""
        self._check_gpa(gpa, n)
        return self.machine.memory.host_read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        """Write through the VMM's view (refused on a guest_memfd VM's private page and on an
        SNP guest-assigned page; on legacy SEV the guest then decrypts garbage)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"data {data!r:.40}: expected bytes, not {type(data).__name__}")
        self._check_gpa(gpa, len(data))
        self.machine.memory.host_write(gpa, bytes(data))

    def is_private(self, gpa: int) -> bool:
        """KVM's memory attribute of the page holding `gpa` (KVM_MEMORY_ATTRIBUTE_PRIVATE);
        False on VMs without memory attributes (default, sev-es)."""
        machine = self.machine
        self._check_gpa(gpa, 1)
        attrs = machine.kvm_vm.mem_attrs
        return attrs is not None and attrs.is_private(gpa >> 12)

    def set_memory_attributes(self, gpa: int, size: int, private: bool = True) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES on [gpa, gpa + size): the attribute only, as the selftests'
        vm_set_memory_attributes(); the VMM's tracker and memory are untouched. KvmIoctlError
        (EINVAL) for what KVM rejects (unaligned, wrapping, attributes the VM does not have)."""
        _check_bool("private", private)
        for name, value in (("gpa", gpa), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{name} {value!r}: expected an int, not {type(value).__name__}")
        self.machine.kvm_vm.set_memory_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)

    def guest_mem_fallocate(self, gpa: int, size: int, punch_hole: bool) -> None:
        """The selftests' vm_guest_mem_fallocate() on the guest_memfd pages of [gpa, gpa + size):
        allocating creates the private pages that do not exist yet (kvm_gmem_allocate, the
        ones that do keep their contents); with `punch_hole` (fallocate(PUNCH_HOLE)) the
        private pages are freed and KVM zaps them from stage 2 (kvm_gmem_punch_hole): a later
        private access faults in a fresh zeroed page - on SNP assigned but not validated, in a
        TD pending (hw gmem_invalidated). Nothing on other VM types. KvmIoctlError (EINVAL)
        for a length of 0 (vfs_fallocate) or an offset or length that is not page aligned
        (kvm_gmem_fallocate)."""
        _check_bool("punch_hole", punch_hole)
        self._check_gpa(gpa, size)
        if size <= 0 or gpa % 0x1000 or size % 0x1000:
            raise KvmIoctlError("fallocate(guest_memfd)", errno.EINVAL,
                                f"offset 0x{gpa:x} length 0x{size:x}: "
                                + ("a length of 0 (vfs_fallocate)" if size <= 0 else
                                   "not page aligned (kvm_gmem_fallocate)"))
        memory = self.machine.memory
        first, npages = gpa >> 12, size >> 12
        if not punch_hole:
            memory.materialise(first, npages, True)
            return
        ram = self.machine.gmem_ram
        if ram is not None:
            ram.discard_private(first, npages)

    def guest_mem_allocated(self, gpa: int) -> bool:
        """lseek(SEEK_DATA) on the guest_memfd at `gpa`'s page: whether its private page is
        allocated - what a VMM can learn of guest_memfd without reading it. False on VM types
        without guest_memfd."""
        self._check_gpa(gpa, 1)
        return self.machine.memory.private_allocated(gpa >> 12)

    def shared_ranges(self) -> list[tuple[int, int]]:
        """The VMM's shared-page tracker, exported as merged (gfn, npages) ranges."""
        vmm = self.machine.vmm
        return [(gfn, n) for gfn, n in vmm.shared_source.shared_ranges()]

    def memory_report(self) -> dict[str, Any] | None:
        """The pin accounting now (vmm/pinning.py; the report's `memory`): pinned and shared
        pages, their peaks and the samples so far; None on a VM type that pins nothing."""
        pinning = self.machine.pinning
        return pinning.to_json() if pinning is not None else None

    # ------------------------------------------------ migration (kvm/dirty_log.py, kvm/migration.py)
    def enable_dirty_logging(self, enabled: bool = True) -> None:
        """KVM_MEM_LOG_DIRTY_PAGES on the RAM slot: from now on every guest write to a page and
        every write KVM makes to guest memory sets the page's bit (writes through `vm.write`
        are userspace's, not logged). Enabling starts a clean log; False stops logging."""
        _check_bool("enabled", enabled)
        self.machine.kvm_vm.set_dirty_logging(enabled)

    def get_dirty_log(self, slot: int = 0) -> bytes:
        """KVM_GET_DIRTY_LOG of memslot `slot` (0: the boot RAM; a hotplugged slot has its own):
        one bit per 4 KiB page of the slot (bit i of byte j = the slot's page 8j + i), set for
        the pages written since the last call, which are write-protected again. KvmIoctlError
        (ENOENT) while logging is off. `testbed.kvm.dirty_log.dirty_pages(log)` lists them."""
        return self.machine.kvm_vm.get_dirty_log(slot)

    def clear_dirty_log(self, first_page: int, num_pages: int, bitmap: bytes, slot: int = 0) -> None:
        """KVM_CLEAR_DIRTY_LOG (with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled): clear and
        re-protect the pages of `bitmap` (bit 0 = the slot's page first_page, a multiple of 64)."""
        self.machine.kvm_vm.clear_dirty_log(first_page, num_pages, bitmap, slot)

    def send_start(self, session: TransportSession) -> SendContext:
        """KVM_SEV_SEND_START with the transport keys of `session`: the context whose
        send_update_data / send_vcpu_state / send_finish move this VM's private state out."""
        from testbed.kvm.migration import send_start

        return send_start(self.machine.kvm_vm, session)

    def receive_start(self, session: TransportSession) -> ReceiveContext:
        """KVM_SEV_RECEIVE_START on an incoming VM: receive_update_data / receive_vcpu_state /
        receive_finish put the source's private state in with this VM's own key."""
        from testbed.kvm.migration import receive_start

        return receive_start(self.machine.kvm_vm, session)

    def get_vcpu_state(self) -> KvmVcpuState:
        """KVM_GET_REGS/SREGS/MSRS-shaped: the vCPU's registers (None on SEV-ES/SNP, whose
        state only the firmware can read: send_vcpu_state) and KVM's own per-vCPU state."""
        from testbed.kvm.migration import get_vcpu_state

        return get_vcpu_state(self.machine.kvm_vcpu)

    def set_vcpu_state(self, state: KvmVcpuState) -> None:
        """KVM_SET_REGS/SREGS/MSRS-shaped (KvmIoctlError EINVAL for registers on SEV-ES/SNP)."""
        from testbed.kvm.migration import set_vcpu_state

        set_vcpu_state(self.machine.kvm_vcpu, state)

    def _check_gpa(self, gpa: int, size: int) -> None:
        mem = self.machine.memory
        for name, value in (("gpa", gpa), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"{name} {value!r}: expected an int, not {type(value).__name__}")
        if gpa < 0 or size < 0 or gpa + size > mem.size:
            raise UsageError(f"gpa 0x{gpa:x} + 0x{size:x} is outside guest memory (0x{mem.size:x} bytes)")

    # ---------------------------------------------------------- the default VMM
    def handle(self, exit: KvmExit) -> Ucall | None:
        """The default VMM's handling of `exit` (vmm/vmm.py handle_exit): fills the reply slot
        and returns the Ucall when the exit was one (sync or done), else None. An exit that ends
        the run raises its VmExitError (GuestAssertionError for a failed assert, ...)."""
        from testbed.kvm.uapi import EXIT_TYPES

        if not isinstance(exit, EXIT_TYPES):
            raise UsageError(f"vm.handle({exit!r}): expected an exit vcpu.run() returned, not {type(exit).__name__}")
        return _ucall_or_raise(self.machine.vmm.handle(exit))


# ----------------------------------------------------------------------------- Vcpu
class Vcpu:
    """The VM's one vCPU (KVM_CREATE_VCPU 0)."""

    def __init__(self, vm: Vm, machine: Machine) -> None:
        self.vm = vm
        self._machine = machine
        #: an exit a completion run by complete_io() raised (KVM_RUN with immediate_exit returns
        #: it instead of -EINTR): the next run returns it before entering the guest
        self._early_exit: KvmExit | None = None

    def _check_open(self) -> None:
        """MachineClosedError once the Vm is closed: a pooled machine (reuse=True) lives on
        and may serve another Vm, which this vCPU must not drive."""
        if self.vm._closed:
            from testbed.errors import MachineClosedError

            raise MachineClosedError("this vCPU's VM is closed: its emulator and guest memory were released")
        self._machine._check_open()

    def _boot(self, address: int, timeout: float) -> None:
        machine = self._machine
        machine.cpu.breakpoint = address
        try:
            if self._run_default(time.monotonic() + timeout, timeout, boot=True):
                return  # at the breakpoint
            end = machine.vmm.ended
            assert end is not None
            raise _raise_for(end)
        finally:
            machine.cpu.breakpoint = (1 << 64) - 1

    def _run_default(self, deadline: float, timeout: float, boot: bool = False) -> bool:
        """Run with every exit answered by the default VMM until the run ends (False) or, when
        booting, the breakpoint is reached (True). Internal fast path: the VMM answers inside
        KVM_RUN (KvmVcpu.run's `handled`), so the emulator is not stopped per exit."""
        vmm = self._machine.vmm

        def handled(exit: KvmExit) -> bool:
            vmm.handle(exit)
            return vmm.ended is None

        while vmm.ended is None:
            result = self._kvm_run(deadline, timeout, boot=boot, handled=handled)
            if isinstance(result, RunStop):
                return True
            if vmm.ended is None:
                vmm.handle(result)  # an exit KVM_RUN returned before the guest ran
        return False

    def _kvm_run(self, deadline: float, timeout: float, boot: bool = False,
                 handled: Callable[[KvmExit], bool] | None = None) -> KvmExit | RunStop:
        machine = self._machine
        self._check_open()
        if self._early_exit is not None:
            early, self._early_exit = self._early_exit, None
            return early
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VmTimeoutError("timeout", f"no exit within {timeout:g} s")
        try:
            result = machine.kvm_vcpu.run(remaining, handled)
        except KvmIoctlError as exc:
            # KVM_RUN returned -1/errno with no exit reason: the VM cannot run on.
            error = KvmRunError(exc.errno, str(exc))
            machine.vmm.finish(VmEnd(error.outcome, error.detail, {"errno": exc.errno}))
            raise error from None
        if isinstance(result, RunStop):
            if result.reason is StopReason.TIMEOUT:
                raise VmTimeoutError("timeout", f"no exit within {timeout:g} s", halted=result.detail)
            if result.reason is StopReason.EMULATOR_ERROR:
                end = machine.vmm.finish(VmEnd("internal_error", f"emulator: {result.detail}"))
                raise VmExitError(end.outcome, end.detail)
            if boot and result.detail == "breakpoint":
                return result
            end = machine.vmm.finish(VmEnd("internal_error", f"vCPU stopped without an exit: "
                                           f"{result.reason.value} {result.detail}".rstrip()))
            raise VmExitError(end.outcome, end.detail)
        return result

    def run(self, timeout: float | None = None) -> KvmExit:
        """KVM_RUN: complete the previous exit with what was written into its reply slot, run
        the guest to its next user exit and return it, unanswered (pass it to `vm.handle`, or
        answer it yourself). VmTimeoutError when no exit comes within `timeout` seconds (default
        the Vm's timeout); KvmRunError when KVM_RUN fails."""
        limit = _timeout(timeout, self._machine.options.timeout)
        result = self._kvm_run(time.monotonic() + limit, limit)
        assert not isinstance(result, RunStop)
        return result

    def inject_pending_event(self) -> None:
        """Make an event (an interrupt) pending, as KVM_INTERRUPT would: until the guest is next
        entered KVM sees kvm_vcpu_has_events(), so a TD's MapGPA in progress stops with RETRY at
        its next chunk (tdx.c tdx_complete_vmcall_map_gpa). The testbed delivers nothing: the
        event is consumed when the guest is entered."""
        self._check_open()
        self._machine.kvm_vcpu.inject_event()

    def complete_io(self) -> KvmExit | None:
        """KVM_RUN with kvm_run->immediate_exit = 1 (the selftests' vcpu_run_complete_io): the
        completion of the last exit runs with what userspace wrote into its reply slot and the
        guest is not entered, so the vCPU's state is consistent - RIP past a port I/O
        instruction - before it is read, saved or copied ("When KVM exits to userspace with
        KVM_EXIT_IO, KVM guarantees guest state is consistent only after userspace re-enters
        the kernel with KVM_RUN", lib/x86/processor.c vcpu_save_state). Returns None (KVM_RUN's
        -EINTR), or the exit the completion itself raised (the next step of a string I/O),
        which KVM_RUN returns instead; KvmRunError when the completion fails."""
        self._check_open()
        if self._early_exit is not None:
            return self._early_exit  # still unanswered: nothing to complete
        machine = self._machine
        try:
            again = machine.kvm_vcpu.complete_pending()
        except KvmIoctlError as exc:
            error = KvmRunError(exc.errno, str(exc))
            machine.vmm.finish(VmEnd(error.outcome, error.detail, {"errno": exc.errno}))
            raise error from None
        self._early_exit = again
        return again

    def run_to_ucall(self, timeout: float | None = None) -> Ucall:
        """Run, answering every exit with the default VMM, until the guest makes a ucall;
        complete its port I/O (complete_io, as the selftests' get_ucall does: the vCPU's state
        is then consistent, RIP past the OUT) and return it (cmd "sync" or "done"). A failed
        assert raises GuestAssertionError, an unhandled exception GuestExceptionError, any other
        end VmExitError; VmTimeoutError if no ucall comes within `timeout` seconds (default the
        Vm's timeout)."""
        limit = _timeout(timeout, self._machine.options.timeout)
        deadline = time.monotonic() + limit
        vmm = self._machine.vmm
        #: the exit the run stopped at, answered inside it: the default VMM's answer, or what
        #: it raised (raised here, out of KVM_RUN, as vm.handle would raise it)
        answered: list[tuple[KvmExit, Ucall | VmEnd | BaseException]] = []

        def handled(exit: KvmExit) -> bool:
            # KVM_RUN's internal fast path, as _run_default: an exit the default VMM answers
            # that is neither a ucall nor an end keeps the guest running, without the
            # emulator's stop and restart.
            try:
                result = vmm.handle(exit)
            except Exception as exc:  # not the emulator's: the VMM's, raised after KVM_RUN returns
                answered.append((exit, exc))
                return False
            if result is None:
                return True
            answered.append((exit, result))
            return False

        while True:
            result = self._kvm_run(deadline, limit, handled=handled)
            assert not isinstance(result, RunStop)
            if answered and answered[-1][0] is result:
                _, answer = answered.pop()
                if isinstance(answer, BaseException):
                    raise answer
                ucall = _ucall_or_raise(answer)
            else:
                ucall = self.vm.handle(result)  # an exit KVM_RUN returned before the guest ran
            if ucall is not None:
                self.complete_io()
                return ucall


# --------------------------------------------------------------------- the report
def run_report(vm: Vm, vcpu: Vcpu, timeout: float, started: float | None = None,
               budget: float | None = None) -> RunReport:
    """Run to the end with the default VMM and return the report (`testbed run --json`): the
    loop of vcpu.run() / vm.handle() until the guest is done or the run ends, within `timeout`
    seconds (`budget`: the whole run's, named in the timeout detail; `started`: its start)."""
    start = time.perf_counter() if started is None else started
    budget = timeout if budget is None else budget
    vmm = vm.machine.vmm
    try:
        # vcpu.run() / vm.handle() until the end, on the internal fast path (Vcpu._run_default).
        vcpu._run_default(time.monotonic() + timeout, timeout)
    except VmTimeoutError as exc:
        vmm.finish(VmEnd("timeout", exc.halted or f"guest did not finish within {budget:g} s"))
    except VmExitError:
        pass  # the VMM recorded the end
    report = vmm.finalize(time.perf_counter() - start)
    _add_control_plane(vm, report)
    if vm.machine.ud_explanations:
        report.extra["ud_host_view"] = list(vm.machine.ud_explanations)  # a restore rewinds the machine's
    return report


def _add_control_plane(vm: Vm, report: RunReport) -> None:
    from testbed.control_plane import report_entry

    machine = vm.machine
    report.extra["control_plane"] = report_entry(machine.program, machine.options.vm_type, report.exit_counts,
                                                 report.user_exits)


def run_guest(source: Path | str, options: VmOptions | None = None, *, text: str | None = None,
              reuse: bool = False, force: bool = False) -> RunReport:
    """Assemble and run a guest to its end; the report says how it ended (the one-call API,
    built on Vm: load, then run_report). `reuse=True`: `vm.load(reuse=True)`, a machine of
    the same configuration restored from its boot snapshot instead of a new boot. A legacy
    image on a guest_memfd VM type is refused (ControlPlaneError) unless `force=True`."""
    from testbed.machine import VmOptions

    start = time.perf_counter()
    with Vm(options if options is not None else VmOptions()) as vm:
        opts = vm.options
        deadline = time.monotonic() + opts.timeout
        try:
            vcpu = vm.load(source, text=text, reuse=reuse, force=force)
        except VmTimeoutError:
            vm.machine.vmm.finish(VmEnd("timeout", f"guest did not finish within {opts.timeout:g} s"))
            return _final(vm, start)
        except VmExitError:
            return _final(vm, start)  # the boot ended the run: the VMM recorded how
        return run_report(vm, vcpu, max(deadline - time.monotonic(), 1e-6), start, opts.timeout)


def _final(vm: Vm, start: float) -> RunReport:
    report = vm.machine.vmm.finalize(time.perf_counter() - start)
    _add_control_plane(vm, report)
    if vm.machine.ud_explanations:
        report.extra["ud_host_view"] = list(vm.machine.ud_explanations)  # a restore rewinds the machine's
    return report
