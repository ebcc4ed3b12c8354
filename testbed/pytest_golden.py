"""Golden traces from pytest: the `testbed_golden` fixture and `--testbed-update-golden`.

    def test_conversions(testbed_golden):
        testbed_golden.check("guests/conversions.s", vm_type="sev-snp", memory="16M")

`check` runs the guest (a path relative to the test file) with the default VMM and compares
what the host saw with its golden trace (testbed/golden.py), `golden/` beside the guest unless
`golden_dir` says otherwise (relative to the test file too); a difference fails the test with
the event-by-event diff naming the first divergent event and the guest line behind it (the
exiting instruction's, or for an exit the runtime made the guest's call into the runtime; a
few events, such as the final ucall after guest_main returned, have none). A run with other
options than the golden's fails too. With `--testbed-update-golden` it writes the trace
instead and passes; two tests of one session that would write one file with different options
(the file name has every option but memory): the second fails, naming the first. In a test parametrized
by `@pytest.mark.testbed` the VM type and vendor default to the test's combination. A golden
that cannot be read, or a guest that does not exist or assemble, fails the test with one line.

Loaded by the testbed plugin (testbed/pytest_plugin.py, entry point pytest11), or on its own
with `pytest_plugins = ["testbed.pytest_golden"]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the golden module (and the host API) load when a test first checks a trace
    from testbed.golden import Golden, GoldenDiff

__all__ = ["GoldenRecorder", "testbed_golden"]

#: the golden traces written in this session: path -> (the header, the test that wrote it)
_written_key: pytest.StashKey[dict[Path, tuple[dict[str, Any], str]]] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    """--testbed-update-golden."""
    group = parser.getgroup("testbed")
    group.addoption("--testbed-update-golden", action="store_true", default=False,
                    help="rewrite the golden traces testbed_golden checks instead of comparing")


class GoldenRecorder:
    """What `testbed_golden` gives a test: `check(guest, golden_dir=None, reuse=True, **options)`."""

    def __init__(self, base: Path, updating: bool, defaults: dict[str, Any],
                 written: dict[Path, tuple[dict[str, Any], str]] | None = None, nodeid: str = "") -> None:
        self.base = base
        self.updating = updating
        self.defaults = defaults
        #: the paths written or checked by this test
        self.paths: list[Path] = []
        self._written = written if written is not None else {}
        self._nodeid = nodeid

    def _resolve(self, path: str | Path) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.base / p

    def check(self, guest: str | Path, *, golden_dir: str | Path | None = None, reuse: bool = True,
              **options: Any) -> Golden | GoldenDiff:
        """Compare the run of `guest` (VmOptions fields in `options`) with its golden trace;
        pytest.fail with the diff when they differ or there is none. With
        --testbed-update-golden, write the trace and return it. A testbed error (an unreadable
        golden, a missing guest, an assembly error, bad options) fails the test with its one line."""
        from testbed.errors import TestbedError

        try:
            return self._check(guest, golden_dir, reuse, options)
        except TestbedError as exc:
            pytest.fail(str(exc), pytrace=False)

    def _check(self, guest: str | Path, golden_dir: str | Path | None, reuse: bool,
               options: dict[str, Any]) -> Golden | GoldenDiff:
        from testbed.golden import check, golden_path, header_differences, missing_message, record, write
        from testbed.machine import VmOptions, build_program

        fields = {**self.defaults, **options}
        if fields.get("vm_type") == "tdx" and "vendor" not in options:
            fields["vendor"] = "intel"
        opts = VmOptions(**fields)
        opts.validate()
        source = self._resolve(guest)
        directory = self._resolve(golden_dir) if golden_dir is not None else None
        path = golden_path(source, opts, directory)
        self.paths.append(path)
        if self.updating:
            golden = record(source, opts, reuse=reuse)
            earlier = self._written.get(path)
            if earlier is not None and header_differences(earlier[0], golden.header):
                pytest.fail(f"{path}: {earlier[1]} wrote this golden trace in this session with other options; "
                            f"this test has {header_differences(earlier[0], golden.header)}: give one of them its own "
                            "golden_dir", pytrace=False)
            write(path, golden)
            self._written[path] = (golden.header, self._nodeid)
            return golden
        if not path.exists():
            build_program(source, opts)  # a missing guest or an assembly error says so, not "no golden trace"
            pytest.fail(f"{missing_message(path)}; record it with pytest --testbed-update-golden", pytrace=False)
        diff = check(source, opts, directory, reuse=reuse)
        if not diff.equal:
            pytest.fail(diff.text, pytrace=False)
        return diff


@pytest.fixture
def testbed_golden(request: pytest.FixtureRequest, testbed_combination: Any) -> GoldenRecorder:
    """Check (or, with --testbed-update-golden, record) golden traces of guest runs: of the test's
    combination (@pytest.mark.testbed, else default/amd) with the marker's options."""
    marker = request.node.get_closest_marker("testbed")
    defaults: dict[str, Any] = {k: v for k, v in (marker.kwargs if marker else {}).items()
                                if k not in ("vm_types", "vendors")}
    defaults.update(vm_type=testbed_combination.vm_type, vendor=testbed_combination.vendor)
    written = request.config.stash.setdefault(_written_key, {})
    return GoldenRecorder(request.path.parent, bool(request.config.getoption("testbed_update_golden", False)),
                          defaults, written, request.node.nodeid)
