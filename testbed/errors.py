"""The testbed's exception hierarchy: one base class, small subclasses carrying context.

Every error a user can provoke (a bad guest source, a bad option, malformed protocol input
from a hostile guest that the *host* cannot absorb) derives from TestbedError, so the CLI can
print it as one line and exit with a status instead of a traceback.
"""

from __future__ import annotations


class TestbedError(Exception):
    """Base class of every error the testbed raises on purpose."""

    __test__ = False  # not a pytest test class despite the name


class UsageError(TestbedError):
    """Options that do not fit together (e.g. an SEV VM type on an Intel vCPU)."""


class MachineClosedError(UsageError):
    """A machine (or its vCPU or memory) used after close(): its emulator and guest memory are released."""


class GuestBootError(TestbedError):
    """The guest stopped before the address it was booted to (Machine.boot_to); the message
    names why: the run's outcome (an exception's vector, error code and RIP) and the stop."""


class AsmError(TestbedError):
    """A guest source failed to assemble; the message is `file:line: message`."""

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        super().__init__(f"{file}:{line}: {message}")


class GuestMemoryError(TestbedError):
    """A host-side access outside guest memory, or one the hardware refuses (e.g. the RMP)."""

    def __init__(self, message: str, gpa: int | None = None) -> None:
        self.gpa = gpa
        super().__init__(message if gpa is None else f"{message} (gpa 0x{gpa:x})")
