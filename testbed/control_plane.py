"""The control plane: which guest images a VM type may launch, and images that lie.

The seed thread's plan for unmapped private memory: on the guest_memfd (UPM) VM types the
host learns of every private<->shared conversion only from the guest (KVM_HC_MAP_GPA_RANGE,
or the GHCB Page State Change / TDX MapGPA that KVM turns into it), so the control plane
refuses, before launch, an image that does not declare it uses the hypercall
(KVM_FEATURE_HC_MAP_GPA_RANGE). KVM itself does nothing special. The image's declaration is
its note (Program.features: the runtime declares MAP_GPA_RANGE, GUEST_IMAGE_LEGACY withdraws
it; guests/lib/prelude.s). An image that declares the feature and still converts without
telling the host is caught when KVM catches it: a private/shared mismatch on a fault is a
KVM_EXIT_MEMORY_FAULT (mmu.c `kvm_mmu_faultin_pfn` -> `kvm_mmu_prepare_memory_fault_exit`),
which the VMM's implicit-conversion policy answers; the report names the image a liar.
"""

from __future__ import annotations

from typing import Any

from testbed.asm.program import Program
from testbed.errors import UsageError
from testbed.options import GUEST_MEMFD_VM_TYPES

MAP_GPA_RANGE = "MAP_GPA_RANGE"
#: the KVM PV feature each note stands for (CPUID 0x40000001, Documentation/virt/kvm/x86/cpuid.rst)
KVM_FEATURE_NAMES = {MAP_GPA_RANGE: "KVM_FEATURE_HC_MAP_GPA_RANGE"}


class ControlPlaneError(UsageError):
    """The control plane refused to launch the image: it lacks a feature the VM type requires."""

    def __init__(self, message: str, missing: tuple[str, ...]) -> None:
        super().__init__(message)
        self.missing = missing

    def __reduce__(self) -> tuple[type[ControlPlaneError], tuple[str, tuple[str, ...]]]:
        # Picklable with its two arguments (it crosses process-pool and Dask boundaries).
        return (type(self), (str(self), self.missing))


def required_features(vm_type: str) -> tuple[str, ...]:
    """The features an image must declare to launch on `vm_type` (a CLI spelling)."""
    return (MAP_GPA_RANGE,) if vm_type in GUEST_MEMFD_VM_TYPES else ()


def missing_features(program: Program, vm_type: str) -> tuple[str, ...]:
    """The required features the image does not declare."""
    return tuple(f for f in required_features(vm_type) if f not in program.features)


def check_launch(program: Program, vm_type: str, source: str, *, force: bool = False) -> None:
    """Refuse (ControlPlaneError) a legacy image on a guest_memfd VM type unless `force`."""
    missing = missing_features(program, vm_type)
    if missing and not force:
        names = ", ".join(KVM_FEATURE_NAMES.get(f, f) for f in missing)
        raise ControlPlaneError(
            f"{source}: refused by the control plane: VM type {vm_type} keeps private memory in guest_memfd "
            f"and requires images that use {names}, which this legacy image (GUEST_IMAGE_LEGACY) does not "
            f"declare; use --force (force=True) to launch it anyway", missing)


def report_entry(program: Program, vm_type: str, exit_counts: Any, user_exits: Any) -> dict[str, Any]:
    """The report's `control_plane`: what the image declared, what the VM type required and
    was missing (non-empty only for a forced launch), and whether the image lied: it declared
    MAP_GPA_RANGE yet converted a page without telling the host (a KVM_EXIT_MEMORY_FAULT);
    `evidence` is the first such exit and how many there were."""
    faults = int(exit_counts.get("memory_fault", 0))
    lying = MAP_GPA_RANGE in program.features and faults > 0
    evidence: dict[str, Any] | None = None
    if lying:
        first = next((e for e in user_exits if e.get("reason") == "memory_fault"), None)
        evidence = {"memory_faults": faults, "first": first}
    return {
        "declared": list(program.features),
        "required": list(required_features(vm_type)),
        "missing": list(missing_features(program, vm_type)),
        "lying": lying,
        "evidence": evidence,
    }
