"""Live migration of a running confidential guest: pre-copy rounds, status resync, stop-and-copy.

The VMM's side (what QEMU's migration thread does for an SEV guest), over the host API:

1. The guest must have declared itself ready: MSR_KVM_MIGRATION_CONTROL = KVM_MIGRATION_READY,
   which the VMM handles through its MSR filter (vmm/msr.py). Otherwise `MigrationRefusedError`.
2. Dirty logging on the source (KVM_MEM_LOG_DIRTY_PAGES); SEND_START on the source and
   RECEIVE_START on an incoming target (same options, its own memory key) with a shared
   transport session. Round 0 sends every page: private pages through the firmware
   (SEND_UPDATE_DATA -> RECEIVE_UPDATE_DATA: re-encrypted under the transport key, the host
   holds only the packet), shared pages raw (`vm.read` -> `vm.write`).
3. Pre-copy rounds: collect the dirty log (KVM_GET_DIRTY_LOG) and export the encryption status
   (testbed/migrate/status.py), XOR it with the previous export; the guest runs on for a slice
   (`slice_exits` user exits: the slice stands for the guest running while the round's pages
   are sent) and the pages dirty or changed are sent with the status of the export - a page
   the guest converted during the slice goes out stale, and the next round repairs it.
   On SEV-SNP each collect also reads the source's RMP entries and re-sends the pages whose
   entry changed since the last read (a PVALIDATE writes nothing: `_collect`).
4. Stop-and-copy: the source stops (its pending exit completed, KVM_RUN with immediate_exit),
   the last dirty log and status are collected and sent (a page still unsendable fails the
   migration), the vCPU state follows - registers, x87/SSE and XCR0 (hw/vcpu_state.py) -
   through the firmware on SEV-ES/SNP, whose registers the host cannot read, then
   SEND_FINISH/RECEIVE_FINISH.
5. The testbed compares the guest's view of every page on both sides, the host-side state of
   every page (KVM's status, the trackers, the RMP) and the vCPU (testbed/migrate/oracle.py),
   then the guest resumes on the target and finishes its run there.

Any failure after SEND_START issues SEND_CANCEL (`_abandon`): the source keeps the guest and a
new migration can start.

The VMM also marks the pages *it* writes (a host handler's `vm.write`) dirty, as QEMU keeps
its own writes in its migration bitmap: KVM's log sees only the guest's and KVM's writes.

A poisoned tracker (a hostile guest overflowed the list) falls back to a full status resync
from KVM's memory attributes for as long as it stays poisoned; on SEV-ES, which has no memory
attributes, the migration is refused instead (`MigrationRefusedError`).

The donated tracker (tracker/donated.py) is read each round, bounded and validated: before the
guest has donated, the round resyncs from the attributes and says so (on SEV-ES the VMM waits,
a bounded number of exits, for the donation); a read mid-update (odd generation) reuses the
last export and the next round reads again; the stop waits for an even generation; a
structure found invalid falls back as a poisoned tracker does. The target VMM takes the
donation over (same GPA and size: it arrived with the memory).

Pages that hold nothing on either side are not sent (`RoundStats.zero_pages`, QEMU's zero
pages): see `_send_pages` (a legacy frame only while DRAM still owns it: one the guest touched
through C=1 is sent). SEV-SNP sends every private page: its RMP state travels with it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitarray import bitarray

from testbed.errors import TestbedError, UsageError
from testbed.hw.exits import RunStop
from testbed.hw.memory import OWNER_PRIVATE, UnmappableMemoryError
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KVM_FEATURE_HC_MAP_GPA_RANGE, KVM_FEATURE_MIGRATION_CONTROL, KvmExit
from testbed.migrate.oracle import (
    Comparison,
    compare_host_state,
    compare_machines,
    compare_vcpus,
    differing_bytes,
)
from testbed.migrate.status import (
    StatusExport,
    export_memory_attributes,
    export_page_enc_bitmap,
    export_tracker,
    private_bits,
    status_changes,
)
from testbed.tracker.donated import ENCS_RECORDS, DonatedTracker
from testbed.vmm.ucall import Ucall
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from testbed.api import Vcpu, Vm
    from testbed.machine import VmOptions

#: The VM types `testbed migrate` takes (the firmware step exists for these; README).
MIGRATE_VM_TYPES = ("sev", "sev-es", "sev-snp", "sw-protected", "default")
DEFAULT_ROUNDS = 3
DEFAULT_SLICE_EXITS = 8
#: Donated tracker on a VM type without memory attributes: exits the source may run before
#: round 0 waiting for the guest's donation.
DONATION_WAIT_EXITS = 256
#: Donated tracker: exits the source may run at the stop waiting for its structure to be
#: consistent (an even generation).
STOP_WAIT_EXITS = 256

ZERO_PAGE = bytes(PAGE_SIZE)
#: mismatches listed in the report (page view first, then host state; the counts cover all)
MAX_MISMATCHES = 16

#: A host handler for the guest's GUEST_SYNCs (the host half of a selftest-style guest).
UcallHandler = Callable[["Vm", Ucall], None]
#: Fault injection: the packet of a private page in transit, (gpa, header, packet) -> (header, packet).
Tamper = Callable[[int, bytes, bytes], tuple[bytes, bytes]]


class MigrationError(TestbedError):
    """The migration did not complete; `outcome` names how: `refused` (the VMM will not migrate
    this guest), `start_failed` (SEND_START or RECEIVE_START failed), `send_failed` (the
    source could not send a page or the vCPU state), `receive_refused` (the target's firmware
    refused a packet), `source_ended` (the guest's run ended on the source first), `timeout`.
    Every failure after SEND_START cancels the outgoing migration (SEND_CANCEL): the source
    keeps the guest, and a new migration can start."""

    def __init__(self, outcome: str, detail: str, **info: Any) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.info = info
        #: source_ended: how the guest's run ended (its outcome and detail)
        self.how = ""


class MigrationRefusedError(MigrationError):
    """The VMM will not migrate this guest (not ready, or its status cannot be resynced)."""

    def __init__(self, detail: str, **info: Any) -> None:
        super().__init__("refused", detail, **info)


@dataclass
class RoundStats:
    """One round of the migration (the `rounds` entries of the report)."""

    round: int
    kind: str  # "bulk" (round 0: all pages), "precopy", "stop" (stop-and-copy)
    pages_sent: int = 0
    private_pages_sent: int = 0
    shared_pages_sent: int = 0
    dirty_pages: int = 0
    status_bytes: int = 0
    status_changes: int = 0
    status_source: str = ""
    #: pages whose send failed because their status changed under the send (re-sent next round)
    deferred_pages: int = 0
    #: pages not sent because they hold nothing yet on either side (zero pages, _send_pages)
    zero_pages: int = 0
    #: SEV-SNP: pages whose RMP entry (Assigned, Validated) changed since the last round's
    #: read, re-sent with it (a testbed extension: _collect)
    rmp_changes: int = 0
    time_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The JSON entry."""
        out = dataclasses.asdict(self)
        out["time_s"] = round(self.time_s, 6)
        return out


@dataclass
class MigrationReport:
    """What `testbed migrate --json` prints."""

    outcome: str
    detail: str = ""
    vm_type: str = ""
    tracker: str = ""
    lost_pages: int = 0
    corrupted_pages: int = 0
    compared_pages: int = 0
    #: pages whose status in KVM (memory attributes, or the page-encryption bitmap) differs
    status_pages: int = 0
    #: pages the VMM trackers' shared sets hold differently
    tracker_pages: int = 0
    #: SEV-SNP: pages whose RMP entry differs (oracle.py HostStateComparison)
    rmp_pages: int = 0
    #: registers (and KVM's per-vCPU state) that differ: {"field", "source", "target"}
    vcpu_mismatches: list[dict[str, str]] = field(default_factory=list)
    rounds: list[RoundStats] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    #: "tracker", or how the status was resynced when the tracker could not be used
    resync: dict[str, Any] = field(default_factory=dict)
    downtime_s: float = 0.0
    total_s: float = 0.0
    #: the guest's GUEST_SYNC values on the source and on the target
    source_syncs: list[int] = field(default_factory=list)
    target_syncs: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """The guest finished on the target, no page was lost or corrupted, and the host-side
        state (KVM's status, the trackers, the RMP) and the vCPU arrived as they were."""
        return (self.outcome == "done" and self.lost_pages == 0 and self.corrupted_pages == 0
                and self.status_pages == 0 and self.tracker_pages == 0 and self.rmp_pages == 0
                and not self.vcpu_mismatches)

    def to_json(self) -> dict[str, Any]:
        """The `--json` object."""
        out: dict[str, Any] = {
            "outcome": self.outcome,
            "detail": self.detail,
            "vm_type": self.vm_type,
            "tracker": self.tracker,
            "lost_pages": self.lost_pages,
            "corrupted_pages": self.corrupted_pages,
            "compared_pages": self.compared_pages,
            "status_pages": self.status_pages,
            "tracker_pages": self.tracker_pages,
            "rmp_pages": self.rmp_pages,
            "vcpu_mismatches": self.vcpu_mismatches,
            "rounds": [r.to_json() for r in self.rounds],
            "mismatches": self.mismatches,
            "resync": self.resync,
            "downtime_s": round(self.downtime_s, 6),
            "total_s": round(self.total_s, 6),
            "source_syncs": self.source_syncs,
            "target_syncs": self.target_syncs,
        }
        out.update(self.extra)
        return out


def migration_options(options: VmOptions) -> VmOptions:
    """The source's options for a migration: KVM_FEATURE_MIGRATION_CONTROL advertised (so the
    VMM filters the MSR) on top of the options' PV features (with HC_MAP_GPA_RANGE where the
    options left the default), and GUEST_MIGRATION_READY defined unless the caller defined it
    (the runtime then declares the guest ready at boot, guests/lib/runtime.s)."""
    from testbed.vmm.cpuid import DEFAULT_PV_FEATURES

    pv = options.pv_features
    if pv is None:
        pv = DEFAULT_PV_FEATURES | ((1 << KVM_FEATURE_HC_MAP_GPA_RANGE) if options.map_gpa_exit else 0)
    defines = dict(options.defines)
    defines.setdefault("GUEST_MIGRATION_READY", 1)
    return dataclasses.replace(options, pv_features=pv | (1 << KVM_FEATURE_MIGRATION_CONTROL), defines=defines)


class Migration:
    """A live migration driven step by step (a test's handle; `migrate()` runs the whole):

        migration = Migration(source_vm, source_vcpu, rounds=3)
        migration.start()                 # checks, dirty logging, SEND/RECEIVE_START, round 0
        while migration.precopy_rounds_left:
            migration.precopy_round()     # collect, guest slice, send
        migration.stop_and_copy()         # last round, vCPU state, comparison
        report = migration.finish()       # the guest's run on the target

    `source_vm` is a loaded testbed.Vm (its guest between runs), built with
    `migration_options()`. The target is built here: the same program and options with its own
    memory key (`target_seed`, default the source's seed + 1)."""

    def __init__(self, source: Vm, source_vcpu: Vcpu, *, rounds: int = DEFAULT_ROUNDS,
                 slice_exits: int = DEFAULT_SLICE_EXITS, target_seed: int | None = None,
                 on_ucall: UcallHandler | None = None, tamper: Tamper | None = None,
                 final_resync: bool = True, timeout: float | None = None) -> None:
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise UsageError(f"rounds = {rounds!r}: expected an int >= 0 (pre-copy rounds after the first)")
        if not isinstance(slice_exits, int) or isinstance(slice_exits, bool) or slice_exits < 1:
            raise UsageError(f"slice = {slice_exits!r}: expected an int >= 1 (guest exits per round)")
        self.source = source
        self.source_vcpu = source_vcpu
        machine = source.machine
        self.options = machine.options
        if self.options.vm_type not in MIGRATE_VM_TYPES:
            raise UsageError(f"VM type {self.options.vm_type} cannot be migrated by the testbed: "
                             f"expected one of {', '.join(MIGRATE_VM_TYPES)}")
        if self.options.max_memory is not None:
            # The target would have to be built with the source's plugged slots (QEMU re-plugs
            # DIMMs on the destination before RAM arrives): not modelled.
            raise UsageError("a VM with hotplug memory (max_memory) cannot be migrated by the testbed: the "
                             "target would need the source's memory slots plugged first")
        self.rounds = rounds
        self.slice_exits = slice_exits
        self.on_ucall = on_ucall
        self.tamper = tamper
        #: False models the seed-era bug: stop-and-copy reuses the last pre-copy status export
        self.final_resync = final_resync
        self.timeout = timeout if timeout is not None else self.options.timeout
        seed = self.options.seed
        # The seed is a u64: the default target key wraps past the largest seed.
        self.target_seed = target_seed if target_seed is not None else (((seed if seed is not None else 0) + 1)
                                                                        % (1 << 64))
        self.guest_pages = machine.memory.size >> PAGE_SHIFT  # the RAM KVM's memslots hold
        self.report = MigrationReport(outcome="running", vm_type=self.options.vm_type, tracker=self.options.tracker,
                                      resync={"source": "donated" if self.options.tracker == DonatedTracker.name
                                              else "tracker"})
        self.target: Vm | None = None
        self.target_vcpu: Vcpu | None = None
        self._send: Any = None
        self._receive: Any = None
        self._previous: StatusExport | None = None
        self._round = 0
        self._deferred: set[int] = set()
        #: in stop-and-copy: a status export must be current (no last export reused)
        self._stopping = False
        #: why the donated structure was first found invalid: the fallback then holds for the rest
        #: of the migration, even if the guest donates a valid structure again (_export_donated)
        self._donated_invalid: str | None = None
        self._vmm_dirty: set[int] = set()
        #: takes the VMM's write logging off the source again (resume_source, close)
        self._unhook: Callable[[], None] = lambda: None
        self._target_private: bitarray | None = None
        #: target pages the migration has written: the others are still as the target started (zero)
        self._target_written = bitarray(self.guest_pages, endian="little")
        self._target_written.setall(0)
        self._started = 0.0
        self._deadline = 0.0
        #: private pages go through the firmware where the VM has private memory
        self.firmware = self.options.vm_type != "default"
        #: SEV-SNP: the source's RMP entries as last read (_collect re-sends what changed)
        self._rmp_previous: bytes | None = None
        #: SEND_FINISH was issued (after it a failure cancels nothing: the source is SENT)
        self._send_finished = False
        #: SEND_CANCEL was issued (a failure after SEND_START: _abandon)
        self._cancelled = False

    # ------------------------------------------------------------------ properties
    @property
    def precopy_rounds_left(self) -> bool:
        """Whether `precopy_round` has rounds left to run (rounds 1..`rounds`)."""
        return self._round <= self.rounds

    # ---------------------------------------------------------------------- start
    def check_ready(self) -> None:
        """MigrationRefusedError unless the guest wrote KVM_MIGRATION_READY (vmm/msr.py)."""
        machine = self.source.machine
        if machine.vmm.ended is not None:
            raise MigrationRefusedError(f"the guest's run already ended on the source ({machine.vmm.ended.outcome})")
        if not machine.kvm_vm.pv_features & (1 << KVM_FEATURE_MIGRATION_CONTROL):
            raise MigrationRefusedError("the VMM does not advertise KVM_FEATURE_MIGRATION_CONTROL to this guest, so it "
                                   "cannot declare itself ready for migration (build it with migration_options())")
        if not machine.msr.migration_ready:
            raise MigrationRefusedError("the guest has not enabled migration (MSR_KVM_MIGRATION_CONTROL is not "
                                   "KVM_MIGRATION_READY): its shared pages may not all be reported yet")

    def start(self) -> RoundStats:
        """Check, enable dirty logging, build the target, SEND/RECEIVE_START, send round 0.
        A failure after SEND_START cancels the outgoing migration (`_abandon`)."""
        return self._cancelling(self._start)

    def _cancelling(self, step: Callable[[], RoundStats]) -> RoundStats:
        """Run one step of the migration; if it fails after SEND_START and before SEND_FINISH,
        issue SEND_CANCEL first (`_abandon`), then let the failure through."""
        try:
            return step()
        except BaseException:
            self._abandon()
            raise

    def _abandon(self) -> None:
        """KVM_SEV_SEND_CANCEL on a migration that failed after SEND_START and before
        SEND_FINISH: the source's firmware goes back to RUNNING, so the guest runs on there and
        a new migration can start. Documentation/virt/kvm/x86/amd-memory-encryption.rst,
        KVM_SEV_SEND_CANCEL: "After completion of SEND_START, but before SEND_FINISH, the
        source VMM can issue the SEND_CANCEL command to stop a migration. This is necessary so
        that a cancelled migration can restart with a new target later." (QEMU's series calls
        sev_cancel_migration from its migration-failed path.)"""
        if self._send is None or self._send_finished or self._cancelled:
            return
        self._cancelled = True
        try:
            self._send.send_cancel()
        except KvmIoctlError as exc:
            self.report.extra["send_cancel"] = f"failed: {exc}"
        else:
            self.report.extra["send_cancel"] = "issued"

    def _start(self) -> RoundStats:
        from testbed.api import Vm
        from testbed.machine import Machine

        self._started = time.perf_counter()
        self._deadline = time.monotonic() + self.timeout
        self.check_ready()
        source = self.source
        machine = source.machine
        source.enable_dirty_logging()
        # The VMM's own writes to guest RAM are its to log (QEMU's migration bitmap).
        memory = machine.memory
        previous_hook = memory.on_host_write

        def vmm_wrote(gpa: int, length: int, _next: Any = previous_hook) -> None:
            if length > 0:
                self._vmm_dirty.update(range(gpa // PAGE_SIZE, (gpa + length - 1) // PAGE_SIZE + 1))
            if _next is not None:
                _next(gpa, length)

        memory.on_host_write = vmm_wrote
        self._unhook = lambda: setattr(memory, "on_host_write", previous_hook)
        target_options = dataclasses.replace(self.options, seed=self.target_seed, trace=None,
                                             defines=dict(self.options.defines))
        target_machine = Machine(machine.program, target_options, incoming=True)
        self.target, self.target_vcpu = Vm.attach(target_machine)
        # The target's pages start in its KVM's initial state; round 0 sets every page's.
        attrs = target_machine.kvm_vm.mem_attrs
        if attrs is not None:
            self._target_private = private_bits(attrs.private, self.guest_pages)
        else:  # a tracker starts empty: every page private
            self._target_private = bitarray(self.guest_pages, endian="little")
            self._target_private.setall(1)
        if self.firmware:
            from testbed.kvm.migration import TransportSession

            session = TransportSession.create(self.target_seed)
            try:
                self._send = source.send_start(session)
            except KvmIoctlError as exc:
                raise MigrationError(
                    "start_failed", f"the source refused to start sending (KVM_SEV_SEND_START: {exc}): a guest "
                    "that was sent already, or whose last migration was never finished or cancelled, cannot "
                    "be sent", errno=exc.errno, fw_error=getattr(exc, "fw_error", None)) from None
            try:
                self._receive = self.target.receive_start(session)
            except KvmIoctlError as exc:
                raise MigrationError(
                    "start_failed", f"the target refused to start receiving (KVM_SEV_RECEIVE_START: {exc}): "
                    "the migration failed, the source keeps the guest", errno=exc.errno,
                    fw_error=getattr(exc, "fw_error", None)) from None
        stats = RoundStats(0, "bulk")
        t0 = time.perf_counter()
        attrs = machine.kvm_vm.mem_attrs
        donated = machine.map_gpa.tracker if isinstance(machine.map_gpa.tracker, DonatedTracker) else None
        # No attributes to resync from before the guest donates (SEV-ES): wait for it.
        if donated is not None and attrs is None and donated.read_now() != "valid":
            try:
                state = self._quiesce(DONATION_WAIT_EXITS, ("none", "updating"))
            except MigrationError as exc:
                if exc.outcome != "source_ended":
                    raise
                raise MigrationRefusedError(
                    f"the guest's run ended on the source ({exc.how}) while the VMM waited for its donated "
                    f"encryption-status structure ({donated.reason}): --tracker donated needs a guest that donates "
                    "one (guests/lib/donate.s), and this VM type keeps no memory attributes to resync the status "
                    "from: the migration is refused") from None
            if state != "valid":
                raise MigrationRefusedError(
                    f"the guest's donated encryption-status structure is not readable after {DONATION_WAIT_EXITS} "
                    f"exits ({donated.reason}) and this VM type keeps no memory attributes: the migration is refused")
        if (attrs is not None and self.options.hc_protocol != "page-enc-status" and not machine.sev
                and donated is None):
            # sw-protected RAM starts shared and the tracker records conversions only, so it
            # cannot tell a page never converted (shared) from one made private: resync the
            # status once from KVM's attributes and load the tracker with it; from here on
            # every conversion reaches the tracker, and the rounds export it.
            full = export_memory_attributes(attrs.private, self.guest_pages)
            tracker = machine.map_gpa.tracker
            tracker.clear()
            tracker.apply((gfn, n, True) for gfn, n in full.shared_ranges())
            stats.status_bytes += full.nbytes
            self.report.resync["initial"] = "memory-attributes (sw-protected RAM starts shared)"
            # The target VMM's tracker likewise starts from its KVM's attributes (all shared):
            # the rounds then convert only what differs, through its tracker.
            target_attrs = target_machine.kvm_vm.mem_attrs
            assert target_attrs is not None
            target_tracker = target_machine.map_gpa.tracker
            target_tracker.clear()
            target_tracker.apply((gfn, n, True) for gfn, n in
                                 export_memory_attributes(target_attrs.private, self.guest_pages).shared_ranges())
        # (The donated structure needs no such load: the guest records the RAM it starts with
        # shared itself when it declares itself ready for migration, guests/lib/donate.s.)
        status = self._export(stats)
        self._rmp_previous = self._rmp_entries()
        source.get_dirty_log()  # start the log from here: round 0 sends every page
        self._vmm_dirty.clear()
        self.run_slice()  # the guest runs on while the bulk of memory goes out
        self._send_pages(range(self.guest_pages), status, stats)
        self._previous = status
        stats.status_changes = sum(n for _, n in status.shared_ranges())
        stats.time_s = time.perf_counter() - t0
        self.report.rounds.append(stats)
        self._round = 1
        return stats

    # ------------------------------------------------------------------ pre-copy
    def precopy_round(self) -> RoundStats:
        """One pre-copy round: collect the dirty log and the status (XOR with the last), let the
        guest run a slice, send the pages dirty or changed with the status collected."""
        if self.target is None:
            raise UsageError("Migration.start() first")
        return self._cancelling(self._precopy_round)

    def _precopy_round(self) -> RoundStats:
        stats = RoundStats(self._round, "precopy")
        t0 = time.perf_counter()
        pages, status = self._collect(stats, resync=True)
        self.run_slice()
        self._send_pages(sorted(pages), status, stats)
        stats.time_s = time.perf_counter() - t0
        self.report.rounds.append(stats)
        self._round += 1
        return stats

    def run_slice(self, exits: int | None = None) -> None:
        """Run the source guest for `exits` user exits (default `slice_exits`), each answered by
        the default VMM; a GUEST_SYNC goes to the `on_ucall` handler. MigrationError
        (`source_ended`) if the guest's run ends on the source."""
        budget = self.slice_exits if exits is None else exits
        machine = self.source.machine
        vmm = machine.vmm
        vcpu = self.source_vcpu
        count = 0
        seen: list[KvmExit] = []
        ucalls: list[Ucall] = []

        def handled(exit: KvmExit) -> bool:
            nonlocal count
            seen.append(exit)
            result = vmm.handle(exit)
            count += 1
            if vmm.ended is not None:
                return False
            if isinstance(result, Ucall) and result.cmd == "sync":
                ucalls.append(result)
                return False  # the handler runs between runs, not inside the emulator
            return count < budget

        while count < budget and vmm.ended is None:
            seen.clear()
            ucalls.clear()
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out()
            try:
                result = vcpu._kvm_run(self._deadline, remaining, handled=handled)
            except TestbedError as exc:
                if getattr(exc, "outcome", "") == "timeout":
                    self._timed_out()
                self._source_ended(str(exc), finished=False)
            if isinstance(result, RunStop):
                continue
            if not seen or result is not seen[-1]:
                # an exit KVM_RUN returned before the guest ran (a completion's own exit)
                count += 1
                uc = vmm.handle(result)
                if isinstance(uc, Ucall) and uc.cmd == "sync":
                    ucalls.append(uc)
            for uc in ucalls:
                self.report.source_syncs.append(uc.args[0] if uc.args else 0)
                if self.on_ucall is not None:
                    self.on_ucall(self.source, uc)
        if vmm.ended is not None:
            end = vmm.ended
            if end.outcome == "timeout":
                self._timed_out()
            self._source_ended(f"{end.outcome}" + (f": {end.detail}" if end.detail else ""),
                               finished=end.outcome == "done")

    def _source_ended(self, how: str, finished: bool = True) -> None:
        # A guest that finished too soon wants a shorter migration; one that failed (an assertion,
        # an exception) wants its own failure looked at, not other rounds.
        advice = "; use fewer --rounds or a smaller --slice" if finished else ""
        error = MigrationError("source_ended", f"the guest's run ended on the source before the migration "
                               f"completed ({how}){advice}")
        error.how = how
        raise error

    def _timed_out(self) -> None:
        """The migration's time ran out with the guest still running on the source: a timeout
        (exit status 3, as a run's), not an end of the guest's run."""
        phase = "round 0 (bulk)" if self._round == 0 else (
            "the stop" if self._stopping else f"pre-copy round {self._round}")
        raise MigrationError("timeout", f"the migration ran out of time in {phase}: the timeout "
                             f"({self.timeout:g} s, --timeout) passed with the guest still running on the source "
                             "(it did not end); the source keeps it")

    # ------------------------------------------------------------ stop-and-copy
    def stop_and_copy(self) -> RoundStats:
        """Stop the source, send what is left and the vCPU state, compare the guest's views."""
        if self.target is None or self.target_vcpu is None:
            raise UsageError("Migration.start() first")
        return self._cancelling(self._stop_and_copy)

    def _stop_and_copy(self) -> RoundStats:
        assert self.target is not None
        machine = self.source.machine
        tracker = machine.map_gpa.tracker
        # Stop where the guest's structure is consistent (even generation): the last read must
        # be complete. The guest runs on a little; if it never leaves its update, the stop
        # round falls back to the attributes (_export_donated), or refuses on SEV-ES.
        if (isinstance(tracker, DonatedTracker) and self.final_resync and tracker.read_now() == "updating"
                and self._quiesce(STOP_WAIT_EXITS, ("updating",)) == "updating" and machine.kvm_vm.mem_attrs is None):
            raise MigrationRefusedError(
                f"the guest's donated encryption-status structure stayed mid-update for {STOP_WAIT_EXITS} exits "
                "and this VM type keeps no memory attributes: the migration is refused")
        t_stop = time.perf_counter()
        self._stopping = True
        # KVM_RUN with immediate_exit: the pending exit's completion runs, the guest does not.
        # A completion may exit again (the next step of a string I/O): answer each until none is
        # left, bounded (a hostile guest's string I/O could go on for 2**64 steps).
        for _ in range(STOP_WAIT_EXITS):
            extra = machine.kvm_vcpu.complete_pending()
            if extra is None:
                break
            machine.vmm.handle(extra)
        else:
            raise MigrationRefusedError(f"the vCPU's pending exit was not complete after {STOP_WAIT_EXITS} "
                                        "completions: the migration is refused")
        stats = RoundStats(self._round, "stop")
        pages, status = self._collect(stats, resync=self.final_resync)
        self._send_pages(sorted(pages), status, stats)
        # Whatever was deferred in this very round cannot wait: one more pass with the status now.
        if self._deferred:
            now = self._status_now(stats)[0] if self.final_resync else status
            again = sorted(self._deferred)
            self._deferred.clear()
            self._send_pages(again, now, stats)
        if self._deferred:
            # Still refused with the status the stop has (stale without the final resync): the
            # target would resume without them. The migration fails; the source keeps the guest.
            left = sorted(self._deferred)
            listed = ", ".join(f"0x{g:x}" for g in left[:8]) + (", ..." if len(left) > 8 else "")
            raise MigrationError(
                "send_failed", f"{len(left)} page(s) could not be sent at the stop (gfn {listed}): their send "
                f"failed twice with the status the stop round has ({stats.status_source}), so the target "
                "would resume without them; the migration failed, the source keeps the guest",
                unsent_gfns=left[:16])
        if isinstance(tracker, DonatedTracker) and tracker.region is not None:
            self._adopt_donation(tracker)
        # The vCPU state: through the firmware where the host cannot read it.
        target_machine = self.target.machine
        if machine.kvm_vm.protected_state:
            header, packet = self._source_command("KVM_SEV_SEND_UPDATE_VMSA", self._send.send_vcpu_state)
            self._target_command("the vCPU state (RECEIVE_UPDATE_VMSA)",
                                 lambda: self._receive.receive_vcpu_state(header, packet))
        # The registers where KVM may read them (KVM_GET/SET_REGS, SREGS, MSRS), and KVM's own
        # per-vCPU state (host state: the SNP registered GHCB, the PV MSRs) in every case.
        self.target.set_vcpu_state(self.source.get_vcpu_state())
        # The VMM's own state: the migration-control MSR's value (QEMU migrates it with the vCPU).
        target_machine.msr.migration_control = machine.msr.migration_control
        if self.firmware:
            self._source_command("KVM_SEV_SEND_FINISH", self._send.send_finish)
            self._send_finished = True
            self._target_command("RECEIVE_FINISH", self._receive.receive_finish)
        stats.time_s = time.perf_counter() - t_stop
        self.report.rounds.append(stats)
        self.report.downtime_s = stats.time_s
        self._round += 1
        # The oracle (not the VMM): the guest's view of every page, source at the stop and target;
        # then what the guest cannot see yet - the host-side state of each page - and the vCPU.
        result: Comparison = compare_machines(machine, target_machine)
        self.report.compared_pages = result.compared_pages
        self.report.lost_pages = result.lost_pages
        self.report.corrupted_pages = result.corrupted_pages
        self.report.mismatches = result.mismatches
        host = compare_host_state(machine, target_machine, self.guest_pages)
        self.report.status_pages = host.status_pages
        self.report.tracker_pages = host.tracker_pages
        self.report.rmp_pages = host.rmp_pages
        assert host.mismatches is not None
        room = MAX_MISMATCHES - len(self.report.mismatches)
        self.report.mismatches.extend(host.mismatches[:max(room, 0)])
        if host.not_compared:
            self.report.extra["not_compared"] = host.not_compared
        self.report.vcpu_mismatches = compare_vcpus(machine, target_machine)
        tracker = target_machine.map_gpa.tracker
        self.report.extra["target_shared_ranges"] = [[g, n] for g, n in tracker.shared_ranges()]
        return stats

    @staticmethod
    def _firmware_command(outcome: str, failed: str, call: Callable[[], Any]) -> Any:
        """A firmware command of the stop; its failure fails the migration with `outcome`
        (send_failed: the source's command, SEND_CANCEL follows; receive_refused: the target's),
        `failed` saying which command, and the source keeps the guest."""
        try:
            return call()
        except KvmIoctlError as exc:
            raise MigrationError(outcome, f"{failed} ({exc}): the migration failed, the source keeps the guest",
                                 errno=exc.errno, fw_error=getattr(exc, "fw_error", None)) from None

    def _source_command(self, command: str, call: Callable[[], Any]) -> Any:
        """A source-side firmware command of the stop (send_failed on failure)."""
        return self._firmware_command("send_failed", f"the source's {command} failed", call)

    def _target_command(self, what: str, call: Callable[[], Any]) -> Any:
        """A target-side firmware command of the stop (receive_refused on failure)."""
        return self._firmware_command("receive_refused", f"the target's firmware refused {what}", call)

    def _rmp_entries(self) -> bytes | None:
        """SEV-SNP: the source's RMP entries (kvm/migration.py get_rmp_entries); None elsewhere."""
        if not self.source.machine.snp:
            return None
        from testbed.kvm.migration import get_rmp_entries

        return get_rmp_entries(self.source.machine.kvm_vm)

    def _adopt_donation(self, source: DonatedTracker) -> None:
        """The target VMM takes over the guest's donation (same GPA and size: the structure
        arrived with the memory), so the guest keeps using it there (vmm/donate.py adopt)."""
        assert self.target is not None and source.region is not None
        region = source.region
        handler = self.target.machine.vmm.donate
        info: dict[str, Any] = {"gpa": region.gpa, "size": region.size}
        if handler is None:
            info.update(accepted=False, reason="the target VMM does not run the donated tracker")
        else:
            why = handler.adopt(region.gpa, region.size)
            info.update(accepted=why is None, reason=why or "")
        self.report.extra["target_donation"] = info

    def finish(self) -> MigrationReport:
        """Resume the guest on the target and run it to its end (the report's `outcome`)."""
        if self.target is None or self.target_vcpu is None:
            raise UsageError("Migration.start() first")
        report = self.report
        report.outcome, report.detail = self._run_to_end(self.target, self.target_vcpu, report.target_syncs)
        tracker = self.target.machine.map_gpa.tracker
        if isinstance(tracker, DonatedTracker):
            # Whether the guest kept its structure on the target: the target VMM's last read.
            state = tracker.read_now()
            report.extra["target_tracker"] = {"state": state, "reason": tracker.reason or "",
                                              "generation": tracker.generation, "reads": tracker.reads}
        report.total_s = time.perf_counter() - self._started
        return report

    def resume_source(self) -> tuple[str, str]:
        """After a failed migration the source keeps the guest: run it to its end there and
        return (outcome, detail)."""
        self.source.enable_dirty_logging(False)
        self._unhook()
        return self._run_to_end(self.source, self.source_vcpu, self.report.source_syncs)

    def _run_to_end(self, vm: Vm, vcpu: Vcpu, syncs: list[int]) -> tuple[str, str]:
        from testbed.api import VmExitError, VmTimeoutError

        try:
            while True:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise VmTimeoutError("timeout", f"the guest did not finish within {self.timeout:g} s")
                uc = vcpu.run_to_ucall(timeout=remaining)
                if uc.cmd == "done":
                    return "done", ""
                syncs.append(uc.args[0] if uc.args else 0)
                if self.on_ucall is not None:
                    self.on_ucall(vm, uc)
        except VmExitError as exc:
            return exc.outcome, exc.detail

    def close(self) -> None:
        """Close the target VM (the source is the caller's) and stop logging the source's VMM writes."""
        self._unhook()
        if self.target is not None:
            self.target.close()

    # ---------------------------------------------------------------- internals
    def _export(self, stats: RoundStats) -> StatusExport:
        """The encryption status as the VMM can export it now (module docstring)."""
        machine = self.source.machine
        kvm_vm = machine.kvm_vm
        tracker = machine.map_gpa.tracker
        if self.options.hc_protocol == "page-enc-status":
            status = export_page_enc_bitmap(kvm_vm.get_page_enc_bitmap, self.guest_pages)
        elif isinstance(tracker, DonatedTracker):
            status = self._export_donated(tracker, stats)
        else:
            status = export_tracker(tracker, self.options.tracker)
            if status.poisoned:
                status = self._full_resync(
                    f"the {self.options.tracker} tracker is poisoned (a guest overflowed its "
                    f"{tracker.max_ranges} records)", {"reason": "tracker poisoned"})
        stats.status_bytes += status.nbytes
        stats.status_source = stats.status_source or status.source
        return status

    def _full_resync(self, why: str, info: dict[str, Any]) -> StatusExport:
        """The fallback: a full status resync from KVM's memory attributes, or
        MigrationRefusedError where the VM type keeps none (SEV-ES)."""
        attrs = self.source.machine.kvm_vm.mem_attrs
        if attrs is None:
            raise MigrationRefusedError(f"{why} and this VM type keeps no memory attributes to resync the "
                                        "status from: the migration is refused", tracker_poisoned=True)
        self.report.resync.update({"source": "memory-attributes", "fallback": True, "tracker_poisoned": True,
                                   **info})
        return export_memory_attributes(attrs.private, self.guest_pages)

    def _export_donated(self, tracker: DonatedTracker, stats: RoundStats) -> StatusExport:
        """The donated tracker's export: the guest's structure, read now (bounded and validated,
        tracker/donated.py). Not donated yet: KVM's attributes this round (said so; on SEV-ES,
        which has none, start() waited for the donation). Mid-update (odd generation): the last
        export stands for this round and the next round reads again. Invalid (a hostile or
        broken guest): the full-resync fallback, every round from then on."""
        resync = self.report.resync
        state = tracker.read_now()
        if state == "invalid" and self._donated_invalid is None:
            self._donated_invalid = tracker.reason
        if self._donated_invalid is not None:
            # Sticky: a guest that broke its structure once is not trusted with the status again
            # in this migration (a re-donation makes the tracker valid, not the guest honest; and
            # the rounds in between were sent from the attributes, so nothing is gained).
            why = self._donated_invalid
            return self._full_resync(f"the guest's donated encryption-status structure is invalid ({why})",
                                     {"reason": f"donated structure invalid: {why}"})
        if state == "valid":
            status = dataclasses.replace(export_tracker(tracker, "donated"), source="donated")
            resync["donated_reads"] = resync.get("donated_reads", 0) + 1
            return status
        attrs = self.source.machine.kvm_vm.mem_attrs
        if state == "updating" and self._previous is not None and not self._stopping:
            resync["retried_reads"] = resync.get("retried_reads", 0) + 1
            stats.status_source = "donated (update in progress: last export reused, read again next round)"
            return dataclasses.replace(self._previous, nbytes=ENCS_RECORDS)  # only the header was read
        if attrs is None:
            raise MigrationRefusedError(f"the donated tracker cannot export the status ({tracker.reason}) and this VM "
                                        "type keeps no memory attributes to resync it from: the migration is refused")
        # Before the donation (or mid-update with nothing exported yet): KVM's attributes, this round only.
        key = "before_donation" if state == "none" else "mid_update"
        resync[key] = resync.get(key, 0) + 1
        stats.status_source = f"memory-attributes ({tracker.reason})"
        return export_memory_attributes(attrs.private, self.guest_pages)

    def _quiesce(self, limit: int, states: tuple[str, ...]) -> str:
        """Donated tracker: run the source one exit at a time, at most `limit` exits, until its
        structure's state is not one of `states` (the seqlock's retry: a reader that finds the
        writer inside runs again later; the guest's vCPU is the writer, and it only leaves its
        update between exits). The final state."""
        tracker = self.source.machine.map_gpa.tracker
        assert isinstance(tracker, DonatedTracker)
        state = tracker.read_now()
        waited = 0
        while state in states and waited < limit:
            self.run_slice(1)
            waited += 1
            state = tracker.read_now()
        self.report.resync["quiesce_exits"] = self.report.resync.get("quiesce_exits", 0) + waited
        return state

    def _status_now(self, stats: RoundStats) -> tuple[StatusExport, list[tuple[int, int]]]:
        status = self._export(stats)
        changes = status_changes(self._previous, status, self.guest_pages)
        return status, changes

    def _collect(self, stats: RoundStats, *, resync: bool) -> tuple[set[int], StatusExport]:
        """The pages to send this round (dirty, status changed, deferred) and the status to
        send them with."""
        from testbed.kvm.dirty_log import dirty_pages

        dirty = set(dirty_pages(self.source.get_dirty_log()))
        dirty.update(self._vmm_dirty)
        self._vmm_dirty.clear()
        dirty = {g for g in dirty if g < self.guest_pages}
        stats.dirty_pages = len(dirty)
        pages = set(dirty)
        pages.update(self._deferred)
        self._deferred.clear()
        if resync or self._previous is None:
            status, changes = self._status_now(stats)
            stats.status_changes = sum(n for _, n in changes)
            for gfn, n in changes:
                pages.update(range(gfn, gfn + n))
            self._previous = status
        else:
            status = self._previous
            stats.status_source = "stale (no resync)"
        # SEV-SNP: a PVALIDATE changes the page's RMP entry without a write (the dirty log does not
        # see it, nor the status: rescinding validation converts nothing). The VMM reads the RMP
        # entries (as the host kernel reads them) and re-sends the pages whose entry changed since
        # its last read: the packet carries the Validated bit (hw/psp.py). A testbed extension:
        # SNP live migration is not upstream (README, "Deliberate deviations").
        rmp = self._rmp_entries()
        if rmp is not None and self._rmp_previous is not None:
            changed = differing_bytes(self._rmp_previous, rmp)
            stats.rmp_changes = len(changed)
            pages.update(changed)
        self._rmp_previous = rmp
        return pages, status

    def _send_pages(self, pages: Any, status: StatusExport, stats: RoundStats) -> None:
        """Send `pages` with the encryption status `status` says (private through the firmware,
        shared raw); the target's page states follow the status first. A page that holds
        nothing yet on either side is not sent (`_never_written`: QEMU's zero pages)."""
        from testbed.kvm.migration import set_page_enc_bitmap

        assert self.target is not None and self._target_private is not None
        source, target = self.source, self.target
        shared = status.shared_bits(self.guest_pages)
        target_map = target.machine.map_gpa
        target_private = self._target_private
        written = self._target_written
        memory = source.machine.memory
        legacy = memory.encrypted and not memory.guest_memfd
        # sw-protected: a guest_memfd page never allocated reads as zeros (no RMP state to carry,
        # unlike SNP, whose every private page travels with its validated state).
        gmem = memory.guest_memfd and not source.machine.snp
        # The seed-era protocol keeps the status in KVM: the target VMM loads it there too
        # (KVM_SET_PAGE_ENC_BITMAP, what QEMU's sev_load_incoming_bitmap does with the bitmap).
        page_enc = self.options.hc_protocol == "page-enc-status"
        for gfn in pages:
            gpa = gfn * PAGE_SIZE
            private = not shared[gfn]
            # The target VMM applies the status: attributes (and the discard), its tracker.
            if target_private[gfn] != private and target_map.convert(gfn, 1, private) == 0:
                target_private[gfn] = private
                if page_enc:
                    set_page_enc_bitmap(target.machine.kvm_vm, gfn, 1, b"\x01" if private else b"\x00")
            private = private and self.firmware  # a VM without private memory: all raw
            # Nothing on either side: an unallocated guest_memfd page (sw-protected), a legacy
            # frame still owned by DRAM that the host sees as zeros (the guest never touched it
            # through C=1: its C=1 view is the decryption of zeros under each VM's key, which the
            # page check counts equal). A frame the guest has read or written through C=1 is
            # the private alias's, whatever the host sees: it is sent (QEMU's series sends every
            # page of the encrypted list through SEND_UPDATE_DATA, sev_save_outgoing_page).
            if not written[gfn] and private and (
                    (gmem and not source.guest_mem_allocated(gpa))
                    or (legacy and memory.owner[gfn] != OWNER_PRIVATE
                        and source.read(gpa, PAGE_SIZE) == ZERO_PAGE)):
                stats.zero_pages += 1
                continue
            try:
                if private:
                    header, packet = self._send.send_update_data(gpa, PAGE_SIZE)
                else:
                    data = source.read(gpa, PAGE_SIZE)
            except (KvmIoctlError, UnmappableMemoryError):
                # The page changed state under the send (the status is stale): next round.
                self._deferred.add(gfn)
                stats.deferred_pages += 1
                continue
            if private:
                if self.tamper is not None:
                    header, packet = self.tamper(gpa, header, packet)
                try:
                    self._receive.receive_update_data(header, packet, gpa, PAGE_SIZE)
                except KvmIoctlError as exc:
                    raise MigrationError(
                        "receive_refused", f"the target's firmware refused page 0x{gpa:x} "
                        f"(RECEIVE_UPDATE_DATA: {exc}): the migration failed, the source keeps the guest",
                        gpa=gpa, errno=exc.errno, fw_error=getattr(exc, "fw_error", None)) from None
                stats.private_pages_sent += 1
            elif not written[gfn] and data == ZERO_PAGE:
                stats.zero_pages += 1  # the target's page is zero already
                continue
            else:
                target.write(gpa, data)
                stats.shared_pages_sent += 1
            written[gfn] = 1
            stats.pages_sent += 1


def migrate(source: Path | str, options: VmOptions | None = None, *, text: str | None = None,
            rounds: int = DEFAULT_ROUNDS, slice_exits: int = DEFAULT_SLICE_EXITS,
            on_ucall: UcallHandler | None = None, tamper: Tamper | None = None,
            final_resync: bool = True, target_seed: int | None = None) -> MigrationReport:
    """Boot `source` (a guest path, or `text`) with `migration_options(options)`, migrate it
    live in `rounds` pre-copy rounds of `slice_exits` guest exits each, and finish its run on
    the target. A migration that does not complete is reported (`outcome` refused,
    receive_refused, source_ended), never raised; usage errors raise UsageError."""
    from testbed.api import Vm, VmExitError, VmTimeoutError
    from testbed.machine import VmOptions

    opts = migration_options(options if options is not None else VmOptions())
    start = time.perf_counter()
    with Vm(opts) as vm:
        report_base = MigrationReport(outcome="running", vm_type=opts.vm_type, tracker=opts.tracker)
        try:
            vcpu = vm.load(source, text=text)
        except VmExitError as exc:
            # A boot that runs out of time is a timeout (exit status 3), like any other run's.
            report_base.outcome = "timeout" if isinstance(exc, VmTimeoutError) else "boot_failed"
            report_base.detail = f"during the boot: {exc}" if isinstance(exc, VmTimeoutError) else str(exc)
            return report_base
        migration = Migration(vm, vcpu, rounds=rounds, slice_exits=slice_exits, on_ucall=on_ucall, tamper=tamper,
                              final_resync=final_resync, target_seed=target_seed)
        try:
            migration.start()
            while migration.precopy_rounds_left:
                migration.precopy_round()
            migration.stop_and_copy()
            return migration.finish()
        except MigrationError as exc:
            report = migration.report
            report.outcome, report.detail = exc.outcome, exc.detail
            report.extra.update(exc.info)
            if exc.outcome in ("receive_refused", "send_failed", "start_failed"):
                # The migration was cancelled (SEND_CANCEL): the source finishes the guest's run.
                report.extra["source_outcome"] = migration.resume_source()[0]
            report.total_s = time.perf_counter() - start
            return report
        finally:
            migration.close()
