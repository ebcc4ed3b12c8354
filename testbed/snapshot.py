"""Machine snapshots: save a booted machine once, restore it for every repeated scenario.

A `Snapshot` holds everything a machine's next run depends on, so that `restore` gives the
state a fresh build and boot of the same program with the same options would give:

* guest memory: each backing (plain; legacy SEV's two aliases; guest_memfd's shared and
  private backings) as a copy-on-write image (hw/memimage.py), and the legacy frames'
  ownership bytes. A restore maps the images back over the backings' own addresses.
* the CPU: Unicorn's saved context (registers, the MSRs the emulator models, descriptor
  tables, and the QEMU fields the hardware model patches: hflags/CPL, old_exception,
  CS.base), then the TLB and the translated code are dropped.
* the hardware model's state: the vCPU object's attributes (the GHCB MSR, the RMP, pending
  events, counters...) but for the engine's own handles; the intercepted-instruction site
  hooks are re-synchronised with the engine (hooks added since are deleted, hooks the
  snapshot had are added back), and the code frames are forgotten with the translated code
  (rescanned when next fetched; a site already hooked stays hooked).
* KVM and the VMM, whole: every object reachable from the machine (memory attributes, SEV
  and GHCB state, capabilities, CPUID, MSR filter, the tracker, map_gpa, the VMM's report and
  ucall state...) is restored *in place* - each object gets its saved attributes back, each
  list, dict, set and bytearray its saved items - so every reference into that state (the
  hardware's stage-2 view of the attributes, a C extension's view of a buffer, a closure)
  stays valid. No list of fields to keep up to date: a field added tomorrow is covered.

Exceptions, on purpose: the report (`RunReport`) is handed to the caller at the end of a
run, so a restore gives the VMM a fresh copy instead of rewinding the caller's; the program,
the options, the tracer and the memory objects are the machine's configuration and are not
walked. Closures are kept as they are (those the walk meets capture objects it restores in
place); a snapshot refuses a vCPU with an exit unanswered (KVM_RUN's completion is a
closure over the exit in flight). A snapshot belongs to the machine it was taken from.

The per-process pool (`MachinePool`) behind `Vm.load(..., reuse=True)` and
`run_guest(..., reuse=True)` keeps booted machines keyed by (program, options) and hands out
restored ones.
"""

from __future__ import annotations

import collections
import copy
import ctypes
import dataclasses
import enum
import io
import mmap
import threading
import time
import types
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from testbed.errors import MachineClosedError, UsageError
from testbed.hw.memimage import FrameArrayImage
from testbed.hw.memory import GuestMemory, HostView, MemoryImage
from testbed.vmm.vmm import RunReport
from testbed.x86 import U64

if TYPE_CHECKING:
    from testbed.asm import Program
    from testbed.machine import Machine, VmOptions

__all__ = ["MachinePool", "Snapshot", "SnapshotError", "restore", "take"]


class SnapshotError(UsageError):
    """The machine cannot be snapshotted or restored now (why is in the message)."""


#: vCPU attributes that mirror the engine (hook handles, run flags) rather than the
#: machine's state: never restored from the walk (the site hooks are re-synchronised).
_ENGINE_FIELDS = frozenset({
    "_site_hooks", "_stop_hook", "_bp_hook", "_breakpoint", "_at_breakpoint", "_site_reset_pending",
    "_closed", "_running", "_hook_error", "_quiesced", "_ctx", "_snapshot",
})

#: Objects handed to callers at the end of a run: a restore gives their holders fresh copies.
_VALUE_TYPES: tuple[type, ...] = (RunReport,)

_ATOMS: tuple[type, ...] = (
    type(None), bool, int, float, complex, str, bytes, range, enum.Enum, type, types.ModuleType,
    types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType, types.WrapperDescriptorType,
    memoryview, io.IOBase, weakref.ref, GuestMemory, HostView, MemoryImage,
    ctypes._SimpleCData.__mro__[1],  # _CData: every ctypes value, array, pointer and function
)
#: Configuration and foreign objects the walk does not enter (modules of their types).
_PINNED_MODULES = ("unicorn", "ctypes", "_ctypes", "threading", "_thread", "testbed.asm", "testbed.trace",
                   "testbed.layout", "testbed.x86", "testbed.hw.memory", "testbed.hw.memimage",
                   "testbed.hw.cipher", "testbed.hw.watchdog")


def _pinned(obj: object) -> bool:
    if isinstance(obj, _ATOMS):
        return True
    module = type(obj).__module__ or ""
    return module.startswith(_PINNED_MODULES) or type(obj).__name__ == "VmOptions"


def _slot_names(cls: type) -> Iterator[str]:
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__"):
                yield name


_MISSING = object()

# Record kinds
_DICT, _LIST, _SET, _BYTEARRAY, _DEQUE, _OBJECT, _CELL, _FRAME_ARRAY, _CUSTOM = range(9)


@dataclasses.dataclass(slots=True)
class _Record:
    obj: Any
    kind: int
    items: Any  # the saved contents: list of pairs, list, frozenset, bytes, cell contents
    attrs: dict[str, Any] | None  # __dict__ (minus excluded fields) of an instance or a container subclass
    slots: tuple[tuple[str, Any], ...]


class _Graph:
    """Every mutable object reachable from the roots, with its contents at capture time."""

    def __init__(self, roots: list[object], exclude: dict[int, frozenset[str]]) -> None:
        self.records: list[_Record] = []
        self.values: dict[int, tuple[object, object]] = {}  # id -> (original, pristine deep copy)
        seen: set[int] = set()
        stack: list[object] = list(roots)
        while stack:
            obj = stack.pop()
            if id(obj) in seen or _pinned(obj):
                continue
            seen.add(id(obj))
            if isinstance(obj, _VALUE_TYPES):
                self.values[id(obj)] = (obj, copy.deepcopy(obj))
                continue
            self._capture(obj, stack, exclude.get(id(obj), frozenset()))

    def _capture(self, obj: Any, stack: list[object], excluded: frozenset[str]) -> None:
        attrs: dict[str, Any] | None = None
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict) and not isinstance(obj, (types.FunctionType, types.MethodType)):
            attrs = {k: v for k, v in d.items() if k not in excluded}
            stack.extend(attrs.values())
        slots: tuple[tuple[str, Any], ...] = ()
        if not isinstance(obj, (types.FunctionType, types.MethodType, types.CellType)):
            slots = tuple((n, getattr(obj, n, _MISSING)) for n in _slot_names(type(obj)) if n not in excluded)
            stack.extend(v for _, v in slots)
        save = getattr(type(obj), "_snapshot_save", None)
        if save is not None:
            # State a C extension keeps out of the walk's sight (the native trackers): the
            # object saves and restores it itself; None means it cannot be saved now.
            state = save(obj)
            if state is None:
                raise SnapshotError(f"{type(obj).__name__} cannot be snapshotted in its present state")
            self.records.append(_Record(obj, _CUSTOM, state, attrs, slots))
            return
        if isinstance(obj, dict):
            items: Any = list(obj.items())
            for k, v in items:
                stack.append(k)
                stack.append(v)
            self.records.append(_Record(obj, _DICT, items, attrs, slots))
        elif isinstance(obj, list):
            items = list(obj)
            stack.extend(items)
            self.records.append(_Record(obj, _LIST, items, attrs, slots))
        elif isinstance(obj, set):
            items = frozenset(obj)
            stack.extend(items)
            self.records.append(_Record(obj, _SET, items, attrs, slots))
        elif isinstance(obj, bytearray):
            self.records.append(_Record(obj, _BYTEARRAY, bytes(obj), attrs, slots))
        elif isinstance(obj, mmap.mmap):  # a sparse per-frame array (hw/memory.py frame_array)
            self.records.append(_Record(obj, _FRAME_ARRAY, FrameArrayImage(obj), attrs, slots))
        elif isinstance(obj, collections.deque):
            items = list(obj)
            stack.extend(items)
            self.records.append(_Record(obj, _DEQUE, items, attrs, slots))
        elif isinstance(obj, (tuple, frozenset)):
            stack.extend(obj)  # immutable: its mutable members are restored in place
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
            stack.append(obj.__func__)
        elif isinstance(obj, types.FunctionType):
            stack.extend(obj.__closure__ or ())
        elif isinstance(obj, types.CellType):
            try:
                contents = obj.cell_contents
            except ValueError:  # an empty cell
                return
            stack.append(contents)
            self.records.append(_Record(obj, _CELL, contents, None, ()))
        elif attrs is not None or slots:
            if isinstance(obj, BaseException):
                stack.extend(obj.args)
            self.records.append(_Record(obj, _OBJECT, None, attrs, slots))
        # else: an object of a C type without Python-visible state (e.g. a C extension's
        # handle): nothing to save, it is kept as it is

    def restore(self) -> None:
        """Give every recorded object its captured contents back (value objects: fresh copies)."""
        fresh = {key: copy.deepcopy(pristine) for key, (_, pristine) in self.values.items()}

        def sub(v: Any) -> Any:
            return fresh.get(id(v), v) if fresh else v

        for rec in self.records:
            obj = rec.obj
            kind = rec.kind
            if kind == _DICT:
                dict.clear(obj)
                for k, v in rec.items:
                    dict.__setitem__(obj, k, sub(v))
            elif kind == _LIST:
                list.__setitem__(obj, slice(None), [sub(v) for v in rec.items])
            elif kind == _SET:
                set.clear(obj)
                set.update(obj, rec.items)
            elif kind == _BYTEARRAY:
                obj[:] = rec.items  # in place: a C extension may hold the buffer
            elif kind == _FRAME_ARRAY:
                rec.items.restore_into(obj)
            elif kind == _DEQUE:
                obj.clear()
                obj.extend(sub(v) for v in rec.items)
            elif kind == _CELL:
                obj.cell_contents = sub(rec.items)
            if rec.attrs is not None:
                d = obj.__dict__
                for key in [k for k in d if k not in rec.attrs and k not in _ENGINE_FIELDS]:
                    del d[key]  # an attribute added since the snapshot
                for k, v in rec.attrs.items():
                    d[k] = sub(v)
            for name, value in rec.slots:
                if value is _MISSING:
                    if hasattr(obj, name):
                        object.__delattr__(obj, name)
                else:
                    object.__setattr__(obj, name, sub(value))
            if kind == _CUSTOM:
                obj._snapshot_restore(rec.items)  # after its attributes: it may use them

    @property
    def objects(self) -> int:
        """How many objects a restore rewrites in place."""
        return len(self.records)


class Snapshot:
    """A machine's state at one moment, restorable into that machine (`restore`) any number
    of times. Holds memfd images of guest memory: close() frees them (also when collected)."""

    def __init__(self, machine: Machine, memory: MemoryImage, context: Any, graph: _Graph,
                 site_hooks: frozenset[int], took_s: float) -> None:
        self._machine = weakref.ref(machine)
        self.memory = memory
        self._context = context
        self._graph = graph
        self._site_hooks = site_hooks
        self.took_s = took_s
        self._finalizer = weakref.finalize(self, memory.close)

    @property
    def pages(self) -> int:
        """Guest pages the snapshot holds data for (all backings); the others are zeros."""
        return self.memory.pages

    @property
    def objects(self) -> int:
        """Objects of the kvm/vmm/hardware state a restore rewrites in place."""
        return self._graph.objects

    @property
    def closed(self) -> bool:
        """Whether close() freed the snapshot."""
        return not self._finalizer.alive

    def belongs_to(self, machine: Machine) -> bool:
        """Whether this snapshot was taken from `machine`."""
        return self._machine() is machine

    def close(self) -> None:
        """Free the memory images (idempotent). A machine restored from it keeps running."""
        self._finalizer()


def _check_quiet(machine: Machine, what: str) -> None:
    if machine.closed:
        raise MachineClosedError(f"cannot {what} a closed machine: its emulator and guest memory were released")
    cpu, vcpu = machine.cpu, machine.kvm_vcpu
    if cpu._running or vcpu._running:
        raise SnapshotError(f"cannot {what} from inside a run (a hook or an exit handler): the vCPU is executing")
    if what == "snapshot":
        if vcpu._exit is not None or vcpu._pending_completion is not None:
            raise SnapshotError("cannot snapshot with an exit unanswered: run the vCPU once more "
                                "(KVM_RUN completes the exit first), then snapshot")
        if cpu._pending_events or cpu._stop_hook is not None or cpu._site_reset_pending:
            raise SnapshotError("cannot snapshot with hardware events pending: run the vCPU once more")
        if cpu._bp_hook is not None:
            raise SnapshotError("cannot snapshot while a breakpoint is set")


def take(machine: Machine) -> Snapshot:
    """Snapshot `machine` between runs (after `vm.load()`, or after a run returned with no
    exit unanswered)."""
    _check_quiet(machine, "snapshot")
    start = time.perf_counter()
    cpu = machine.cpu
    exclude = {id(cpu): _ENGINE_FIELDS}
    graph = _Graph([machine, cpu], exclude)
    memory = machine.memory.save_image()
    try:
        context = cpu._save_context()
    except BaseException:
        memory.close()
        raise
    return Snapshot(machine, memory, context, graph, frozenset(cpu._site_hooks), time.perf_counter() - start)


def restore(machine: Machine, snapshot: Snapshot) -> None:
    """Put `machine` back into the state `snapshot` saw (see the module docstring)."""
    if snapshot.closed:
        raise SnapshotError("this snapshot was closed: its memory images were freed")
    if not snapshot.belongs_to(machine):
        raise SnapshotError("a snapshot restores only into the machine it was taken from")
    _check_quiet(machine, "restore")
    if machine.memory.size != snapshot.memory.size:
        # GuestMemory is not walked (its backings are the images): a hotplug since the snapshot
        # would leave the grown size with the old memslots (README: not restorable).
        raise SnapshotError(f"the guest memory grew to 0x{machine.memory.size:x} bytes (memory hotplug) after "
                            f"this snapshot of 0x{snapshot.memory.size:x}: it cannot be restored")
    cpu = machine.cpu
    machine.memory.restore_image(snapshot.memory)
    cpu._restore_context(snapshot._context)
    snapshot._graph.restore()
    # Between runs no fault is pending; through the attributes (not the walk) so whatever
    # mirrors them (the C fill's Python-only switch) follows.
    cpu._pending_fault = None
    cpu._pending_npf = None
    if cpu._bp_hook is not None:
        cpu.breakpoint = U64
    _sync_site_hooks(cpu, snapshot._site_hooks)
    cpu.flush_tlb()
    cpu.flush_code()


def _sync_site_hooks(cpu: Any, wanted: frozenset[int]) -> None:
    """Make the engine's site hooks those of the snapshot (its scanned frames are restored
    with the walk; their bytes with the memory)."""
    hooks: dict[int, int] = cpu._site_hooks
    stale = [va for va in hooks if va not in wanted]
    cpu._quiesced = True  # uc_hook_del re-translates through a TLB fill (intercepts.py _reset_site_hooks)
    try:
        for va in stale:
            cpu._del_hook(hooks.pop(va))
        if cpu._stop_hook is not None:
            cpu._del_hook(cpu._stop_hook)
            cpu._stop_hook = None
    finally:
        cpu._quiesced = False
    for va in wanted:
        if va not in hooks:
            hooks[va] = cpu._add_code_hook(cpu._on_site, va, va)
    cpu._site_reset_pending = False


# ------------------------------------------------------------------------------ the pool
def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def pool_key(program: Program, options: VmOptions) -> tuple[Any, ...] | None:
    """What makes two machines the same configuration: the program object (the assembler's
    cache hands out one object per source and defines) and every option but the run's
    `timeout`. None where a machine cannot be shared: a run that traces (the tracer writes
    into the caller's file)."""
    if options.trace is not None:
        return None
    fields = tuple((f.name, _freeze(getattr(options, f.name))) for f in dataclasses.fields(options)
                   if f.name not in ("timeout", "trace"))
    return (id(program), fields)


@dataclasses.dataclass
class _Entry:
    machine: Machine
    snapshot: Snapshot
    program: Program  # keeps id(program) in the key unique while the entry lives


class MachinePool:
    """Booted machines of this process, by configuration: `acquire` hands out an idle one
    restored to its boot snapshot, `release` takes one back. At most `capacity` idle machines
    are kept (the least recently used is closed), since each holds guest memory."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._idle: collections.OrderedDict[int, tuple[tuple[Any, ...], _Entry]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def acquire(self, key: tuple[Any, ...]) -> tuple[Machine, Snapshot] | None:
        """An idle machine of configuration `key`, restored to its boot snapshot; None if none."""
        with self._lock:
            found = next((token for token, (k, _) in self._idle.items() if k == key), None)
            if found is None:
                self.misses += 1
                return None
            _, entry = self._idle.pop(found)
            self.hits += 1
        try:
            restore(entry.machine, entry.snapshot)
        except BaseException:
            _discard(entry)
            raise
        return entry.machine, entry.snapshot

    def release(self, key: tuple[Any, ...], machine: Machine, snapshot: Snapshot, program: Program) -> None:
        """Take back a machine whose use ended (restored at the next acquire)."""
        entry = _Entry(machine, snapshot, program)
        if (machine.closed or snapshot.closed or machine.cpu._running
                or machine.memory.size != snapshot.memory.size):  # hotplugged: not restorable
            _discard(entry)
            return
        evicted: list[_Entry] = []
        with self._lock:
            self._idle[id(entry)] = (key, entry)
            while len(self._idle) > self.capacity:
                evicted.append(self._idle.popitem(last=False)[1][1])
        for old in evicted:
            _discard(old)

    @property
    def idle(self) -> int:
        """Machines waiting to be reused."""
        return len(self._idle)

    def clear(self) -> None:
        """Close every idle machine and free its snapshot."""
        with self._lock:
            entries = [entry for _, entry in self._idle.values()]
            self._idle.clear()
        for entry in entries:
            _discard(entry)


def _discard(entry: _Entry) -> None:
    entry.snapshot.close()
    entry.machine.close()


#: The process's pool (`Vm.load(..., reuse=True)`, `run_guest(..., reuse=True)`).
POOL = MachinePool()


def clear_pool() -> None:
    """Close the machines the process keeps for reuse (the pool of `reuse=True`)."""
    POOL.clear()

