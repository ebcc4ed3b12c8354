"""The Keystone seam: Keystone runs in a worker process (keystone_worker.py) with a timeout."""

from __future__ import annotations

import atexit
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.errors import TestbedError

# --------------------------------------------------------------------------------------------
# The Keystone seam
# --------------------------------------------------------------------------------------------


class _KeystoneError(Exception):
    """Keystone refused a unit (or hung or crashed on it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "KS_ERR_ASM_..." from Keystone, or _HANG / _CRASH
        self.message = message


_HANG = "HANG"
_CRASH = "CRASH"
_KS_SYMBOL_MISSING = "KS_ERR_ASM_SYMBOL_MISSING"
_KS_SYMBOL_REDEFINED = "KS_ERR_ASM_SYMBOL_REDEFINED"
_KS_MNEMONIC = "KS_ERR_ASM_MNEMONICFAIL"

# Seconds Keystone may take before it is taken to hang: a floor plus a generous rate (it
# assembles about 3 us per statement). Bisection probes after a hang use the shorter floor,
# since several of them may hang in turn. Tests lower these.
_TIMEOUT_FLOOR = 3.0
_PROBE_TIMEOUT_FLOOR = 0.5
_TIMEOUT_PER_BYTE = 2e-6
_STARTUP_TIMEOUT = 60.0

# The worker (keystone_worker.py) runs in its own process with a single Keystone engine; it is
# started as a script by path, so it imports nothing of testbed.
_WORKER_SCRIPT = Path(__file__).with_name("keystone_worker.py")


class _StalledError(Exception):
    """The worker did not answer in time."""


class _Worker:
    """Keystone in a child process, so that its hangs and crashes cannot take the testbed along.

    Hazard: Keystone 0.9.2 loops forever on many malformed statements (`.equ X = 5`,
    `.byte 1,,2`, a statement starting with an operator, an unterminated string) and aborts
    the process on others (`.text`, `.cfi_startproc`). The checks in _Preprocessor reject the
    known cases with a better message; the worker catches the rest. Canaries:
    test_statement_starting_with_an_operator_hangs, test_text_directive_crashes_the_process.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        self._lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the worker process, if this process started one."""
        process, self._process = self._process, None
        if process is not None and self._owner == os.getpid():
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, str(_WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._process = process
        assert process.stdout is not None
        # Start-up (importing Keystone) does not count against a request's timeout.
        try:
            ready = _read_exactly(process.stdout.fileno(), 1, time.monotonic() + _STARTUP_TIMEOUT)
        except (_StalledError, OSError, EOFError):
            ready = b""
        if ready != b"R":
            self.close()
            raise TestbedError("cannot start the Keystone worker process (is keystone-engine installed?)")
        return process

    def assemble(self, text: bytes, base: int, timeout: float) -> tuple[bool, bytes]:
        """(True, encoding) or (False, Keystone's error text); _KeystoneError on hang or crash."""
        with self._lock:
            if self._owner != os.getpid():  # forked: the worker and its pipes are the parent's
                self._process, self._owner = None, os.getpid()
            process = self._process or self._start()
            assert process.stdin is not None and process.stdout is not None
            deadline = time.monotonic() + timeout
            try:
                process.stdin.write(struct.pack("<QI", base, len(text)) + text)
                process.stdin.flush()
                fd = process.stdout.fileno()
                (size,) = struct.unpack("<I", _read_exactly(fd, 4, deadline))
                reply = _read_exactly(fd, size, deadline)
            except _StalledError:
                self.close()
                raise _KeystoneError(_HANG, f"Keystone did not finish within {timeout:g} s") from None
            except (OSError, EOFError):
                try:
                    status = process.wait(timeout=5)
                    how = f"signal {-status}" if status < 0 else f"exit status {status}"
                except subprocess.TimeoutExpired:
                    how = "closed its output"
                self.close()
                raise _KeystoneError(_CRASH, f"Keystone crashed ({how})") from None
        return reply[0] == 0, reply[1:]


def _read_exactly(fd: int, size: int, deadline: float) -> bytes:
    chunks = []
    while size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise _StalledError
        chunk = os.read(fd, size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


_worker = _Worker()


def _ks_asm(text: str, base: int, *, probe: bool = False) -> bytes:
    """Encode `text` at `base`, or raise _KeystoneError."""
    # bytes: Keystone takes UTF-8 string literals through unchanged.
    data = text.encode("utf-8")
    # A probe of error location: after a hang several probes may hang in turn.
    floor = _PROBE_TIMEOUT_FLOOR if probe else _TIMEOUT_FLOOR
    ok, payload = _worker.assemble(data, base, floor + len(data) * _TIMEOUT_PER_BYTE)
    if ok:
        return payload
    # Keystone's text is e.g. "Invalid operand (KS_ERR_ASM_INVALIDOPERAND)". KsError's
    # get_asm_count() does not locate the error (see _locate_error), so it is not used.
    raw = payload.decode("utf-8", "replace")
    code = m.group(1) if (m := re.search(r"\((KS_ERR_\w+)\)", raw)) else "KS_ERR"
    message = re.sub(r"\s*\(KS_ERR_\w+\)\s*$", "", raw) or "error"
    raise _KeystoneError(code, message[0].lower() + message[1:])


