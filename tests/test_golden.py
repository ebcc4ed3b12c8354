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
from testbed.golden import check, compare, golden_path, read, record, update
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
    """An outcome detail names the guest's file:line by file name, so the record does not depend on
    where the checkout is."""
    text = "guest_main:\n    ud2\n"
    goldens = []
    for where in ("a", "b/c"):
        guest = tmp_path / where / "fails.s"
        guest.parent.mkdir(parents=True)
        guest.write_text(text)
        goldens.append(record(guest, _options("default"), reuse=False))
    end = next(e for e in goldens[0].events if e["event"] == "end")
    assert end["outcome"] == "unhandled_exception"
    assert end["detail"].startswith("fails.s:2 (guest_main+0x0): unexpected #UD"), end
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
    """Checked with --no-fix-hypercall, a golden recorded with KVM's fix-up quirk fails naming the
    first divergent event (the patch vs the injected #UD) and the guest line of the VMCALL
    (x86.c emulator_fix_hypercall, svm.c ud_interception)."""
    guest = tmp_path / "wrong_vendor.s"
    guest.write_text(WRONG_VENDOR)
    assert main(["golden", "update", str(guest), "--memory", MEMORY]) == 0
    path = tmp_path / "golden" / "wrong_vendor.default.jsonl"
    assert path.exists()
    capsys.readouterr()
    assert main(["golden", "check", str(guest), "--memory", MEMORY]) == 0
    assert capsys.readouterr().out == f"ok {path}\n"

    assert main(["golden", "check", str(guest), "--memory", MEMORY, "--no-fix-hypercall"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{path}: the run differs from the golden trace (7 events recorded, 5 now)"
    assert lines[1] == "  recorded with fix_hypercall the default (this run: false)"
    assert lines[2] == f"first divergence at event 2 (guest line wrong_vendor.s:{WRONG_VENDOR_LINE}):"
    assert lines[3].startswith('  expected: {"event": "fix_hypercall", "old": "0f01c1", "new": "0f01d9"}')
    assert lines[4].startswith('  got:      {"event": "inject", "vector": 6, "error_code": null}')
    assert f"[wrong_vendor.s:{WRONG_VENDOR_LINE}]" in lines[4]
    assert '+    4  {"event": "end", "outcome": "unhandled_exception"' in out


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
    bad.write_text('{"golden": 1}\n{"event": "end"}\nnot json\n')
    with pytest.raises(UsageError, match=r"g\.default\.jsonl:3: not JSON"):
        check(guest, VmOptions())
    assert main(["golden", "check", str(guest)]) == 2
    assert "g.default.jsonl:3: not JSON" in capsys.readouterr().err
    bad.write_text('{"golden": 99}\n')
    with pytest.raises(UsageError, match="not a golden trace of format 1"):
        read(bad)
    bad.write_bytes(b'{"golden": 1}\n{"event": "x\xfc"}\n')  # binary bytes: located at their line
    with pytest.raises(UsageError, match=r"g\.default\.jsonl:2: not UTF-8 text \(byte 0xfc at column 13\)"):
        read(bad)


def test_update_names_defines_and_foreign_vendor(tmp_path: Path) -> None:
    """The file name carries the defines and a vendor other than the VM type's own."""
    options = VmOptions(vendor="intel", defines={"INSN": 1})
    path, golden = update(ROOT / "guests" / "hypercall_insn.s", options, tmp_path)
    assert path.name == "hypercall_insn.INSN=1.default.intel.jsonl"
    assert golden.header["defines"] == {"INSN": 1} and golden.header["vendor"] == "intel"


def test_pytest_fixture_update_then_check_fails_readably(pytester: pytest.Pytester) -> None:
    """With the fixture, --testbed-update-golden records; a later run with the fix-up quirk off fails
    the test with the diff naming the first divergent event and the guest line."""
    pytester.makefile(".s", wrong_vendor=WRONG_VENDOR)
    pytester.makepyfile(test_abi="""
        import os

        def test_abi(testbed_golden):
            testbed_golden.check("wrong_vendor.s", memory="16M", fix_hypercall=os.environ["FIX"] == "1")
    """)
    pytester.syspathinsert(str(ROOT))
    env_fix = {"FIX": "1"}
    import os

    old = os.environ.get("FIX")
    try:
        os.environ.update(env_fix)
        result = pytester.runpytest("-p", "testbed.pytest_golden", "--testbed-update-golden", "-p", "no:xdist")
        result.assert_outcomes(passed=1)
        assert (pytester.path / "golden" / "wrong_vendor.default.jsonl").exists()
        result = pytester.runpytest("-p", "testbed.pytest_golden", "-p", "no:xdist")
        result.assert_outcomes(passed=1)
        os.environ["FIX"] = "0"
        result = pytester.runpytest("-p", "testbed.pytest_golden", "-p", "no:xdist")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines([f"*first divergence at event 2 (guest line wrong_vendor.s:{WRONG_VENDOR_LINE}):*",
                                     '*expected: {"event": "fix_hypercall"*',
                                     '*got:      {"event": "inject", "vector": 6*'])
    finally:
        if old is None:
            os.environ.pop("FIX", None)
        else:
            os.environ["FIX"] = old
