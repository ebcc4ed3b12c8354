"""Golden traces (testbed/golden.py, testbed/pytest_golden.py, `testbed golden`).

The shipped goldens under tests/golden pin what the host saw for every bundled guest that ends
in done, per VM type; rewrite them with `pytest tests/test_golden.py --testbed-update-golden`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import main
from testbed.errors import UsageError
from testbed.golden import FORMAT, Golden, check, compare, golden_path, read, record, update, write
from testbed.machine import VmOptions
from testbed.pytest_golden import GoldenRecorder

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
MEMORY = "16M"

#: bundled guest -> the VM types under which it ends in done (each has a golden trace)
SHIPPED: dict[str, tuple[str, ...]] = {
    "cli_trace": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "conversions": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "exceptions_handled": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "exceptions_user": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "fix_hypercall": ("default", "sw-protected", "sev", "sev-es", "sev-snp"),
    "ghcb_hostile": ("sev-es", "sev-snp"),
    "ghcb_kvm_version": ("sev-es", "sev-snp"),
    "hypercall_abi_call": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "hypercall_abi_gprs": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "hypercall_insn": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "psc_exitinfo1_only": ("sev-snp",),
    "sev_cbit_alias": ("default", "sw-protected", "sev", "sev-es", "tdx"),
    "sev_detect": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "stale_ciphertext": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
    "tdx_runtime": ("default", "sw-protected", "sev", "sev-es", "sev-snp", "tdx"),
}
CASES = [(guest, vm_type) for guest, types in SHIPPED.items() for vm_type in types]

#: a guest using the wrong vendor's hypercall instruction (VMCALL on AMD): KVM's fix-up quirk
#: decides what the host sees
WRONG_VENDOR = textwrap.dedent("""\
    guest_main:
        mov rax, KVM_HC_SCHED_YIELD
        xor ebx, ebx
        VMCALL
        GUEST_ASSERT_EQ rax, 0
        GUEST_SYNC rax
        ret
""")
WRONG_VENDOR_LINE = 4


def _options(vm_type: str, **more: Any) -> VmOptions:
    return VmOptions(vm_type=vm_type, vendor="intel" if vm_type == "tdx" else "amd", memory=MEMORY, **more)


@pytest.mark.parametrize(("guest", "vm_type"), CASES, ids=[f"{g}-{t}" for g, t in CASES])
def test_shipped_golden(testbed_golden: GoldenRecorder, guest: str, vm_type: str) -> None:
    """Each bundled guest that ends in done shows the host what its golden trace recorded."""
    testbed_golden.check(f"../guests/{guest}.s", vm_type=vm_type, memory=MEMORY, golden_dir="golden")


def test_shipped_goldens_are_exactly_the_cases() -> None:
    """tests/golden holds one trace per shipped (guest, VM type) and nothing else, each ending in done."""
    expected = {golden_path(ROOT / "guests" / f"{g}.s", _options(t), GOLDEN_DIR).name for g, t in CASES}
    assert {p.name for p in GOLDEN_DIR.glob("*.jsonl")} == expected
    for name in expected:
        golden = read(GOLDEN_DIR / name)
        assert golden.events[-2] == {"event": "end", "outcome": "done", "detail": ""}, name
        assert golden.events[-1]["event"] == "shared_ranges"


def test_golden_has_no_times_or_host_addresses() -> None:
    """A golden record carries no times, sequence numbers, layers or RIPs (only guest file:line)."""
    golden = record(ROOT / "guests" / "conversions.s", _options("sev-es"))
    for event in golden.events:
        assert not {"t", "seq", "layer", "rip", "gpa_ghcb"} & set(event), event
        assert "/" not in event.get("at", ""), event


def test_golden_of_a_failing_guest_is_the_same_wherever_the_guest_lives(tmp_path: Path) -> None:
    """A fault's file:line (by file name) and symbol are the end's `at`, its detail has no RIP, so
    the record does not depend on where the checkout is."""
    text = "guest_main:\n    ud2\n"
    goldens = []
    for where in ("a", "b/c"):
        guest = tmp_path / where / "fails.s"
        guest.parent.mkdir(parents=True)
        guest.write_text(text)
        goldens.append(record(guest, _options("default"), reuse=False))
    end = next(e for e in goldens[0].events if e["event"] == "end")
    assert end["outcome"] == "unhandled_exception"
    assert end["detail"] == "unexpected #UD", end
    assert end["at"] == "fails.s:2 (guest_main+0x0)", end
    assert goldens[0].events == goldens[1].events


def test_reuse_records_what_a_fresh_boot_records() -> None:
    """A golden recorded on a pooled machine (reuse=True) equals one recorded after a fresh boot."""
    guest = ROOT / "guests" / "conversions.s"
    fresh = record(guest, _options("sev-snp"), reuse=False)
    assert record(guest, _options("sev-snp"), reuse=True) == fresh
    assert record(guest, _options("sev-snp"), reuse=True) == fresh  # from the pool


def test_golden_is_the_same_in_two_processes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed golden update` writes byte-identical traces in two separate processes (fixed key
    and seed): a new one, and this one, which has run other guests before."""
    argv = ["golden", "update", str(ROOT / "guests" / "conversions.s"), "--vm-type", "sev,tdx", "--memory", MEMORY]
    subprocess.run([sys.executable, "-c", "import sys; from testbed.cli import main; sys.exit(main())",
                    *argv, "--golden-dir", str(tmp_path / "a")], check=True, capture_output=True, cwd=tmp_path)
    assert main([*argv, "--golden-dir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    outs = [{p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name in ("a", "b")]
    assert outs[0] == outs[1]
    assert set(outs[0]) == {"conversions.sev.jsonl", "conversions.tdx.jsonl"}


def test_wrong_vendor_vmcall_without_fix_names_first_divergence(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A run with KVM's fix-up quirk off, compared with a golden recorded with it, fails naming the
    option, the first divergent event (the patch vs the injected #UD) and the guest line of the
    VMCALL (x86.c emulator_fix_hypercall, svm.c ud_interception); `golden check` with the option
    looks for that option's own golden and says which goldens the guest has."""
    guest = tmp_path / "wrong_vendor.s"
    guest.write_text(WRONG_VENDOR)
    assert main(["golden", "update", str(guest), "--memory", MEMORY]) == 0
    path = tmp_path / "golden" / "wrong_vendor.default.jsonl"
    assert path.exists()
    capsys.readouterr()
    assert main(["golden", "check", str(guest), "--memory", MEMORY]) == 0
    assert capsys.readouterr().out == f"ok {path}\n"

    assert main(["golden", "check", str(guest), "--memory", MEMORY, "--no-fix-hypercall"]) == 1
    assert capsys.readouterr().out == (
        f"{tmp_path / 'golden' / 'wrong_vendor.fix_hypercall=false.default.jsonl'}: no golden trace for these "
        "options (this guest has: wrong_vendor.default.jsonl); record it with `testbed golden update`\n")

    diff = compare(path, read(path), record(guest, _options("default", fix_hypercall=False)))
    lines = diff.text.splitlines()
    assert lines[0] == f"{path}: the run differs from the golden trace (7 events recorded, 5 now)"
    assert lines[1] == "  recorded with fix_hypercall the default (this run: false)"
    assert lines[2] == f"first divergence at event 2 (guest line wrong_vendor.s:{WRONG_VENDOR_LINE}):"
    assert lines[3].startswith('  expected: {"event": "fix_hypercall", "old": "0f01c1", "new": "0f01d9"}')
    assert lines[4].startswith('  got:      {"event": "inject", "vector": 6, "error_code": null}')
    assert f"[wrong_vendor.s:{WRONG_VENDOR_LINE}]" in lines[4]
    assert ('+    4  {"event": "end", "outcome": "unhandled_exception", "detail": "unexpected #UD"}'
            f"   [wrong_vendor.s:{WRONG_VENDOR_LINE} (guest_main+0x9)]") in lines


def test_compare_names_differing_fields() -> None:
    """Two events of the same kind that differ list each differing field with both values in hex."""
    base = record(ROOT / "guests" / "conversions.s", _options("default"))
    changed = json.loads(json.dumps(base.events))
    index = next(i for i, e in enumerate(changed) if e["event"] == "user_exit")
    changed[index]["ret"] = -22
    diff = compare(Path("x.jsonl"), base, type(base)(base.header, changed))
    assert diff.first == index
    assert "    ret: expected 0x0, got -22 (0xffffffffffffffea)" in diff.text.splitlines()


def test_check_reports_missing_and_malformed_goldens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing golden is a check failure (exit 1) naming the file; a malformed one (bad JSON, bytes
    that are no UTF-8) a usage error naming its line; a missing guest a usage error naming it."""
    guest = tmp_path / "g.s"
    guest.write_text("guest_main:\n    ret\n")
    assert main(["golden", "check", str(guest)]) == 1
    assert "g.default.jsonl: no golden trace" in capsys.readouterr().out
    # a missing guest is a usage error naming it (status 2), as for `golden update`
    assert main(["golden", "check", str(tmp_path / "absent.s")]) == 2
    assert "absent.s: no such guest source file" in capsys.readouterr().err
    # so is an empty VM type in the list
    assert main(["golden", "check", str(guest), "--vm-type", "default,,"]) == 2
    assert "--vm-type 'default,,'" in capsys.readouterr().err
    bad = tmp_path / "golden" / "g.default.jsonl"
    bad.parent.mkdir()
    bad.write_text(f'{{"golden": {FORMAT}}}\n{{"event": "end"}}\nnot json\n')
    with pytest.raises(UsageError, match=r"g\.default\.jsonl:3: not JSON"):
        check(guest, VmOptions())
    assert main(["golden", "check", str(guest)]) == 2
    assert "g.default.jsonl:3: not JSON" in capsys.readouterr().err
    bad.write_text('{"golden": 99}\n')
    with pytest.raises(UsageError, match=f"not a golden trace of format {FORMAT}"):
        read(bad)
    bad.write_bytes(b'{"golden": 2}\n{"event": "x\xfc"}\n')  # binary bytes: located at their line
    with pytest.raises(UsageError, match=r"g\.default\.jsonl:2: not UTF-8 text \(byte 0xfc at column 13\)"):
        read(bad)


def test_update_names_defines_and_foreign_vendor(tmp_path: Path) -> None:
    """The file name carries the defines and a vendor other than the VM type's own."""
    options = VmOptions(vendor="intel", defines={"INSN": 1})
    path, golden = update(ROOT / "guests" / "hypercall_insn.s", options, tmp_path)
    assert path.name == "hypercall_insn.INSN=1.default.intel.jsonl"
    assert golden.header["defines"] == {"INSN": 1} and golden.header["vendor"] == "intel"


def test_pytest_fixture_update_then_check_fails_readably(pytester: pytest.Pytester) -> None:
    """With the fixture, --testbed-update-golden records; a later run whose host view changed (here
    the guest now uses the native VMMCALL, so KVM has no #UD to fix up) fails the test with the
    diff naming the first divergent event and the guest line."""
    pytester.makefile(".s", wrong_vendor=WRONG_VENDOR)
    pytester.makepyfile(test_abi="""
        def test_abi(testbed_golden):
            testbed_golden.check("wrong_vendor.s", memory="16M")
    """)
    pytester.syspathinsert(str(ROOT))
    result = pytester.runpytest("-p", "testbed.pytest_golden", "--testbed-update-golden", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    assert (pytester.path / "golden" / "wrong_vendor.default.jsonl").exists()
    result = pytester.runpytest("-p", "testbed.pytest_golden", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
    pytester.makefile(".s", wrong_vendor=WRONG_VENDOR.replace("VMCALL", "VMMCALL"))
    result = pytester.runpytest("-p", "testbed.pytest_golden", "-p", "no:xdist")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*first divergence at event 1 (guest line wrong_vendor.s:{WRONG_VENDOR_LINE}):*",
                                 '*expected: {"event": "ud", "decode": "vmcall"}*',
                                 '*got:      {"event": "hypercall", "nr": 11*'])


# ------------------------------------------------------------------------ review 82 (golden)
#: a guest reading KVM's PV feature leaf: what KVM answers depends on --pv-features
CPUID_GUEST = textwrap.dedent("""\
    guest_main:
        mov eax, 0x40000001
        xor ecx, ecx
        cpuid
        GUEST_SYNC rax
        GUEST_DONE
""")


@pytest.mark.parametrize(("vm_type", "answer", "registers"), [
    ("sev-snp", "ghcb_answer", {"info1", "info2", "rax", "rbx", "rcx", "rdx"}),
    ("tdx", "tdvmcall_answer", {"r10", "r12", "r13", "r14", "r15"}),
])
def test_answer_records_the_registers_kvm_returns(tmp_path: Path, vm_type: str, answer: str,
                                                 registers: set[str]) -> None:
    """A GHCB / TDVMCALL answer records the output registers of the exit (CPUID's four), and only
    those: a KVM that answers CPUID otherwise diverges at that answer, an OUT's answer has none."""
    guest = tmp_path / "cpuid.s"
    guest.write_text(CPUID_GUEST)
    before = record(guest, _options(vm_type))
    after = record(guest, _options(vm_type, pv_features="none"))
    first = next(e for e in before.events if e["event"] == answer)
    assert set(first) - {"event", "at"} == registers, first
    events = Golden(before.header, after.events)  # the same header: only what KVM answered differs
    diff = compare(tmp_path / "x.jsonl", before, events)
    assert diff.first == before.events.index(first), diff.text
    assert "guest line cpuid.s:4" in diff.text.splitlines()[1]
    out = [e for e in before.events if e["event"] == answer][1:]  # the ucall's port I/O: an OUT
    assert out and all(set(e) - {"event", "at"} <= {"info1", "info2", "r10"} for e in out), out


def test_a_run_with_other_options_fails_even_when_its_events_match(tmp_path: Path) -> None:
    """A golden whose header has other options (or VM type, vendor, defines) than the run fails the
    check with the difference named, though every event matches."""
    guest = tmp_path / "g.s"
    guest.write_text("guest_main:\n    ret\n")
    golden = record(guest, _options("default"))
    other = Golden({**golden.header, "options": {**golden.header["options"], "fix_hypercall": False}},
                   golden.events)
    diff = compare(tmp_path / "g.default.jsonl", other, golden)
    assert not diff.equal
    assert diff.text.splitlines() == [
        f"{tmp_path / 'g.default.jsonl'}: the run's options differ from the golden trace's (the 3 events match)",
        "  recorded with fix_hypercall false (this run: the default)"]
    moved = Golden({**golden.header, "vendor": "intel"}, golden.events)
    assert 'vendor "intel" (this run: "amd")' in compare(tmp_path / "g.jsonl", moved, golden).text
    assert compare(tmp_path / "g.jsonl", Golden({**golden.header, "guest": "g.asm"}, golden.events), golden).equal


def test_options_name_the_golden_file(tmp_path: Path) -> None:
    """Non-default options are part of the file name (a long value as a short hash), so tests with
    other options never share a golden; default options, memory and the golden seed leave the
    name as it was."""
    guest = tmp_path / "g.s"
    assert golden_path(guest, VmOptions(memory="16M")).name == "g.default.jsonl"
    assert golden_path(guest, VmOptions(seed=1)).name == "g.default.jsonl"
    assert golden_path(guest, VmOptions(fix_hypercall=False)).name == "g.fix_hypercall=false.default.jsonl"
    assert golden_path(guest, VmOptions(kvm_version="7.1", pv_features="none", seed=5)).name == \
        "g.kvm_version=7.1.pv_features=0.seed=5.default.jsonl"
    long = golden_path(guest, VmOptions(refuse_conversions=["0x600000:4:shared", "0x700000:1"])).name
    assert long.startswith("g.refuse_conversions=") and long.endswith(".default.jsonl")
    assert long != golden_path(guest, VmOptions(refuse_conversions=["0x600000:4:shared"])).name
    assert len(long) == len("g.refuse_conversions=12345678.default.jsonl")


def test_tests_with_other_options_keep_their_own_goldens(tmp_path: Path) -> None:
    """Two tests of one guest, with the fix-up quirk on and off, each write and then check their own
    golden; two tests that would write one file with other options (memory) fail the second,
    naming the first, in one line."""
    (tmp_path / "wrong_vendor.s").write_text(WRONG_VENDOR)
    on, off = {"memory": MEMORY}, {"memory": MEMORY, "fix_hypercall": False}
    for updating in (True, False):
        for options in (on, off):
            GoldenRecorder(tmp_path, updating, {}).check("wrong_vendor.s", **options)
    assert sorted(p.name for p in (tmp_path / "golden").iterdir()) == [
        "wrong_vendor.default.jsonl", "wrong_vendor.fix_hypercall=false.default.jsonl"]

    written: dict[Path, tuple[dict[str, Any], str]] = {}
    GoldenRecorder(tmp_path, True, {}, written, "t.py::test_quirk_on").check("wrong_vendor.s", **on)
    large = GoldenRecorder(tmp_path, True, {}, written, "t.py::test_large")
    with pytest.raises(pytest.fail.Exception) as failed:
        large.check("wrong_vendor.s", memory="32M")
    assert not failed.value.pytrace
    assert str(failed.value) == (
        f"{tmp_path / 'golden' / 'wrong_vendor.default.jsonl'}: t.py::test_quirk_on wrote this golden trace in this "
        "session with other options; this test has memory 16777216 (this run: 33554432): give one of them its "
        "own golden_dir")


def test_write_uses_a_temporary_file_of_its_own(tmp_path: Path) -> None:
    """Writing a golden never uses a fixed temporary name (parallel writers of one path under
    pytest-xdist), and leaves no temporary file behind when it fails."""
    golden = Golden({"golden": FORMAT}, [{"event": "end"}])
    path = tmp_path / "g.default.jsonl"
    (tmp_path / "g.default.jsonl.tmp").mkdir()  # the name every writer used to share
    write(path, golden)
    assert read(path) == golden
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    blocked = tmp_path / "dir.jsonl"
    blocked.mkdir()
    with pytest.raises(UsageError, match=r"cannot write golden trace .*dir\.jsonl"):
        write(blocked, golden)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.jsonl", "g.default.jsonl", "g.default.jsonl.tmp"]


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: a guest whose assert fails; the variants below differ in comments and code before the assert
FAILING_ASSERT = "guest_main:\n    mov rax, 1\n    GUEST_ASSERT_EQ rax, 0\n    GUEST_DONE\n"


def test_golden_does_not_depend_on_how_the_guest_path_is_written(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing guest recorded by a relative path, from a directory with a space in its name or
    with a .asm suffix compares equal: source paths are file names, locations are not compared."""
    monkeypatch.chdir(tmp_path)
    goldens = []
    for where in ("cli/af.s", "dir with space/af.s", "x/af.asm"):
        guest = Path(where)
        guest.parent.mkdir()
        guest.write_text(FAILING_ASSERT)
        goldens.append(record(guest, _options("default"), reuse=False))
    end = goldens[0].events[-2]
    assert end == {"event": "end", "outcome": "guest_assert", "detail": "rax == 0 failed: 0x1 != 0x0",
                   "at": "af.s:3"}, end
    for other in goldens[1:]:
        assert compare(tmp_path / "af.jsonl", goldens[0], other).equal


def test_comments_and_code_before_a_failure_do_not_break_its_golden(tmp_path: Path) -> None:
    """A comment line above a failing assert, or an instruction inserted before it or before a
    fault, changes only `at` (shown, not compared): no code address (the assert's, a RIP) is
    compared, while the diff still shows where."""
    guest = tmp_path / "af.s"
    base = record(guest, _options("sev-es"), text=FAILING_ASSERT)
    commented = record(guest, _options("sev-es"), text="# a comment\n" + FAILING_ASSERT)
    inserted = record(guest, _options("sev-es"), text=FAILING_ASSERT.replace("    mov", "    nop\n    mov"))
    for other in (commented, inserted):
        assert compare(tmp_path / "af.jsonl", base, other).equal
    assert commented.events[-2]["at"] == "af.s:4" and base.events[-2]["at"] == "af.s:3"
    abort = next(e for e in base.events if e["event"] == "ucall")
    assert abort == {"event": "ucall", "cmd": "abort", "args": [1, 0], "at": "af.s:3"}, abort
    fault = "guest_main:\n    ud2\n"
    faulted = record(guest, _options("default"), text=fault)
    assert compare(tmp_path / "af.jsonl", faulted, record(guest, _options("default"), text=fault.replace(
        "    ud2", "    nop\n    ud2"))).equal
    unhandled = next(e for e in faulted.events if e["event"] == "ucall")
    assert unhandled == {"event": "ucall", "cmd": "unhandled", "args": [6, 0, 0], "at": "af.s:2"}, unhandled


#: a guest converting pages through the runtime: every exit of the conversion is the runtime's
CONVERTS = textwrap.dedent("""\
    guest_main:
        mov rdi, GUEST_FREE_GPA
        mov rsi, 4
        call set_memory_shared
        GUEST_ASSERT_EQ rax, 0
        GUEST_SYNC rax
        ret
""")


@pytest.mark.parametrize("vm_type", ["default", "sev-es", "sev-snp", "tdx"])
def test_first_divergence_names_the_guest_line_that_called_the_runtime(tmp_path: Path, vm_type: str) -> None:
    """An exit the runtime makes for the guest (set_memory_shared's hypercall, PSC or MapGPA, a
    ucall through a #VC/#VE handler) is attributed to the guest line that called the runtime, so
    the first divergence names it."""
    guest = tmp_path / "conv.s"
    golden = record(guest, _options(vm_type), text=CONVERTS)
    diff = compare(tmp_path / "conv.jsonl", golden,
                   record(guest, _options(vm_type), text=CONVERTS.replace("rsi, 4", "rsi, 2")))
    assert diff.text.splitlines()[1].endswith("(guest line conv.s:4):"), diff.text
    sync = next(e for e in golden.events if e["event"] == "ucall")
    assert sync.get("at") == "conv.s:6", golden.events


#: a guest the assembler's front end refuses (no Keystone run): line 2
NOT_ASSEMBLING = "guest_main:\n    mov rax, 2.5\n"


def test_fixture_reports_testbed_errors_in_one_line(tmp_path: Path) -> None:
    """A corrupt golden, a missing guest under --testbed-update-golden and a guest that does not
    assemble (no golden yet) fail the test with the testbed's one line, no traceback."""
    (tmp_path / "ok.s").write_text("guest_main:\n    ret\n")
    (tmp_path / "bad.s").write_text(NOT_ASSEMBLING)
    (tmp_path / "golden").mkdir()
    (tmp_path / "golden" / "ok.default.jsonl").write_text(f'{{"golden": {FORMAT}}}\nnot json\n')
    for updating, guest, message in ((False, "ok.s", f"{tmp_path / 'golden' / 'ok.default.jsonl'}:2: not JSON"),
                                     (True, "absent.s", f"{tmp_path / 'absent.s'}: no such guest source file"),
                                     (False, "bad.s", f"{tmp_path / 'bad.s'}:2: floating-point number")):
        with pytest.raises(pytest.fail.Exception) as failed:
            GoldenRecorder(tmp_path, updating, {}).check(guest, memory=MEMORY)
        assert not failed.value.pytrace, guest
        assert str(failed.value).startswith(message), str(failed.value)
        assert "\n" not in str(failed.value)


def test_check_assembles_before_saying_a_golden_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`golden check` of a guest that does not assemble is that assembly error (status 2), not
    "no golden trace" (status 1)."""
    guest = tmp_path / "bad.s"
    guest.write_text(NOT_ASSEMBLING)
    assert main(["golden", "check", str(guest), "--memory", MEMORY]) == 2
    assert "bad.s:2: floating-point number" in capsys.readouterr().err


def test_update_writes_nothing_when_one_combination_is_impossible(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`golden update --vm-type all --vendor intel` refuses the impossible pairs (sev on intel)
    before it writes any golden."""
    guest = tmp_path / "g.s"
    guest.write_text("guest_main:\n    ret\n")
    assert main(["golden", "update", str(guest), "--vm-type", "all", "--vendor", "intel", "--memory", MEMORY]) == 2
    assert "VM type sev needs an AMD vCPU" in capsys.readouterr().err
    assert not (tmp_path / "golden").exists()


def test_a_golden_of_an_older_format_is_a_clear_error(tmp_path: Path) -> None:
    """A golden written by an older testbed (format 1) is a usage error naming the file and telling
    the user to re-record it."""
    old = tmp_path / "g.default.jsonl"
    old.write_text('{"golden": 1, "guest": "g.s"}\n{"event": "end", "outcome": "done", "detail": ""}\n')
    with pytest.raises(UsageError, match=r"g\.default\.jsonl:1: a golden trace of format 1, which this "
                                         r"testbed no longer reads \(format 2\); re-record it"):
        read(old)
