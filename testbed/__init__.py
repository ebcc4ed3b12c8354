"""testbed: confidential-VM guest<->host ABI testbed on an emulated x86-64 CPU.

The host API (README, "The host API"): `Vm`, `Vcpu`, `Ucall`, the errors a run ends with
(`VmExitError`, `GuestAssertionError`, `GuestExceptionError`, `VmTimeoutError`,
`KvmRunError`) and the other errors the host API raises (`MachineClosedError`, `KvmIoctlError`,
`UnmappableMemoryError`, `ControlPlaneError`, `SnapshotError`), the exit types
(`testbed.exits`, also each by name: `HypercallExit`, ...),
`VmOptions`, `run_guest`, `RunReport`. Names load on first use, so `import testbed` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Vm": "testbed.api",
    "Vcpu": "testbed.api",
    "VmExitError": "testbed.api",
    "GuestAssertionError": "testbed.api",
    "GuestExceptionError": "testbed.api",
    "VmTimeoutError": "testbed.api",
    "KvmRunError": "testbed.api",
    "run_guest": "testbed.api",
    "Ucall": "testbed.vmm.ucall",
    "GuestFailure": "testbed.vmm.ucall",
    "VmOptions": "testbed.machine",
    "RunReport": "testbed.vmm.vmm",
    "TestbedError": "testbed.errors",
    "UsageError": "testbed.errors",
    "MachineClosedError": "testbed.errors",
    "KvmIoctlError": "testbed.kvm.ioctl",
    "UnmappableMemoryError": "testbed.hw.memory",
    "ControlPlaneError": "testbed.control_plane",
    "SnapshotError": "testbed.snapshot",
    **{name: "testbed.kvm.uapi" for name in (
        "HypercallExit", "IoInExit", "IoOutExit", "HltExit", "ShutdownExit", "InternalErrorExit",
        "SystemEventExit", "RdmsrExit", "WrmsrExit", "ApResetHoldExit", "MemoryFaultExit", "TdxExit", "KvmExit")},
}

__all__ = [  # noqa: RUF022 - grouped as _EXPORTS
    "exits", "Vm", "Vcpu", "VmExitError", "GuestAssertionError", "GuestExceptionError", "VmTimeoutError",
    "KvmRunError", "run_guest", "Ucall", "GuestFailure", "VmOptions", "RunReport", "TestbedError", "UsageError",
    "MachineClosedError", "KvmIoctlError", "UnmappableMemoryError", "ControlPlaneError", "SnapshotError",
    "HypercallExit", "IoInExit", "IoOutExit", "HltExit", "ShutdownExit", "InternalErrorExit", "SystemEventExit",
    "RdmsrExit", "WrmsrExit", "ApResetHoldExit", "MemoryFaultExit", "TdxExit", "KvmExit",
]

if TYPE_CHECKING:
    from testbed import exits as exits
    from testbed.api import (
        GuestAssertionError as GuestAssertionError,
    )
    from testbed.api import (
        GuestExceptionError as GuestExceptionError,
    )
    from testbed.api import (
        KvmRunError as KvmRunError,
    )
    from testbed.api import (
        Vcpu as Vcpu,
    )
    from testbed.api import (
        Vm as Vm,
    )
    from testbed.api import (
        VmExitError as VmExitError,
    )
    from testbed.api import (
        VmTimeoutError as VmTimeoutError,
    )
    from testbed.api import (
        run_guest as run_guest,
    )
    from testbed.control_plane import ControlPlaneError as ControlPlaneError
    from testbed.errors import MachineClosedError as MachineClosedError
    from testbed.errors import TestbedError as TestbedError
    from testbed.errors import UsageError as UsageError
    from testbed.hw.memory import UnmappableMemoryError as UnmappableMemoryError
    from testbed.kvm.ioctl import KvmIoctlError as KvmIoctlError
    from testbed.kvm.uapi import (
        ApResetHoldExit as ApResetHoldExit,
    )
    from testbed.kvm.uapi import (
        HltExit as HltExit,
    )
    from testbed.kvm.uapi import (
        HypercallExit as HypercallExit,
    )
    from testbed.kvm.uapi import (
        InternalErrorExit as InternalErrorExit,
    )
    from testbed.kvm.uapi import (
        IoInExit as IoInExit,
    )
    from testbed.kvm.uapi import (
        IoOutExit as IoOutExit,
    )
    from testbed.kvm.uapi import (
        KvmExit as KvmExit,
    )
    from testbed.kvm.uapi import (
        MemoryFaultExit as MemoryFaultExit,
    )
    from testbed.kvm.uapi import (
        RdmsrExit as RdmsrExit,
    )
    from testbed.kvm.uapi import (
        ShutdownExit as ShutdownExit,
    )
    from testbed.kvm.uapi import (
        SystemEventExit as SystemEventExit,
    )
    from testbed.kvm.uapi import (
        TdxExit as TdxExit,
    )
    from testbed.kvm.uapi import (
        WrmsrExit as WrmsrExit,
    )
    from testbed.machine import VmOptions as VmOptions
    from testbed.snapshot import SnapshotError as SnapshotError
    from testbed.vmm.ucall import GuestFailure as GuestFailure
    from testbed.vmm.ucall import Ucall as Ucall
    from testbed.vmm.vmm import RunReport as RunReport


def __getattr__(name: str) -> Any:
    if name == "exits":
        return importlib.import_module("testbed.exits")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'testbed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
