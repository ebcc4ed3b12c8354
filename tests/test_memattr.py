"""KVM_SET_MEMORY_ATTRIBUTES validation and semantics (virt/kvm/kvm_main.c)."""

from __future__ import annotations

import errno

import pytest

from testbed.kvm.memattr import MemoryAttributes
from testbed.kvm.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from testbed.kvm.vm import KvmIoctlError

P = KVM_MEMORY_ATTRIBUTE_PRIVATE


@pytest.mark.parametrize(
    ("address", "size", "attributes", "flags"),
    [
        (0, 0x1000, P, 1),  # flags must be 0
        (0, 0x1000, 1 << 0, 0),  # unsupported attribute bit
        (0, 0, P, 0),  # size 0
        (0xFFFF_FFFF_FFFF_F000, 0x2000, P, 0),  # address + size wraps
        (0x800, 0x1000, P, 0),  # address not page aligned
        (0x1000, 0x800, P, 0),  # size not page aligned
    ],
)
def test_invalid_requests_fail_with_einval(address: int, size: int, attributes: int, flags: int) -> None:
    """Each check of kvm_vm_ioctl_set_mem_attributes() returns EINVAL and changes nothing."""
    attrs = MemoryAttributes(16)
    with pytest.raises(KvmIoctlError) as info:
        attrs.set(address, size, attributes, flags)
    assert info.value.errno == errno.EINVAL
    assert attrs.private == bytearray(16)


def test_set_then_clear_private() -> None:
    """Setting PRIVATE marks exactly the GFNs of the range; setting 0 makes them shared again."""
    attrs = MemoryAttributes(16)
    attrs.set(0x2000, 0x3000, P)
    assert [attrs.is_private(g) for g in range(6)] == [False, False, True, True, True, False]
    attrs.set(0x3000, 0x1000, 0)
    assert [attrs.is_private(g) for g in range(6)] == [False, False, True, False, True, False]


def test_unchanged_range_is_not_an_update() -> None:
    """An update that changes nothing returns early (no zap of mappings)."""
    attrs = MemoryAttributes(16, initially_private=True)
    attrs.set(0, 0x10000, P)
    assert attrs.updates == 0
    attrs.set(0, 0x1000, 0)
    assert attrs.updates == 1
