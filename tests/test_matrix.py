"""The conformance matrix (testbed/matrix.py) and its executors (testbed/runner.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import testbed.options
from testbed.cli import main
from testbed.kvm.uapi import KVM_SYSTEM_EVENT_SEV_TERM, SystemEventExit
from testbed.matrix import Cell, combinations, compare, end_record, merge, run_matrix, ucall_identity
from testbed.runner import DaskExecutor, PoolExecutor, SerialExecutor
from testbed.vmm.vmm import RunReport, VmEnd

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
        "tdx/intel": "outcome unhandled_exception (vector 20, exit reason 18) vs done",
    },
    "ghcb_hostile.s": {
        "sev-es/amd": "outcome done vs unhandled_exception (vector 13",
        "sev-snp/amd": "outcome done vs unhandled_exception (vector 13",
        "tdx/intel": "outcome unhandled_exception (vector 20, exit reason 32)",
    },
    "ghcb_kvm_version.s": {
        "sev-es/amd": "outcome done vs unhandled_exception (vector 13",
        "sev-snp/amd": "outcome done vs unhandled_exception (vector 13",
        "tdx/intel": "outcome unhandled_exception (vector 20, exit reason 32)",
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
        "tdx/intel": "outcome unhandled_exception (vector 20, exit reason 32)",
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


#: reads SEV_STATUS and asks for termination (GHCB MSR protocol) with reason code SEV_STATUS & 7:
#: 3 on SEV-ES (SEV | SEV-ES), 7 on SEV-SNP - the same outcome, `terminated`, ended differently
TERMINATE_WITH_SEV_STATUS = """\
guest_main:
    mov ecx, 0xC0010131
    rdmsr
    and eax, 7
    shl rax, 16
    or rax, GHCB_MSR_TERM_REQ
    mov ecx, MSR_AMD64_SEV_ES_GHCB
    xor edx, edx
    wrmsr
    rep vmmcall
    GUEST_SYNC 0xbad
    ret
"""


def _obs(outcome: str = "done", conversions: list[list[Any]] | None = None, exits: int | None = None,
         vm_type: str = "default", end: dict[str, Any] | None = None, vendor: str = "amd") -> dict[str, Any]:
    conv = conversions or []
    return {"outcome": outcome, "exception": None, "ucalls": [{"cmd": "done", "args": []}], "conversions": conv,
            "conversion_exits": len(conv) if exits is None else exits, "truncated": False,
            "guest_shared": [], "shared_ranges": [], "vm_type": vm_type, "vendor": vendor, "end": end or {}}


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


def test_errored_cells_are_never_equal() -> None:
    """A cell that could not run equals nothing, not even another errored cell; a cell whose reference
    could not run is not compared (not equal, not a divergence); the error text is in the cell's JSON."""
    ref = Cell("default", "amd", {"error": "memory 32.0 GiB: too much"})
    cell = Cell("tdx", "intel", {"error": "memory 32.0 GiB: too much"})
    compare(ref, ref)
    compare(cell, ref)
    for c in (ref, cell):
        assert not c.equal and not c.compared and not c.divergent
        assert c.difference == "could not run: memory 32.0 GiB: too much"
        assert c.to_json()["outcome"] == "error" and c.to_json()["error"] == "memory 32.0 GiB: too much"
    ran = Cell("sev", "amd", _obs())
    compare(ran, ref)
    assert not ran.equal and not ran.compared and not ran.divergent
    assert ran.difference == "not compared: the reference could not run"


def test_a_cell_the_host_cannot_back_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError while a cell runs (the host could not back the guest) makes that cell an error,
    not an exception that ends the whole matrix."""
    import testbed.matrix

    def no_memory(*_args: object) -> None:
        raise MemoryError("mmap failed")

    monkeypatch.setattr(testbed.matrix, "_observe", no_memory)
    task = {"guest": "g.s", "source": "guest_main:\n    GUEST_DONE\n",
            "options": {"memory": 16 << 20, "timeout": 10.0, "seed": 1, "vm_type": "default", "vendor": "amd"}}
    assert testbed.matrix.observe(task) == {"error": "out of host memory: mmap failed"}


#: (what differs, the cell's end, the reference's end, the difference named): how a run ended
#: beyond its outcome, as a KVM developer would want it flagged
END_DIFFERENCES = [
    ("termination reason",
     {"system_event": 6, "termination": {"via": "msr", "msr": 0x70100, "reason_set": 0, "reason_code": 7}},
     {"system_event": 6, "termination": {"via": "msr", "msr": 0x30100, "reason_set": 0, "reason_code": 3}},
     "end: GHCB MSR 0x70100 (reason set 0, code 7) vs GHCB MSR 0x30100 (reason set 0, code 3)"),
    ("termination protocol",
     {"system_event": 6, "termination": {"via": "ghcb", "reason_set": 0, "reason_code": 3}},
     {"system_event": 6, "termination": {"via": "msr", "msr": 0x30100, "reason_set": 0, "reason_code": 3}},
     "end: GHCB termination request (reason set 0, code 3) vs GHCB MSR 0x30100 (reason set 0, code 3)"),
    ("system event data", {"system_event": 1, "data": [1]}, {"system_event": 1, "data": [2]},
     "end: system event 1 data [0x1] vs system event 1 data [0x2]"),
    ("TD fatal error", {"system_event": 7, "tdx_fatal": {"error_code": 1 << 32, "message": "a", "gpa": None}},
     {"system_event": 7, "tdx_fatal": {"error_code": 2 << 32, "message": "a", "gpa": None}},
     "end: TD fatal error 0x100000000 'a' vs TD fatal error 0x200000000 'a'"),
    ("memory fault gpa", {"memory_fault": {"gpa": 0x5000, "flags": 8, "size": 0x1000}},
     {"memory_fault": {"gpa": 0x6000, "flags": 8, "size": 0x1000}},
     "end: memory fault gpa 0x5000 flags 0x8 size 0x1000 vs memory fault gpa 0x6000 flags 0x8 size 0x1000"),
    ("memory fault flags", {"memory_fault": {"gpa": 0x5000, "flags": 0, "size": 0x1000}},
     {"memory_fault": {"gpa": 0x5000, "flags": 8, "size": 0x1000}},
     "end: memory fault gpa 0x5000 flags 0x0 size 0x1000 vs memory fault gpa 0x5000 flags 0x8 size 0x1000"),
    ("internal suberror", {"internal": {"suberror": 1, "data": []}}, {"internal": {"suberror": 4, "data": []}},
     "end: internal error suberror 1 vs internal error suberror 4"),
    ("internal data", {"internal": {"suberror": 4, "data": [0x6e, 0]}},
     {"internal": {"suberror": 4, "data": [0x6f, 0]}},
     "end: internal error suberror 4 data [0x6e, 0x0] vs internal error suberror 4 data [0x6f, 0x0]"),
    ("delivery GPA", {"internal": {"suberror": 3, "data": [0x50000000, 0x400, 1 << 33, 0x50000000, 0]}},
     {"internal": {"suberror": 3, "data": [0x40000000, 0x400, 1 << 33, 0x40000000, 0]}},
     "end: internal error suberror 3 gpa 0x50000000 vs internal error suberror 3 gpa 0x40000000"),
    ("errno", {"errno": 22}, {"errno": 14}, "end: errno 22 vs errno 14"),
    ("bad ucall", {"bad_ucall": "unknown command 9"}, {"bad_ucall": "unknown command 7"},
     "end: bad ucall: unknown command 9 vs bad ucall: unknown command 7"),
    ("exception site", {"at": "g.s:7"}, {"at": "g.s:9"}, "end: at g.s:7 vs at g.s:9"),
    ("page-fault address", {"at": "g.s:7", "cr2": 0x1000}, {"at": "g.s:7", "cr2": 0x2000},
     "end: at g.s:7, cr2 0x1000 vs at g.s:7, cr2 0x2000"),
]


@pytest.mark.parametrize(("what", "mine", "theirs", "difference"), END_DIFFERENCES, ids=[d[0] for d in END_DIFFERENCES])
def test_a_different_end_is_divergent(what: str, mine: dict[str, Any], theirs: dict[str, Any],
                                      difference: str) -> None:
    """Cells with the same outcome that ended differently (termination reason, system event, memory
    fault, internal error, errno, bad ucall, exception site) are a divergence, the end named."""
    ref = Cell("sev-es", "amd", _obs(outcome="terminated", end=theirs))
    cell = Cell("sev-snp", "amd", _obs(outcome="terminated", end=mine))
    compare(cell, ref)
    assert cell.divergent, what
    assert cell.difference == difference
    assert cell.to_json()["end"] == mine


def test_end_representation_is_not_a_difference() -> None:
    """What differs only by representation is not compared: an internal error's data across vendors
    (SVM vs VMX layouts; a delivery error's GPA still is), and the GHCB's own GPA in a GHCB-page
    termination request (its reason is)."""
    amd = Cell("default", "amd", _obs(outcome="internal_error", end={"internal": {
        "suberror": 3, "data": [0x40000000, 0x400, 1 << 33, 0x40000000, 0]}}))
    intel = Cell("default", "intel", _obs(outcome="internal_error", vendor="intel", end={"internal": {
        "suberror": 3, "data": [0x80000B0E, 48, 0x81, 0x40000000, 0]}}))
    compare(intel, amd)
    assert intel.equal
    unexpected = Cell("default", "intel", _obs(outcome="internal_error", vendor="intel",
                                               end={"internal": {"suberror": 4, "data": [48, 0]}}))
    compare(unexpected, Cell("default", "amd", _obs(outcome="internal_error",
                                                   end={"internal": {"suberror": 4, "data": [0x6e, 0]}})))
    assert unexpected.equal

    def ghcb_page_end(ghcb_gpa: int, code: int) -> dict[str, Any]:
        report = RunReport(outcome="terminated", termination={"reason_set": 1, "reason_code": code})
        return end_record(report, VmEnd("terminated", exit=SystemEventExit(KVM_SYSTEM_EVENT_SEV_TERM, (ghcb_gpa,))))

    assert ghcb_page_end(0x205000, 2) == ghcb_page_end(0x3ff000, 2) == {
        "system_event": KVM_SYSTEM_EVENT_SEV_TERM, "termination": {"via": "ghcb", "reason_set": 1, "reason_code": 2}}
    assert ghcb_page_end(0x205000, 2) != ghcb_page_end(0x205000, 3)


def test_assert_identity_names_the_file() -> None:
    """An assert's identity is its file's name (not its directory, the checkout's), its line and its
    caller's: an assert at the same line of another file is another assert."""
    entry = {"cmd": "abort", "args": [1, 2], "file": "/ckout/guests/lib/sev.s", "line": 5, "message": "x",
             "caller": {"file": "/ckout/guests/g.s", "line": 9}}
    assert ucall_identity(entry) == {"cmd": "abort", "args": [1, 2], "line": 5, "file": "sev.s", "caller": "g.s:9"}
    ref = Cell("sev", "amd", {**_obs(outcome="guest_assert"), "ucalls": [ucall_identity(entry)]})
    cell = Cell("tdx", "intel", {**_obs(outcome="guest_assert"), "ucalls": [
        ucall_identity({**entry, "file": "/other/guests/g.s"})]})
    compare(cell, ref)
    assert cell.divergent
    assert cell.difference == ("ucall 0: abort(0x1, 0x2) at g.s:5 called from g.s:9 vs "
                               "abort(0x1, 0x2) at sev.s:5 called from g.s:9")


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
    assert {"shared_ranges", "difference", "known", "notes", "error", "detail", "end", "expected"} <= set(
        guest["cells"][0])
    assert (guest["cells"][0]["error"], guest["cells"][0]["expected"]) == (None, None)
    assert (doc["errors"], doc["expect"], doc["unexpected"]) == (0, None, 0)


def test_cli_matrix_termination_reason_diverges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two cells that terminate with different GHCB termination reasons diverge (exit 1), and the JSON
    holds each cell's end record and detail."""
    guest = tmp_path / "term.s"
    guest.write_text(TERMINATE_WITH_SEV_STATUS)
    status = main(["matrix", str(guest), "--vm-types", "sev-es,sev-snp", "--workers", "1", "--memory", "16M",
                   "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == 1 and doc["divergent"] == 1
    es, snp = doc["guests"][0]["cells"]
    assert (es["outcome"], snp["outcome"]) == ("terminated", "terminated")
    assert es["end"] == {"system_event": KVM_SYSTEM_EVENT_SEV_TERM,
                         "termination": {"via": "msr", "msr": 0x30100, "reason_set": 0, "reason_code": 3}}
    assert es["detail"] == "guest requested termination (GHCB MSR 0x30100)"
    assert snp["difference"] == ("end: GHCB MSR 0x70100 (reason set 0, code 7) vs "
                                 "GHCB MSR 0x30100 (reason set 0, code 3)")


def test_cli_matrix_cells_that_could_not_run_exit_2(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A matrix whose cells all could not run exits 2, never 0: every cell is `error`, not equal, with
    its error text in the JSON, and one line on stderr names the first."""
    monkeypatch.setattr(testbed.options, "read_address_space_limit", lambda: 8 << 20)  # ulimit -v 8 MiB
    status = main(["matrix", str(GUESTS / "sev_detect.s"), "--vm-types", "default,sev-snp", "--vendors", "amd",
                   "--workers", "1", "--memory", "16M", "--json"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert status == 2 and doc["errors"] == 2 and doc["divergent"] == 0
    cells = doc["guests"][0]["cells"]
    assert [(c["outcome"], c["equal"]) for c in cells] == [("error", False), ("error", False)]
    assert cells[1]["error"] == ("memory 16.0 MiB: a sev-snp guest maps 32.0 MiB but the process's address space "
                                 "is limited to 8.0 MiB (ulimit -v)")
    assert cells[1]["difference"] == f"could not run: {cells[1]['error']}"
    assert err.count("\n") == 1 and "2 of 2 matrix cell(s) could not run" in err and "Traceback" not in err


def test_cli_matrix_table_shows_a_cell_that_could_not_run(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """In the table, a cell that could not run shows its error (the reference ran): exit 2, not 1."""
    monkeypatch.setattr(testbed.options, "read_address_space_limit", lambda: 24 << 20)  # default fits, SNP not
    status = main(["matrix", str(GUESTS / "sev_detect.s"), "--vm-types", "default,sev-snp", "--vendors", "amd",
                   "--workers", "1", "--memory", "16M"])
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert status == 2
    assert "could not run: memory 16.0 MiB: a sev-snp guest maps 32.0 MiB" in out
    assert "1 cell(s) could not run" in out


def test_cli_matrix_expect(capsys: pytest.CaptureFixture[str]) -> None:
    """--expect OUTCOME fails (exit 1) a matrix whose cells all agree on another outcome, marking each
    cell in the JSON and the table; it passes (exit 0) when every cell ends with it."""
    argv = ["matrix", str(GUESTS / "exceptions_unhandled.s"), "--vm-types", "default,sev-es", "--vendors", "amd",
            "--workers", "1", "--memory", "16M"]
    assert main([*argv, "--json"]) == 0  # the documented trap: all cells fail the same way
    assert main([*argv, "--json", "--expect", "done"]) == 1
    doc = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (doc["expect"], doc["unexpected"], doc["divergent"]) == ("done", 2, 0)
    assert [(c["outcome"], c["expected"]) for c in doc["guests"][0]["cells"]] == [
        ("unhandled_exception", False), ("unhandled_exception", False)]
    assert main([*argv, "--expect", "done"]) == 1
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "✗ expected done" in out and "2 cell(s) not ending done" in out
    assert main([*argv, "--json", "--expect", "unhandled_exception"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["unexpected"] == 0 and all(c["expected"] for c in doc["guests"][0]["cells"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--expect", "nope"], "--expect 'nope': not an outcome; expected one of done, "),
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
