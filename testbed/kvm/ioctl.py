"""The error a modelled KVM ioctl fails with: the errno the real ioctl returns."""

from __future__ import annotations

import errno

from testbed.errors import TestbedError


class KvmIoctlError(TestbedError):
    """An ioctl failed; `errno` is what the real ioctl returns."""

    def __init__(self, ioctl: str, err: int, detail: str) -> None:
        self.ioctl = ioctl
        self.errno = err
        super().__init__(f"{ioctl}: {errno.errorcode.get(err, str(err))}: {detail}")
