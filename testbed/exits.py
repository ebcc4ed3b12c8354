"""The exits KVM_RUN returns to userspace (`testbed.exits.HypercallExit`, ...): one type per
KVM_EXIT_*, read-only but for the reply slots userspace fills (testbed/kvm/uapi.py)."""

from testbed.kvm.uapi import (
    EXIT_TYPES,
    ApResetHoldExit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IoExit,
    IoInExit,
    IoOutExit,
    KvmExit,
    MemoryFaultExit,
    MsrExit,
    RdmsrExit,
    ShutdownExit,
    SystemEventExit,
    TdxExit,
    WrmsrExit,
)

__all__ = [
    "EXIT_TYPES", "ApResetHoldExit", "HltExit", "HypercallExit", "InternalErrorExit", "IoExit", "IoInExit",
    "IoOutExit", "KvmExit", "MemoryFaultExit", "MsrExit", "RdmsrExit", "ShutdownExit", "SystemEventExit",
    "TdxExit", "WrmsrExit",
]
