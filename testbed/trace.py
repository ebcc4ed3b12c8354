"""The event trace: every hardware exit, KVM exit, user exit, ucall and injected exception.

Events are JSON objects written one per line (JSON Lines) and flushed as they are written, so a
crash loses nothing already traced. Every layer emits through the same Tracer; when tracing is
off `enabled` is False and callers on hot paths skip building the event at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import IO, Any


class Tracer:
    """Collects events: to a JSONL stream, to a callback, or nowhere."""

    def __init__(self, stream: IO[str] | None = None, sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._stream = stream
        self._sink = sink
        self.enabled = stream is not None or sink is not None
        self._t0 = time.perf_counter()
        self.seq = 0

    @classmethod
    def disabled(cls) -> Tracer:
        """A tracer that drops everything."""
        return cls()

    def set_sink(self, sink: Callable[[dict[str, Any]], None] | None) -> None:
        """Send events to `sink` from now on (None: stop); the stream, if any, is kept. The
        golden recorder (testbed/golden.py) listens to a booted machine this way."""
        self._sink = sink
        self.enabled = self._stream is not None or sink is not None

    def emit(self, layer: str, event: str, **fields: Any) -> None:
        """Record one event from `layer` ("hw", "kvm", "vmm", "guest")."""
        if not self.enabled:
            return
        self.seq += 1
        record: dict[str, Any] = {"seq": self.seq, "t": round(time.perf_counter() - self._t0, 6), "layer": layer}
        record["event"] = event
        record.update(fields)
        if self._stream is not None:
            self._stream.write(json.dumps(record, default=_jsonable) + "\n")
            self._stream.flush()
        if self._sink is not None:
            self._sink(record)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if hasattr(value, "value"):
        return value.value
    return str(value)
