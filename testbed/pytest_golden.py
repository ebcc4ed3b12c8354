"""Golden traces from pytest: the `testbed_golden` fixture and `--testbed-update-golden`.

    def test_conversions(testbed_golden):
        testbed_golden.check("guests/conversions.s", vm_type="sev-snp", memory="16M")

`check` runs the guest (a path relative to the test file) with the default VMM and compares
what the host saw with its golden trace (testbed/golden.py), `golden/` beside the guest unless
`golden_dir` says otherwise (relative to the test file too); a difference fails the test with
the event-by-event diff naming the first divergent event and its guest line. With
`--testbed-update-golden` it writes the trace instead and passes. In a test parametrized by
`@pytest.mark.testbed` the VM type and vendor default to the test's combination.

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


def pytest_addoption(parser: pytest.Parser) -> None:
    """--testbed-update-golden."""
    group = parser.getgroup("testbed")
    group.addoption("--testbed-update-golden", action="store_true", default=False,
                    help="rewrite the golden traces testbed_golden checks instead of comparing")


class GoldenRecorder:
    """What `testbed_golden` gives a test: `check(guest, golden_dir=None, reuse=True, **options)`."""

    def __init__(self, base: Path, updating: bool, defaults: dict[str, Any]) -> None:
        self.base = base
        self.updating = updating
        self.defaults = defaults
        #: the paths written or checked by this test
        self.paths: list[Path] = []

    def _resolve(self, path: str | Path) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.base / p

    def check(self, guest: str | Path, *, golden_dir: str | Path | None = None, reuse: bool = True,
              **options: Any) -> Golden | GoldenDiff:
        """Compare the run of `guest` (VmOptions fields in `options`) with its golden trace;
        pytest.fail with the diff when they differ or there is none. With
        --testbed-update-golden, write the trace and return it."""
        from testbed.golden import check, golden_path, update
        from testbed.machine import VmOptions

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
            return update(source, opts, directory, reuse=reuse)[1]
        if not path.exists():
            pytest.fail(f"{path}: no golden trace; record it with pytest --testbed-update-golden", pytrace=False)
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
    return GoldenRecorder(request.path.parent, bool(request.config.getoption("testbed_update_golden", False)),
                          defaults)
