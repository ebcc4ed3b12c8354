"""Type stub of the optional C page walk and TLB fill (testbed/hw/_nativemmu.c)."""

from collections.abc import Callable, Sequence
from typing import Any

def walk(
    memory: Any, cr3: int, va: int, access: int, user: bool, phys_bits: int, enc_mask: int,
    enc_means_private: bool, wp: bool, nxe: bool, /,
) -> tuple[int, int, bool, bool, bool, bool] | tuple[int, int, int | None]: ...

class NativeMmu:
    fills: int
    dirty_faults: int
    def __init__(
        self,
        uc: int,
        hook_add: int,
        read_batch: int,
        fill_reg_ids: Sequence[int],
        fallback: Callable[[int, int], tuple[int, int] | None],
        /,
    ) -> None: ...
    def configure(
        self, dram: int, private: int, size: int, model: int, owner: Any, attrs: Any, validated: Any,
        exec_bits: Any, scanned_bits: Any, phys_bits: int, enc_mask: int, enc_means_private: bool, snp: bool,
        stage2: bool, alias_base: int, /,
    ) -> None: ...
    def set_python_only(self, value: bool, /) -> None: ...
    def set_present(self, present: Any, /) -> None: ...
    def set_dirty_log(self, bitmap: Any, /) -> None: ...
    def fill(self, vaddr: int, access: int, cs: int, cr3: int, cr0: int, /) -> tuple[int, int] | None: ...
    def flush(self) -> None: ...
    def fetch(self, va: int, n: int, /) -> bytes | None: ...
    def walk_now(
        self, va: int, access: int, user: bool, /,
    ) -> tuple[int, int, bool, bool, bool, bool] | tuple[int, int, int | None] | None: ...
    def walk(
        self, cr3: int, va: int, access: int, user: bool, wp: bool, nxe: bool, /,
    ) -> tuple[int, int, bool, bool, bool, bool] | tuple[int, int, int | None] | None: ...
    def close(self) -> None: ...
