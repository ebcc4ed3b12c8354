"""`testbed run --plot-memory FILE.png`: pinned private, shared and total host memory against
time, side by side for a legacy VM type and a guest_memfd (UPM) one running the same guest.

The samples are the report's `memory.samples` (vmm/pinning.py: one per user exit). The run
asked for is drawn next to its counterpart (`COUNTERPART`): the legacy type pins the whole
guest at launch, the guest_memfd type pins what the guest faults in privately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from testbed.errors import UsageError

#: The VM type drawn next to the one run: legacy SEV/SEV-ES ↔ SEV-SNP (the same vendor, the
#: pinning model the only difference that matters here); sw-protected and TDX are drawn next
#: to legacy `sev` (on AMD, for TDX's Intel vCPU has no SEV).
COUNTERPART: dict[str, str] = {
    "sev": "sev-snp",
    "sev-es": "sev-snp",
    "sev-snp": "sev",
    "sw-protected": "sev",
    "tdx": "sev",
}

_MIB = 1 << 20


def counterpart(vm_type: str) -> str:
    """The VM type `--plot-memory` runs beside `vm_type` (UsageError for `default`)."""
    try:
        return COUNTERPART[vm_type]
    except KeyError:
        raise UsageError(f"--plot-memory: VM type {vm_type} pins nothing; use a confidential type "
                         f"({', '.join(COUNTERPART)})") from None


def plot_memory(runs: Sequence[tuple[str, Mapping[str, Any]]], path: Path, title: str = "") -> None:
    """Draw each run's `memory` report (label, memory) in its own panel into the PNG `path`:
    pinned private, shared and total MiB against user exits since launch (the VM's clock)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), sharey=False, squeeze=False)
    for ax, (label, memory) in zip(axes[0], runs, strict=True):
        page = int(memory.get("page_size", 4096))
        samples = memory.get("samples", [])
        t = [s[0] for s in samples]
        pinned = [s[1] * page / _MIB for s in samples]
        shared = [s[2] * page / _MIB for s in samples]
        total = [p + s for p, s in zip(pinned, shared, strict=True)]
        ax.step(t, total, where="post", label="total", color="black", linewidth=2.2, alpha=0.5)
        ax.step(t, pinned, where="post", label="pinned private", color="tab:red")
        ax.step(t, shared, where="post", label="shared (VMM)", color="tab:blue")
        guest_mib = memory.get("guest_pages", 0) * page / _MIB
        peak = memory.get("pinned_peak_pages", 0) * page / _MIB
        ax.set_title(f"{label} ({memory.get('model')}): pinned peak {peak:.1f} of {guest_mib:.0f} MiB",
                     fontsize=9)
        ax.set_xlabel("user exits since launch (one sample each)")
        ax.grid(True, alpha=0.3)
        if memory.get("samples_dropped"):
            ax.text(0.02, 0.02, f"{memory['samples_dropped']} middle samples left out",
                    transform=ax.transAxes, fontsize=7)
    axes[0][0].set_ylabel("host memory (MiB)")
    axes[0][0].legend(loc="center right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise UsageError(f"--plot-memory {path}: cannot write: {exc.strerror}") from None
    finally:
        plt.close(fig)
