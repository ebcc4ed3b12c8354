"""The pytest plugin (testbed/pytest_plugin.py), run on small external test files with pytester.

1. The entry point registers it; loading it imports no host API or emulator.
2. @pytest.mark.testbed generates the valid (VM type, vendor) pairs with ids naming them; a
   pair the model refuses is a skip with the reason; a bad marker is a collection error.
3. testbed_vm loads guests relative to the test file and closes its VMs after the test.
4. A failed guest assert reads like a pytest assertion (source, hex values, VM type) with the
   trace's last events; --testbed-trace-dir keeps the traces of failing tests only.
5. The README's regression-test example runs as written.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from testbed import pytest_plugin
from testbed.errors import UsageError
from testbed.machine import VmOptions

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

FAILING_GUEST = """\
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1
    call set_memory_shared
    GUEST_SYNC rax
    mov rax, 5
    GUEST_ASSERT_EQ rax, 6
    ret
"""

PASSING_GUEST = """\
guest_main:
    GUEST_SYNC 7
    ret
"""


def test_entry_point_registers_the_plugin() -> None:
    """`pip install` registers testbed.pytest_plugin under pytest11 as `testbed`."""
    found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert found.get("testbed") == "testbed.pytest_plugin"


def test_loading_the_plugin_imports_no_host_api() -> None:
    """Loading the plugin and the modules it pulls in imports neither the host API nor the
    emulator: every pytest run of anyone who installed testbed loads it."""
    code = ("import sys, pytest; before = set(sys.modules); import importlib, testbed.pytest_plugin as p\n"
            "for name in getattr(p, 'pytest_plugins', []): importlib.import_module(name)\n"
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('testbed', 'unicorn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert loaded <= {"testbed", "testbed.pytest_plugin", "testbed.pytest_golden"}, sorted(loaded)


def test_valid_pairs_are_those_vm_options_accept() -> None:
    """The plugin's (VM type, vendor) table is exactly what VmOptions.validate() accepts."""
    for vm_type in pytest_plugin.VM_TYPES:
        for vendor in pytest_plugin.VENDORS:
            try:
                VmOptions(vm_type=vm_type, vendor=vendor, memory=8 << 20).validate()
                accepted = True
            except UsageError:
                accepted = False
            assert accepted == (vendor in pytest_plugin.VM_TYPE_VENDORS.get(vm_type, pytest_plugin.VENDORS))


def test_marker_generates_each_valid_pair_with_its_id(pytester: pytest.Pytester) -> None:
    """The marker without lists gives every valid pair, ids `vm_type-vendor`, no intel x sev."""
    pytester.makepyfile(test_ids="""
        import pytest

        @pytest.mark.testbed
        def test_one(testbed_combination):
            assert str(testbed_combination) == f"{testbed_combination.vm_type}-{testbed_combination.vendor}"
    """)
    result = pytester.runpytest("--collect-only", "-q")
    ids = re.findall(r"test_one\[([^\]]+)\]", result.stdout.str())
    assert ids == ["default-amd", "default-intel", "sw-protected-amd", "sw-protected-intel", "sev-amd",
                   "sev-es-amd", "sev-snp-amd", "tdx-intel"]


def test_a_pair_the_model_refuses_is_a_skip_with_its_reason(pytester: pytest.Pytester) -> None:
    """With options the model refuses for a pair (page-enc-status on sev-snp) that pair skips,
    naming the refusal; intel is never paired with sev."""
    pytester.makepyfile(test_skip="""
        import pytest

        @pytest.mark.testbed(vm_types=["sev", "sev-snp"], vendors=["amd", "intel"], hc_protocol="page-enc-status")
        def test_one(testbed_combination):
            pass
    """)
    result = pytester.runpytest("-rs", "-v")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_one?sev-amd? PASSED*",
                                 "*testbed cannot run sev-snp-amd: hypercall protocol page-enc-status*"])
    assert "intel" not in result.stdout.str()


#: (marker arguments, what the error says): one test file each, collected in one session
BAD_MARKERS = [
    ('vm_types=["sev", "nope"]', "unknown VM type 'nope'"),
    ('vm_types=["sev"], memory="lots"', "memory size"),
    ('vm_types=["sev"], colour="red"', "unknown option 'colour'"),
    ('vm_types=["tdx"], vendors=["amd"]', "no valid (VM type, vendor) pair"),
]


def test_a_bad_marker_is_a_collection_error_naming_it(pytester: pytest.Pytester) -> None:
    """A marker naming what does not exist fails collection with one line saying what, no traceback."""
    for i, (marker, _) in enumerate(BAD_MARKERS):
        pytester.makepyfile(**{f"test_bad_{i}": f"""
            import pytest

            @pytest.mark.testbed({marker})
            def test_one(testbed_vm):
                pass
        """})
    result = pytester.runpytest()
    result.assert_outcomes(errors=len(BAD_MARKERS))
    out = result.stdout.str()
    assert "Traceback" not in out
    for i, (_, message) in enumerate(BAD_MARKERS):  # each file's error line names its marker's problem
        prefix = f"test_bad_{i}.py::test_one: @pytest.mark.testbed: "
        assert any(line.startswith(prefix) and message in line for line in out.splitlines()), (prefix, message)


def test_marker_without_the_fixtures_is_an_error(pytester: pytest.Pytester) -> None:
    """A marked test that asks for neither testbed_vm nor testbed_combination is told so."""
    pytester.makepyfile(test_bare="""
        import pytest

        @pytest.mark.testbed(vm_types=["sev"])
        def test_one():
            pass
    """)
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    assert "uses none of testbed_vm, testbed_golden and testbed_combination" in result.stdout.str()


def test_testbed_vm_loads_beside_the_test_and_closes_after(pytester: pytest.Pytester) -> None:
    """testbed_vm gives a Vm of the test's pair (overrides win), loads paths relative to the test
    file whatever the current directory, and closes every VM after the test."""
    sub = pytester.mkdir("suite")
    (sub / "guests").mkdir()
    (sub / "guests" / "ok.s").write_text(PASSING_GUEST)
    (sub / "test_vm.py").write_text("""
import pytest
import testbed
from testbed.errors import MachineClosedError

MADE = []

@pytest.mark.testbed(vm_types=["default", "sev"], vendors=["amd"], memory="8M")
def test_runs(testbed_vm, testbed_combination):
    vm = testbed_vm()
    other = testbed_vm(vm_type="default", vendor="intel")
    assert isinstance(vm, testbed.Vm) and vm.options.vm_type == testbed_combination.vm_type
    assert vm.options.memory == 8 << 20 and other.options.vendor.value == "intel"
    assert vm.load("guests/ok.s").run_to_ucall().args == [7]
    MADE.extend([vm, other])

def test_closed_after():
    assert len(MADE) == 4
    for vm in MADE:
        with pytest.raises(MachineClosedError):
            vm.machine
""")
    result = pytester.runpytest(str(sub / "test_vm.py"))  # from pytester.path, above suite/
    result.assert_outcomes(passed=3)


def test_failed_guest_assert_reads_like_an_assertion(pytester: pytest.Pytester) -> None:
    """A failed GUEST_ASSERT_EQ shows the guest line with context, both values in hex and the VM
    type, ends the traceback in the test, and attaches the trace's last events (the abort ucall)."""
    (pytester.mkdir("guests") / "fail.s").write_text(FAILING_GUEST)
    pytester.makepyfile(test_fail="""
        import pytest

        @pytest.mark.testbed(vm_types=["sev"], memory="8M")
        def test_one(testbed_vm):
            vcpu = testbed_vm().load("guests/fail.s")
            assert vcpu.run_to_ucall().args == [0]
            vcpu.run_to_ucall()
    """)
    result = pytester.runpytest("--testbed-trace-tail", "5")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        ">*vcpu.run_to_ucall()",
        "E*GuestAssertionError: guests/fail.s:7: rax == 6 failed: 0x5 != 0x6",
        "E*guest assertion failed on VM type sev, vendor amd, at guests/fail.s:7:",
        "E*  6 |     mov rax, 5",
        "E*> 7 |     GUEST_ASSERT_EQ rax, 6",
        "E*  8 |     ret",
        "E*GUEST_ASSERT_EQ rax == 6",
        "E*left:  0x5  (rax)",
        "E*right: 0x6",
        "test_fail.py:7: GuestAssertionError",
        "*testbed trace: sev/amd, last 5 of * events*",
        "*guest ucall cmd=abort args=[[]1,*,5,6[]]",
    ])
    assert "testbed/api.py" not in result.stdout.str()


def test_trace_dir_keeps_the_traces_of_failing_tests_only(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """--testbed-trace-dir keeps the whole trace of each VM of a failing test and none of a passing one."""
    guests = pytester.mkdir("guests")
    (guests / "fail.s").write_text(FAILING_GUEST)
    (guests / "ok.s").write_text(PASSING_GUEST)
    pytester.makepyfile(test_traces="""
        def test_fails(testbed_vm):
            vcpu = testbed_vm(memory="8M").load("guests/fail.s")
            vcpu.run_to_ucall()
            vcpu.run_to_ucall()

        def test_passes(testbed_vm):
            assert testbed_vm(memory="8M").load("guests/ok.s").run_to_ucall().args == [7]
    """)
    trace_dir = tmp_path / "traces"
    result = pytester.runpytest("--testbed-trace-dir", str(trace_dir), "--testbed-trace-tail", "0")
    result.assert_outcomes(failed=1, passed=1)
    kept = sorted(p.name for p in trace_dir.iterdir())
    assert kept == ["test_traces.py__test_fails.jsonl"]
    lines = (trace_dir / kept[0]).read_text().splitlines()
    assert '"cmd": "abort"' in lines[-2] and len(lines) > 5
    result.stdout.fnmatch_lines([f"(whole trace: {trace_dir / kept[0]})"])


def test_a_test_without_the_plugin_gets_nothing_added(pytester: pytest.Pytester) -> None:
    """A failing test that uses no testbed fixture is reported exactly as without the plugin."""
    pytester.makepyfile(test_plain="""
        def test_plain():
            assert 1 == 2
    """)
    with_plugin = pytester.runpytest()
    without = pytester.runpytest("-p", "no:testbed")
    with_plugin.assert_outcomes(failed=1)
    strip = re.compile(r" in [0-9.]+s|^plugins: .*$", re.M)
    assert "testbed" not in strip.sub("", with_plugin.stdout.str())
    assert strip.sub("", with_plugin.stdout.str()) == strip.sub("", without.stdout.str())


def test_readme_regression_example_runs(pytester: pytest.Pytester) -> None:
    """The README's "Writing a regression test" guest and test pass as written, on every pair."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Writing a regression test", 1)[1].split("\n## ", 1)[0]
    guest = re.search(r"```asm\n(# tests/guests/map_shared\.s.*?)```", section, re.S)
    test = re.search(r"```python\n(# tests/test_map_shared\.py.*?)```", section, re.S)
    assert guest and test
    (pytester.mkdir("tests") / "guests").mkdir()
    (pytester.path / "tests" / "guests" / "map_shared.s").write_text(guest.group(1))
    (pytester.path / "tests" / "test_map_shared.py").write_text(test.group(1))
    result = pytester.runpytest("tests", "-v")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*test_converted_pages_are_shared?tdx-intel? PASSED*"])
