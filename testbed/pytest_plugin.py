"""The pytest plugin (entry point `pytest11`, name `testbed`): regression tests of the
hypercall ABI in a user's own repository (README, "Writing a regression test").

    @pytest.mark.testbed(vm_types=["sev", "sev-snp", "tdx"])
    def test_map_gpa(testbed_vm):
        vm = testbed_vm(memory="8M")            # a testbed.Vm of this test's combination
        vcpu = vm.load("guests/map.s")          # relative to this test file
        assert vcpu.run_to_ucall().cmd == "done"

- `testbed_vm(**overrides)`: a factory of `testbed.Vm` of the test's combination (VM type,
  vendor) with the marker's options and the overrides; every VM is closed after the test.
  `vm.load(path)` resolves a relative path against the test file's directory.
- `@pytest.mark.testbed(vm_types=[...], vendors=[...], **options)` parametrizes the test over
  every valid (VM type, vendor) pair (intel x sev is not generated); a pair the model refuses
  with the options given is a skip naming the reason. Ids read `sev-snp-amd`.
  `testbed_combination` is the test's pair (default: `default`/`amd` without the marker).
- A failed GUEST_ASSERT reads like a pytest assertion: the guest source around the line, both
  values in hex, the VM type; the last `--testbed-trace-tail` (30) trace events of each VM go
  into the failure report, and `--testbed-trace-dir DIR` keeps the whole trace of every
  failing test (DIR/<test id>.jsonl).

Every pytest run of anyone who installs testbed loads this module, so it imports only pytest
and the standard library: the host API is imported when a test first asks for a VM, and the
hooks return at once for a test that uses none of the plugin's fixtures or markers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
from collections import deque
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from testbed.api import Vm, VmExitError
    from testbed.vmm.vmm import VmEnd

# The golden-trace fixtures (testbed/pytest_golden.py) ride on this entry point.
if importlib.util.find_spec("testbed.pytest_golden") is not None:
    pytest_plugins = ["testbed.pytest_golden"]

#: the valid (VM type, vendor) pairs, as VmOptions.validate() allows them (testbed/options.py:
#: AMD_ONLY_VM_TYPES, INTEL_ONLY_VM_TYPES); spelled out here so collecting costs no import
#: (tests/test_pytest_plugin.py checks them against testbed.options)
VM_TYPES = ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx")
VENDORS = ("amd", "intel")
VM_TYPE_VENDORS = {"sev": ("amd",), "sev-es": ("amd",), "sev-snp": ("amd",), "tdx": ("intel",)}
DEFAULT_TRACE_TAIL = 30
#: lines of guest source shown on each side of a failed assert
CONTEXT_LINES = 2
U64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class TestbedCombination:
    """One (VM type, vendor) pair of a `@pytest.mark.testbed` test; str() is its test id."""

    __test__ = False  # not a test class, whatever its name

    vm_type: str = "default"
    vendor: str = "amd"

    def __str__(self) -> str:
        return f"{self.vm_type}-{self.vendor}"


# ------------------------------------------------------------------ configuration
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed", "testbed (confidential-VM hypercall ABI)")
    group.addoption("--testbed-trace-dir", metavar="DIR", default=None,
                    help="keep the whole event trace (JSON Lines) of each VM of every failing test in DIR")
    group.addoption("--testbed-trace-tail", metavar="N", type=int, default=DEFAULT_TRACE_TAIL,
                    help=f"trace events of each VM shown with a failure (default {DEFAULT_TRACE_TAIL}); "
                         "0 turns tracing off unless --testbed-trace-dir is given")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "testbed(vm_types=None, vendors=None, **options): run the test once per valid (VM type, vendor) "
        "pair; options are testbed.VmOptions fields given to every testbed_vm")
    tail = config.getoption("testbed_trace_tail", DEFAULT_TRACE_TAIL)
    if tail is not None and tail < 0:
        raise pytest.UsageError(f"--testbed-trace-tail {tail}: expected a number of events, 0 or more")


def _marker_error(nodeid: str, message: str) -> NoReturn:
    pytest.fail(f"{nodeid}: @pytest.mark.testbed: {message}", pytrace=False)


def _names(value: object, what: str, nodeid: str) -> list[str]:
    """The marker's list of VM types or vendors, lower case; its error otherwise."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        _marker_error(nodeid, f"{what} must be a list of names, not {value!r}")
    return [str(v).strip().lower() for v in value]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("testbed")
    if marker is None:
        return
    nodeid = metafunc.definition.nodeid
    if "testbed_combination" not in metafunc.fixturenames:
        _marker_error(nodeid, "the test uses none of testbed_vm, testbed_golden and testbed_combination, so it "
                              "has nothing to run each combination with")
    if marker.args:
        _marker_error(nodeid, "takes keyword arguments only: vm_types=[...], vendors=[...], VmOptions fields")
    kwargs = dict(marker.kwargs)
    vm_types = _names(kwargs.pop("vm_types", None) or list(VM_TYPES), "vm_types", nodeid)
    vendors = _names(kwargs.pop("vendors", None) or list(VENDORS), "vendors", nodeid)
    for name, known, what in ((vm_types, VM_TYPES, "VM type"), (vendors, VENDORS, "vendor")):
        for value in name:
            if value not in known:
                _marker_error(nodeid, f"unknown {what} {value!r}: expected one of {', '.join(known)}")
    skips = _combination_skips(kwargs, nodeid, vm_types, vendors)
    params = []
    for vm_type in dict.fromkeys(vm_types):
        for vendor in dict.fromkeys(vendors):
            if vendor not in VM_TYPE_VENDORS.get(vm_type, VENDORS):
                continue  # not a machine that exists (intel x sev): not generated
            combo = TestbedCombination(vm_type, vendor)
            reason = skips.get(combo)
            marks = [pytest.mark.skip(reason=f"testbed cannot run {combo}: {reason}")] if reason else []
            params.append(pytest.param(combo, id=str(combo), marks=marks))
    if not params:
        _marker_error(nodeid, f"no valid (VM type, vendor) pair in vm_types={vm_types} x vendors={vendors} "
                              f"(sev, sev-es and sev-snp need amd, tdx needs intel)")
    metafunc.parametrize("testbed_combination", params)


def _combination_skips(options: dict[str, Any], nodeid: str, vm_types: list[str],
                       vendors: list[str]) -> dict[TestbedCombination, str]:
    """The reason the model cannot run each pair with the marker's options (VmOptions.validate's
    UsageError, e.g. page-enc-status on sev-snp); none when there are no options. A value that is
    wrong on its own (an unknown field, memory="lots") is the marker's error, not a skip."""
    if not options:
        return {}
    from testbed.errors import UsageError
    from testbed.machine import VmOptions

    known = {f.name for f in dataclasses.fields(VmOptions)}
    unknown = sorted(set(options) - known - {"vm_type", "vendor"})
    if unknown:
        _marker_error(nodeid, f"unknown option {unknown[0]!r}; the options are vm_types, vendors and "
                              f"testbed.VmOptions' fields ({', '.join(sorted(known))})")
    if {"vm_type", "vendor"} & set(options):
        _marker_error(nodeid, "give vm_types=[...] and vendors=[...], not vm_type/vendor")
    try:
        VmOptions(**options)
    except UsageError as exc:
        _marker_error(nodeid, str(exc))
    skips = {}
    for vm_type in vm_types:
        for vendor in vendors:
            fields: dict[str, Any] = {"vm_type": vm_type, "vendor": vendor, **options}
            try:
                VmOptions(**fields).validate()
            except UsageError as exc:
                skips[TestbedCombination(vm_type, vendor)] = str(exc)
    return skips


# ------------------------------------------------------------------------ fixtures
class _TraceTail:
    """The VM's trace stream (VmOptions.trace): the last N lines in memory, and every line in
    a file when --testbed-trace-dir is given. The lines stay JSON until a failure shows them."""

    def __init__(self, tail: int, path: Path | None) -> None:
        self.lines: deque[str] = deque(maxlen=max(tail, 1))
        self.show = tail > 0
        self.count = 0
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")

    def write(self, text: str) -> int:
        self.count += 1
        self.lines.append(text)
        if self._file is not None:
            self._file.write(text)
        return len(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self, keep: bool) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            if not keep and self.path is not None:
                self.path.unlink(missing_ok=True)


@dataclasses.dataclass
class _TestState:
    """What the plugin keeps for one test that asked for VMs (item.stash)."""

    vms: list[Vm] = dataclasses.field(default_factory=list)
    failed: bool = False


_STATE = pytest.StashKey[_TestState]()


@pytest.fixture
def testbed_combination() -> TestbedCombination:
    """The test's (VM type, vendor): parametrized by @pytest.mark.testbed, else default/amd."""
    return TestbedCombination()


@pytest.fixture
def testbed_vm(request: pytest.FixtureRequest,
               testbed_combination: TestbedCombination) -> Iterator[Callable[..., Vm]]:
    """A factory: `testbed_vm(**overrides)` returns a testbed.Vm of the test's combination with
    the marker's options and the overrides (VmOptions fields); each is closed after the test.
    `vm.load(path)` resolves a relative `path` against the test file's directory."""
    state = _TestState()
    request.node.stash[_STATE] = state
    marker = request.node.get_closest_marker("testbed")
    defaults = {k: v for k, v in (marker.kwargs if marker else {}).items() if k not in ("vm_types", "vendors")}
    base = request.path.parent
    config = request.config
    tail = config.getoption("testbed_trace_tail", DEFAULT_TRACE_TAIL) or 0
    trace_dir = config.getoption("testbed_trace_dir", None)
    streams: list[_TraceTail] = []

    def factory(**overrides: Any) -> Vm:
        fields: dict[str, Any] = {"vm_type": testbed_combination.vm_type, "vendor": testbed_combination.vendor,
                                  **defaults, **overrides}
        stream = None
        if "trace" not in overrides and (tail or trace_dir):
            index = len(state.vms)
            path = None
            if trace_dir:
                name = _file_name(request.node.nodeid) + (f"-vm{index}" if index else "")
                path = Path(trace_dir) / f"{name}.jsonl"
            stream = _TraceTail(tail, path)
            fields["trace"] = stream
        vm = _vm_class()(base, stream, **fields)
        if stream is not None:
            streams.append(stream)
        state.vms.append(vm)
        return vm

    yield factory
    try:
        for vm in state.vms:
            vm.close()
    finally:
        # The item (and its stash) lives for the whole session: drop the closed VMs with it.
        state.vms.clear()
        for stream in streams:
            stream.close(keep=state.failed)


def _file_name(nodeid: str) -> str:
    """A test id as a file name: `tests/test_x.py::test_y[sev-amd]` -> `tests_test_x.py__test_y_sev-amd_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", nodeid)[-200:]


def _vm_class() -> Callable[..., Vm]:
    """testbed.Vm with `load` resolving relative guest paths against the test's directory;
    built on first use so that loading the plugin does not import the host API."""
    from testbed.api import Vm

    return _plugin_vm(Vm)


@functools.cache
def _plugin_vm(vm_class: type[Vm]) -> Callable[..., Vm]:
    """The subclass, one per Vm class: keyed on it so that a re-imported testbed.api (pytester
    restores sys.modules after an in-process run) gets its own, raising its own errors."""

    class PluginVm(vm_class):  # type: ignore[valid-type,misc]
        """A testbed.Vm made by the testbed_vm fixture."""

        def __init__(self, base: Path, trace: _TraceTail | None, /, **fields: Any) -> None:
            super().__init__(**fields)
            self.test_dir = base
            self.trace_tail = trace
            #: guest file name as the program names it -> where it was read from
            self.sources: dict[str, Path] = {}
            self.end: VmEnd | None = None

        def load(self, path: str | Path | None = None, *, text: str | None = None,
                 defines: dict[str, int | str] | None = None, timeout: float | None = None,
                 reuse: bool = False) -> Any:
            if path is not None and text is None and not Path(path).is_absolute():
                resolved = self.test_dir / path
                path = _shown_path(resolved)
                self.sources[str(path)] = resolved
            return super().load(path, text=text, defines=defines, timeout=timeout, reuse=reuse)

        def close(self) -> None:
            machine = self._machine
            if machine is not None and self.end is None:
                self.end = machine.vmm.ended  # which VM a failure came from, after the close
            super().close()

    return PluginVm


def _shown_path(path: Path) -> Path:
    """`path` relative to the current directory when it is below it (the name failures show)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


# ------------------------------------------------------------------------ reporting
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    state = item.stash.get(_STATE, None)
    if state is None:  # the test made no VM: nothing to add
        yield
        return
    excinfo = call.excinfo
    vm = None
    if excinfo is not None:
        from testbed.api import VmExitError

        if isinstance(excinfo.value, VmExitError):
            vm = _failing_vm(state, excinfo.value)
            _annotate(excinfo.value, vm, item.config.rootpath)
            if not item.config.getoption("fulltrace", False):
                _hide_testbed_frames(excinfo)
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    state.failed = True
    for index, each in enumerate(state.vms):
        section = _trace_section(each, index, len(state.vms), each is vm)
        if section is not None:
            report.sections.append(section)


def _hide_testbed_frames(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    """End the traceback in the test's own code, as a Python assert's does: the frames inside
    the host API (Vcpu.run_to_ucall -> raise) say nothing about the guest.

    pytest rebuilds tracebacks from the raw ones (Traceback.cut follows tb_next), so the raw
    chain is cut after the last frame outside testbed/ when only testbed frames follow it."""
    package = Path(__file__).resolve().parent

    def inside(tb: TracebackType) -> bool:
        return package in Path(tb.tb_frame.f_code.co_filename).resolve().parents

    last_outside = None
    tb: TracebackType | None = excinfo.tb
    while tb is not None:
        if not inside(tb):
            last_outside = tb
        tb = tb.tb_next
    if last_outside is None or last_outside.tb_next is None:
        return
    last_outside.tb_next = None
    excinfo.traceback = excinfo.traceback.filter(lambda entry: not inside(entry._rawentry))


def _failing_vm(state: _TestState, error: VmExitError) -> Vm | None:
    """The VM whose run ended with `error`: the one whose VMM recorded the same end."""
    ucall = getattr(error, "ucall", None)
    ended = []
    for vm in state.vms:
        machine = vm._machine
        end = machine.vmm.ended if machine is not None and not getattr(vm, "end", None) else getattr(vm, "end", None)
        if end is None:
            continue
        if ucall is not None and end.info.get("ucall") is ucall:
            return vm
        if end.outcome == error.outcome:
            ended.append(vm)
    if len(ended) == 1:
        return ended[0]
    return state.vms[0] if len(state.vms) == 1 else None


def _annotate(error: VmExitError, vm: Vm | None, rootpath: Path) -> None:
    """Add the guest's side of a failure to the exception as a note (PEP 678), which pytest prints
    under the error as it prints an assertion's explanation: the VM, the guest source around the
    failing line and the values in hex. Once per exception."""
    if getattr(error, "_testbed_annotated", False):
        return
    error._testbed_annotated = True  # type: ignore[attr-defined]
    from testbed.api import GuestAssertionError, GuestExceptionError

    where = f"VM type {vm.options.vm_type}, vendor {vm.options.vendor.value}" if vm is not None else "VM unknown"
    sources = getattr(vm, "sources", {}) if vm is not None else {}
    lines: list[str] = []
    if isinstance(error, GuestAssertionError):
        failure = error.failure
        lines.append(f"guest assertion failed on {where}, at {failure.file}:{failure.line}:")
        lines += _context(failure.file, failure.line, sources, rootpath)
        lines += _values(failure.kind, failure.message, failure.values)
        if failure.caller is not None:
            lines.append(f"in a helper called from {failure.caller[0]}:{failure.caller[1]}:")
            lines += _context(failure.caller[0], failure.caller[1], sources, rootpath, 0)
    elif isinstance(error, GuestExceptionError):
        exception = error.exception
        cr2 = f", cr2 {exception['cr2']:#x}" if isinstance(exception.get("cr2"), int) else ""
        lines.append(f"unhandled guest exception on {where}: vector {error.vector}, error code "
                     f"{error.error_code:#x}, rip {error.rip:#x}{cr2}")
        if exception.get("file") and exception.get("line"):
            lines.append(f"at {exception['file']}:{exception['line']}:")
            lines += _context(str(exception["file"]), int(exception["line"]), sources, rootpath)
    else:
        lines.append(f"the guest's run ended with {error.outcome} on {where}")
    error.add_note("\n".join(lines))


def _context(file: str, line: int, sources: dict[str, Path], rootpath: Path,
             around: int = CONTEXT_LINES) -> list[str]:
    """The source around `file:line`, the line marked with '>' (as pytest marks Python)."""
    path = sources.get(file, Path(file))
    if not path.is_absolute() and not path.exists():
        path = rootpath / path
    shown: list[str] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ["  (source not available)"]
    if not 1 <= line <= len(text):
        return shown
    width = len(str(min(line + around, len(text))))
    for number in range(max(1, line - around), min(line + around, len(text)) + 1):
        mark = ">" if number == line else " "
        shown.append(f"{mark} {number:>{width}} | {text[number - 1].rstrip()}")
    return shown


_RELATIONS = {"EQ": "==", "NE": "!=", "LT": "<", "LE": "<=", "GT": ">", "GE": ">="}


def _values(kind: str, message: str, values: tuple[int, ...]) -> list[str]:
    """The assert as written and each value in hex (signed ones also in decimal)."""
    if kind == "GUEST_FAIL":
        return [f"GUEST_FAIL {json.dumps(message)}"]
    signed = kind.startswith("GUEST_ASSERT_S")
    relation = _RELATIONS.get(kind.rsplit("_", 1)[-1].removeprefix("S")) if kind.startswith("GUEST_ASSERT_") else None
    lines = [f"{kind or 'assert'} {message}"]
    expression = message.removesuffix(" (signed)")
    operands = expression.split(f" {relation} ", 1) if relation else [expression]
    labels = ["left", "right"] if len(values) == 2 else ["value"] * len(values)
    for index, value in enumerate(values):
        operand = operands[index] if len(operands) == len(values) else ""
        text = f"  {labels[index] + ':':<6} {_hex(value, signed)}"
        if operand and not _is_literal(operand, value):
            text += f"  ({operand})"
        lines.append(text)
    return lines


def _is_literal(operand: str, value: int) -> bool:
    """Whether the operand is a number that is `value` (then naming it again says nothing)."""
    try:
        return int(operand.replace("_", ""), 0) & U64 == value & U64
    except ValueError:
        return False


def _hex(value: int, signed: bool) -> str:
    value &= U64
    if value >> 63:
        as_signed = value - (1 << 64)
        return f"{as_signed:#x} ({as_signed})" if signed else f"{value:#x} (= {as_signed} as s64)"
    return f"{value:#x}"


def _trace_section(vm: Vm, index: int, count: int, failing: bool) -> tuple[str, str] | None:
    stream = getattr(vm, "trace_tail", None)
    if not isinstance(stream, _TraceTail):
        return None
    which = f"VM {index + 1} of {count}, " if count > 1 else ""
    title = f"testbed trace: {which}{vm.options.vm_type}/{vm.options.vendor.value}"
    if failing and count > 1:
        title += " (the failing VM)"
    body: list[str] = []
    if stream.show:
        shown = len(stream.lines)
        title += f", last {shown} of {stream.count} events" if shown < stream.count else f", {shown} events"
        body = [_event_line(line) for line in stream.lines]
    if stream.path is not None:
        body.append(f"(whole trace: {stream.path})")
    return (title, "\n".join(body) or "(no events)") if body or stream.show else None


def _event_line(line: str) -> str:
    """One trace event, compact: `seq layer event key=value ...`, numbers from 16 up in hex."""
    try:
        event = json.loads(line)
    except ValueError:
        return line.rstrip()
    if not isinstance(event, dict):
        return line.rstrip()
    head = f"{event.pop('seq', '?'):>6} {event.pop('layer', '?'):<5} {event.pop('event', '?')}"
    event.pop("t", None)
    fields = " ".join(f"{key}={_field(value)}" for key, value in event.items())
    return f"{head} {fields}".rstrip()


def _field(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, int):
        return f"{value:#x}" if value >= 16 else str(value)
    if isinstance(value, list):
        return "[" + ",".join(_field(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) and (" " in value or not value) else str(value)


__all__ = ["TestbedCombination", "testbed_combination", "testbed_vm"]
