"""testbed: confidential-VM guest<->host ABI testbed on an emulated x86-64 CPU."""

from __future__ import annotations

__version__ = "0.1.0"
