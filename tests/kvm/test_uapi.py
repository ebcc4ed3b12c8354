"""The exits userspace answers (testbed/kvm/uapi.py _Replies): frozen but for their reply slots,
however they were made: constructed, copied, deep-copied, pickled or replaced."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from testbed.kvm.uapi import HypercallExit, IoInExit, RdmsrExit, TdxExit, WrmsrExit

MADE: list[tuple[Callable[[], Any], str, str]] = [  # (make, a frozen field, the reply slot)
    (lambda: HypercallExit(12, (0x1000, 1, 0, 0, 0, 0), 0, 1), "nr", "ret"),
    (lambda: IoInExit(size=4, port=0x80, count=1, data=bytearray(4)), "port", "data"),
    (lambda: RdmsrExit(index=0x10, msr_reason=4), "index", "data"),
    (lambda: WrmsrExit(index=0x10, msr_reason=4, data=3), "index", "error"),
    (lambda: TdxExit(nr=0x10002, leaf=1), "nr", "ret"),
]


@pytest.mark.parametrize(("make", "frozen", "reply"), MADE, ids=[m[1] + "/" + m[2] for m in MADE])
@pytest.mark.parametrize("how", ["new", "copy", "deepcopy", "pickle", "replace"])
def test_an_exit_is_frozen_but_for_its_reply_slot_however_made(make: Callable[[], Any], frozen: str, reply: str,
                                                                  how: str) -> None:
    """Only the reply slot is writable, on an exit constructed or copied in any way (a copy
    equals its original); a field is never deleted."""
    original = make()
    exit = {
        "new": lambda: original,
        "copy": lambda: copy.copy(original),
        "deepcopy": lambda: copy.deepcopy(original),
        "pickle": lambda: pickle.loads(pickle.dumps(original)),
        "replace": lambda: dataclasses.replace(original),
    }[how]()
    assert exit == original
    setattr(exit, reply, getattr(exit, reply))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(exit, frozen, getattr(exit, frozen))
    with pytest.raises(dataclasses.FrozenInstanceError):
        delattr(exit, reply)
