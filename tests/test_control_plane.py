"""The control plane: image notes, refusal of legacy images on guest_memfd types, lying images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import testbed
from testbed.cli import main
from testbed.control_plane import ControlPlaneError
from testbed.errors import AsmError, UsageError
from testbed.machine import VmOptions, build_program

ROOT = Path(__file__).resolve().parent.parent
LEGACY = str(ROOT / "guests" / "legacy_image.s")
# The same guest without GUEST_IMAGE_LEGACY: a modern image (written beside the tests' cache).

MODERN = str(ROOT / "tests" / "guests" / "modern_image.s")
LYING = str(ROOT / "guests" / "lying_image.s")
TYPES = {"sev": ("amd", False), "sev-snp": ("amd", True), "sw-protected": ("amd", True), "tdx": ("intel", True)}


def _cli(capsys: pytest.CaptureFixture[str], guest: str, vm_type: str, *extra: str) -> tuple[int, str, str]:
    status = main(["run", guest, "--vm-type", vm_type, "--vendor", TYPES[vm_type][0], "--memory", "16M", *extra])
    out, err = capsys.readouterr()
    return status, out, err


def test_runtime_images_declare_map_gpa_range() -> None:
    """An image built on the runtime declares MAP_GPA_RANGE; GUEST_IMAGE_LEGACY withdraws it."""
    assert build_program(MODERN, VmOptions(memory="16M")).features == ("MAP_GPA_RANGE",)
    legacy = build_program(LEGACY, VmOptions(memory="16M"))
    assert legacy.features == () and legacy.legacy


def test_note_survives_the_assembly_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The note is stored in the cross-process assembly cache and read back from it."""
    from testbed.asm import cache

    monkeypatch.setenv("TESTBED_CACHE_DIR", str(tmp_path))
    program = build_program(LEGACY, VmOptions(memory="16M"))
    decoded, _ = cache._decode(json.loads(json.dumps(cache._encode(program, ()))))
    assert decoded.features == program.features == ()
    modern = build_program(MODERN, VmOptions(memory="16M"))
    assert cache._decode(cache._encode(modern, ()))[0].features == ("MAP_GPA_RANGE",)


def test_legacy_note_inside_a_macro_is_an_error() -> None:
    """GUEST_IMAGE_LEGACY outside the top level is an assembly error at its line."""
    text = ".macro M\nGUEST_IMAGE_LEGACY\n.endm\nguest_main:\n    ret\n"
    with pytest.raises(AsmError, match=r"legacy_note\.s:2: GUEST_IMAGE_LEGACY .*top level"):
        build_program("legacy_note.s", VmOptions(memory="16M"), text=text)


@pytest.mark.parametrize("vm_type", ["sev-snp", "sw-protected", "tdx"])
def test_cli_refuses_legacy_image_on_upm_type(capsys: pytest.CaptureFixture[str], vm_type: str) -> None:
    """`testbed run` refuses a legacy image on a guest_memfd type before launch, status 2."""
    status, out, err = _cli(capsys, LEGACY, vm_type)
    assert status == 2 and out == ""
    assert "KVM_FEATURE_HC_MAP_GPA_RANGE" in err and "--force" in err


@pytest.mark.parametrize(("guest", "vm_type"), [(LEGACY, "sev"), (MODERN, "sev"), (MODERN, "sev-snp"), (MODERN, "tdx")])
def test_cli_runs_the_allowed_combinations(capsys: pytest.CaptureFixture[str], guest: str, vm_type: str) -> None:
    """Legacy images run on legacy types; modern images run everywhere, and none is lying."""
    status, out, _ = _cli(capsys, guest, vm_type, "--json")
    report = json.loads(out)
    assert status == 0 and report["outcome"] == "done"
    assert report["control_plane"]["lying"] is False and report["control_plane"]["missing"] == []


def test_cli_force_runs_legacy_image_on_snp(capsys: pytest.CaptureFixture[str]) -> None:
    """--force launches a legacy image on sev-snp; its conversions reach the host only as
    KVM_EXIT_MEMORY_FAULT (mmu.c kvm_mmu_faultin_pfn), converted by the VMM's policy."""
    status, out, _ = _cli(capsys, LEGACY, "sev-snp", "--force", "--json")
    report = json.loads(out)
    assert status == 0 and report["outcome"] == "done"
    assert report["control_plane"]["missing"] == ["MAP_GPA_RANGE"] and not report["control_plane"]["lying"]
    assert report["stats"]["exits"]["memory_fault"] > 0


def test_api_refuses_legacy_image_unless_forced() -> None:
    """Vm.load and run_guest raise ControlPlaneError (a UsageError); force=True launches."""
    with testbed.Vm(vm_type="sev-snp", memory="16M") as vm, pytest.raises(ControlPlaneError) as info:
        vm.load(LEGACY)
    assert isinstance(info.value, UsageError) and info.value.missing == ("MAP_GPA_RANGE",)
    with pytest.raises(ControlPlaneError, match="KVM_FEATURE_HC_MAP_GPA_RANGE"):
        testbed.run_guest(LEGACY, VmOptions(vm_type="tdx", vendor="intel", memory="16M"))
    with testbed.Vm(vm_type="sev-snp", memory="16M") as vm:
        assert vm.load(LEGACY, force=True).run_to_ucall().cmd == "done"
    assert testbed.run_guest(LEGACY, VmOptions(vm_type="sev", memory="16M")).outcome == "done"
    assert testbed.run_guest(MODERN, VmOptions(vm_type="sev-snp", memory="16M")).outcome == "done"


@pytest.mark.parametrize("policy", ["convert", "refuse"])
def test_lying_image_is_reported(policy: str) -> None:
    """An image that declares MAP_GPA_RANGE but converts by its PTEs alone is caught by the
    KVM_EXIT_MEMORY_FAULT its access causes (mmu.c kvm_mmu_faultin_pfn); the VMM's
    implicit-conversion policy decides the run, the report names the image lying."""
    report = testbed.run_guest(LYING, VmOptions(vm_type="sev-snp", memory="16M", implicit_conversion=policy))
    plane = report.to_json()["control_plane"]
    assert plane["declared"] == ["MAP_GPA_RANGE"] and plane["lying"] is True
    assert plane["evidence"]["first"]["gpa"] == 0x600000
    assert report.outcome == ("done" if policy == "convert" else "memory_fault")
