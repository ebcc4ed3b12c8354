"""The conformance matrix (testbed/matrix.py) and its executors (testbed/runner.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from testbed.cli import main
from testbed.matrix import Cell, combinations, compare, merge, run_matrix
from testbed.runner import DaskExecutor, PoolExecutor, SerialExecutor

GUESTS = Path(__file__).resolve().parent.parent / "guests"
#: cli_spin.s spins until the timeout by design: every cell would cost the whole timeout
BUNDLED = sorted(p for p in GUESTS.glob("*.s") if p.name != "cli_spin.s")

#: What the bundled guests really do differently from default/amd, cell by cell: the first
#: difference as the matrix names it (a prefix). Guests written for one VM type or vendor
#: (SEV detection, GHCB, termination, the TDX runtime, vendor instructions) differ by design;
#: a change in any cell, or a new difference, fails the test.
EXPECTED_DIVERGENT: dict[str, dict[str, str]] = {
    "fix_hypercall.s": {
        "default/intel": "ucall 2: sync(0xc1010f) vs sync(0xd9010f)",
        "sw-protected/intel": "ucall 2: sync(0xc1010f) vs sync(0xd9010f)",
        "sev/amd": "ucall 0: sync(0xfffffffffffffff2) vs sync(0x0)",
        "sev-es/amd": "ucall 0: sync(0xfffffffffffffff2) vs sync(0x0)",
        "sev-snp/amd": "ucall 0: sync(0xfffffffffffffff2) vs sync(0x0)",
        "tdx/intel": "outcome unhandled_exception (vector 20, error 0x12) vs done",
    },
    "ghcb_hostile.s": {
        "sev-es/amd": "outcome done vs unhandled_exception (vector 13",
        "sev-snp/amd": "outcome done vs unhandled_exception (vector 13",
        "tdx/intel": "outcome unhandled_exception (vector 20, error 0x20)",
    },
    "ghcb_kvm_version.s": {
        "sev-es/amd": "outcome done vs unhandled_exception (vector 13",
        "sev-snp/amd": "outcome done vs unhandled_exception (vector 13",
        "tdx/intel": "outcome unhandled_exception (vector 20, error 0x20)",
    },
    # the control plane refuses a legacy image on the UPM types (testbed/control_plane.py)
    "legacy_image.s": {combo: "outcome refused vs done"
                       for combo in ("sw-protected/amd", "sw-protected/intel", "sev-snp/amd", "tdx/intel")},
    "migrate_cbit_liar.s": {combo: "outcome refused vs done"
                            for combo in ("sw-protected/amd", "sw-protected/intel", "sev-snp/amd", "tdx/intel")},
    "psc_exitinfo1_only.s": {"sev-snp/amd": "outcome done vs unhandled_exception (vector 6"},
    "sev_cbit_alias.s": {
        "sev/amd": "ucall 0: sync(0x8000000000000) vs sync(0x0)",
        "sev-es/amd": "ucall 0: sync(0x8000000000000) vs sync(0x0)",
        "sev-snp/amd": "outcome unhandled_exception (vector 29, error 0x404) vs done",
    },
    "sev_detect.s": {
        "default/intel": "ucall 1: done() vs sync(0x0)",
        "sw-protected/intel": "ucall 1: done() vs sync(0x0)",
        "sev/amd": "ucall 0: sync(0x2) vs sync(0x0)",
        "sev-es/amd": "ucall 0: sync(0xa) vs sync(0x0)",
        "sev-snp/amd": "ucall 0: sync(0x1a) vs sync(0x0)",
        "tdx/intel": "ucall 1: done() vs sync(0x0)",
    },
    "sev_terminate.s": {
        "sev-es/amd": "outcome terminated vs unhandled_exception (vector 13",
        "sev-snp/amd": "outcome terminated vs unhandled_exception (vector 13",
        "tdx/intel": "outcome unhandled_exception (vector 20, error 0x20)",
    },
    "stale_ciphertext.s": {
        "sev/amd": "ucall 0: sync(0xae5fedd12691891) vs sync(0x5a5a1234)",
        "sev-es/amd": "ucall 0: sync(0xae5fedd12691891) vs sync(0x5a5a1234)",
        "sev-snp/amd": "ucall 0: sync(0x0) vs sync(0x5a5a1234)",
        "tdx/intel": "ucall 0: sync(0x0) vs sync(0x5a5a1234)",
    },
    "tdx_runtime.s": {"tdx/intel": "ucall 0: sync(0x8000000000000, 0x34, 0x1, 0x65746e49)"},
}
#: known real differences: the legacy-SEV GHCB page written with the C-bit clear is an
#: implicit conversion (KVM_EXIT_MEMORY_FAULT; the testbed's sev keeps attributes), which a
#: default VM, without attributes, cannot have
EXPECTED_KNOWN = {("ghcb_hostile.s", "sev/amd"), ("ghcb_kvm_version.s", "sev/amd"),
                  # a legacy or lying image flips its C-bit / shared bit without telling the host: on a
                  # type with memory attributes that is a KVM_EXIT_MEMORY_FAULT the reference cannot have
                  ("legacy_image.s", "sev/amd"), ("migrate_cbit_liar.s", "sev/amd"), ("lying_image.s", "sev/amd"),
                  ("lying_image.s", "sev-snp/amd"),
                  ("lying_image.s", "tdx/intel")}

#: converts 4 MiB at a 2 MiB-aligned GPA shared, then private
BIG_CONVERSION = """\
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1024
    call set_memory_shared
    GUEST_ASSERT_EQ rax, 0
    mov rdi, GUEST_FREE_GPA
    mov rsi, 1024
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    GUEST_DONE
"""


def _obs(outcome: str = "done", conversions: list[list[Any]] | None = None, exits: int | None = None,
         vm_type: str = "default") -> dict[str, Any]:
    conv = conversions or []
    return {"outcome": outcome, "exception": None, "ucalls": [{"cmd": "done", "args": []}], "conversions": conv,
            "conversion_exits": len(conv) if exits is None else exits, "truncated": False,
            "guest_shared": [], "shared_ranges": [], "vm_type": vm_type}


def test_every_pinned_difference_names_a_bundled_guest() -> None:
    """The pinned differences name bundled guests only (a renamed or removed guest fails here)."""
    names = {p.name for p in BUNDLED}
    assert set(EXPECTED_DIVERGENT) <= names
    assert {name for name, _combo in EXPECTED_KNOWN} <= names


@pytest.mark.parametrize("guest", BUNDLED, ids=lambda p: p.stem)
def test_bundled_guests_matrix_reports_real_differences(guest: Path) -> None:
    """The matrix over every bundled guest (one guest per test, in this process: the pool's
    workers are tested on their own below) names exactly the pinned differences."""
    (row,) = run_matrix([guest], executor=SerialExecutor())
    name = guest.name
    divergent: dict[str, str] = {}
    known: set[tuple[str, str]] = set()
    assert row.cells[0].vm_type == "default" and row.cells[0].vendor == "amd"
    for cell in row.cells:
        assert "error" not in cell.observation, (name, cell.observation)
        combo = f"{cell.vm_type}/{cell.vendor}"
        if cell.divergent:
            divergent[combo] = cell.difference or ""
        elif cell.known:
            known.add((name, combo))
    expected = EXPECTED_DIVERGENT.get(name, {})
    assert set(divergent) == set(expected), name
    for combo, prefix in expected.items():
        assert divergent[combo].startswith(prefix), (name, combo, divergent[combo])
    assert known == {k for k in EXPECTED_KNOWN if k[0] == name}
    if name == "conversions.s":
        assert all(c.equal and not c.notes for c in row.cells)
        assert len(row.cells[0].observation["conversions"]) == 21


def test_snp_psc_split_and_tdx_2m_chunking_are_shown(tmp_path: Path) -> None:
    """A 4 MiB conversion compares equal after merging, with SNP's and TDX's extra exits noted (sev.c
    snp_begin_psc, one exit per contiguous run of PSC entries; tdx.c tdx_map_gpa, 2 MiB per exit)."""
    guest = tmp_path / "big.s"
    guest.write_text(BIG_CONVERSION)
    rows = run_matrix([guest], combos=[("default", "amd"), ("sev-snp", "amd"), ("tdx", "intel")],
                      executor=SerialExecutor(), options={"memory": 32 << 20})
    ref, snp, tdx = rows[0].cells
    assert ref.observation["conversions"] == [["shared", "hypercall", 0x600, 1024],
                                              ["private", "hypercall", 0x600, 1024]]
    assert ref.observation["conversion_exits"] == 2
    assert snp.equal and tdx.equal
    assert snp.notes == ["SNP splits a Page State Change into several exits: 10 conversion exits vs 2, "
                         "the same 2 merged ranges"]
    assert tdx.notes == ["TDX chunks MapGPA at 2 MiB: 4 conversion exits vs 2, the same 2 merged ranges"]


def test_no_attributes_difference_is_known_not_divergent() -> None:
    """A cell that differs from the reference only by implicit conversions, on a VM type without memory
    attributes (sev-es), is a named known difference, not a divergence."""
    fault = ["shared", "memory_fault", 0x205, 1]
    hc = ["private", "hypercall", 0x600, 4]
    ref = Cell("sev", "amd", _obs(conversions=[fault, hc], exits=1))
    es = Cell("sev-es", "amd", _obs(conversions=[hc], exits=1))
    compare(es, ref)
    assert not es.equal and not es.divergent
    assert es.difference == "conversion 0: to private gfn 0x600+4 vs to shared gfn 0x205+1 (memory fault)"
    assert es.known is not None and es.known.startswith("sev-es has no memory attributes")
    snp = Cell("sev-snp", "amd", _obs(conversions=[hc], exits=1))
    compare(snp, ref)
    assert snp.divergent and snp.known is None


def test_outcome_difference_is_divergent() -> None:
    """A different outcome is a divergence named first, before any conversion difference."""
    ref = Cell("default", "amd", _obs())
    cell = Cell("tdx", "intel", _obs(outcome="shutdown", conversions=[["shared", "hypercall", 1, 1]]))
    compare(cell, ref)
    assert cell.divergent and cell.difference == "outcome shutdown vs done"


def test_merge_joins_contiguous_same_direction_requests_only() -> None:
    """Contiguous requests of one direction and kind merge; a gap, a turn or another kind starts a range."""
    stream = [["shared", "hypercall", 10, 2], ["shared", "hypercall", 12, 3], ["shared", "hypercall", 16, 1],
              ["private", "hypercall", 17, 1], ["private", "memory_fault", 18, 1]]
    assert merge(stream) == [["shared", "hypercall", 10, 5], ["shared", "hypercall", 16, 1],
                             ["private", "hypercall", 17, 1], ["private", "memory_fault", 18, 1]]


def test_combinations_skip_what_the_model_cannot_run() -> None:
    """Only valid VM type x vendor pairs are generated (no intel x sev, no amd x tdx); --reference goes first."""
    assert combinations(["sev", "tdx"]) == [("sev", "amd"), ("tdx", "intel")]
    assert combinations(["default", "sev-es"], reference="sev-es") == [("sev-es", "amd"), ("default", "amd"),
                                                                      ("default", "intel")]
    with pytest.raises(Exception, match="no VM type x vendor"):
        combinations(["sev"], ["intel"])


def test_local_pool_gives_the_serial_results() -> None:
    """Cells run on the local process pool (2 workers) come back identical, in task order, to the
    same cells run in-process."""
    guests = [GUESTS / "conversions.s", GUESTS / "sev_terminate.s"]
    combos = combinations(["default", "sev-es"], ["amd"])
    pool = PoolExecutor(2)
    try:
        pool_rows = run_matrix(guests, combos=combos, executor=pool)
    finally:
        pool.close()
    serial_rows = run_matrix(guests, combos=combos, executor=SerialExecutor())
    assert [c.observation for r in pool_rows for c in r.cells] == [c.observation for r in serial_rows
                                                                   for c in r.cells]
    assert [c.divergent for r in pool_rows for c in r.cells] == [False, False, False, True]


def test_dask_local_cluster_gives_the_serial_results() -> None:
    """Cells run on a Dask LocalCluster come back identical to the same cells run in-process."""
    distributed = pytest.importorskip("distributed")
    guests = [GUESTS / "conversions.s", GUESTS / "sev_terminate.s"]
    combos = combinations(["default", "sev-es"], ["amd"])
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        dask_rows = run_matrix(guests, combos=combos, executor=DaskExecutor(client=client))
        assert client.status == "running"
    assert cluster.status.name == "closed"
    serial_rows = run_matrix(guests, combos=combos, executor=SerialExecutor())
    assert [c.observation for r in dask_rows for c in r.cells] == [c.observation for r in serial_rows
                                                                   for c in r.cells]
    assert [c.divergent for r in dask_rows for c in r.cells] == [False, False, False, True]


def test_cli_matrix_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`testbed matrix --json` prints the documented shape and exits 1 on an unexpected divergence."""
    status = main(["matrix", str(GUESTS / "sev_terminate.s"), "--vm-types", "sev,sev-es", "--workers", "1",
                   "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 1 and doc["divergent"] == 1
    (guest,) = doc["guests"]
    assert guest["guest"].endswith("sev_terminate.s")
    assert [(c["vm_type"], c["vendor"], c["outcome"], c["equal"]) for c in guest["cells"]] == [
        ("sev", "amd", "unhandled_exception", True), ("sev-es", "amd", "terminated", False)]
    assert guest["cells"][1]["difference"] == "outcome terminated vs unhandled_exception (vector 13, error 0x0)"
    assert {"shared_ranges", "difference", "known", "notes"} <= set(guest["cells"][0])


@pytest.mark.parametrize(("argv", "message"), [
    (["--vm-types", "sev", "--vendors", "intel"], "no VM type x vendor"),
    (["--vm-types", "nope"], "unknown VM type 'nope'"),
    (["--workers", "0"], "--workers"),
    (["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"], "exclude each other"),
    (["--vm-types", "default", "--reference", "tdx"], "--reference tdx"),
    (["--vm-types", ""], "--vm-types '': an empty name in the list"),
    (["--vendors", "amd,"], "--vendors 'amd,': an empty name in the list"),
])
def test_cli_matrix_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad matrix options are one line on stderr and exit status 2."""
    assert main(["matrix", str(GUESTS / "sev_detect.s"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_matrix_missing_guest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A guest that does not exist is a usage error naming it, before anything runs."""
    assert main(["matrix", str(tmp_path / "nope.s"), "--workers", "1"]) == 2
    assert "nope.s" in capsys.readouterr().err
