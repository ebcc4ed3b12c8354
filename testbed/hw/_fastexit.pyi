"""Type stub of the optional C fast path (testbed/hw/_fastexit.c)."""

from collections.abc import Callable, Sequence

class FastExit:
    def __init__(
        self,
        uc: int,
        hook_add: int,
        read_batch: int,
        write_batch: int,
        snapshot_ids: Sequence[int],
        cs_index: int,
        write_ids: Sequence[int],
        handler: Callable[[int, int, int, int, int, int, int, int], bool],
        /,
    ) -> None: ...
    def write2(self, rax: int, rip: int, /) -> None: ...
    def read3(self) -> int: ...
    def write3(self, rax: int, rip: int, rflags: int, /) -> None: ...
    def close(self) -> None: ...

def skip_hook(uc: int, hook_add: int, read_batch: int, write_batch: int, rip_id: int, length: int, /) -> object:
    """The benchmark's C-only INSN_INVALID hook (RIP += length); keep the result alive while the engine runs."""
