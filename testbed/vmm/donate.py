"""The VMM's handler for the guest's donation of its encryption-status structure.

KVM_HC_TESTBED_DONATE_ENC_STATUS (a testbed extension, kvm/uapi.py) reaches userspace as
KVM_EXIT_HYPERCALL when the VMM enabled its bit of KVM_CAP_EXIT_HYPERCALL, which the testbed's
VMM does exactly when it runs the donated tracker (machine.py). a0 = the GPA, a1 = the size in
bytes, a2 = flags (must be 0). The answer goes back raw in `ret`, as for any hypercall exit
(complete_hypercall_exit): 0, or -errno -- -KVM_EINVAL (bad flags, alignment, outside guest
memory, not shared, an invalid structure), -KVM_E2BIG (above the host's bound), -ENOSPC (28:
below what the host requires; the header's host_request then says how much). Everything is
checked here and in DonatedTracker.donate; KVM checks nothing.

Whether a page is shared is the VMM's own knowledge: the memory attributes it set through
KVM_SET_MEMORY_ATTRIBUTES where the VM has them. Without them (legacy SEV-ES) the VMM cannot
tell (ciphertext is just bytes to it): every page counts as shared, and a structure in a page
the guest keeps private reads as garbage and is refused when validated.
"""

from __future__ import annotations

from testbed.hw.memory import HostMemory
from testbed.kvm.hypercall import neg
from testbed.tracker.donated import DonatedTracker, DonationRefusedError, IsPrivate

#: The donation's a2: no flag is defined.
DONATE_VALID_FLAGS = 0


class DonateHandler:
    """Answers the donation hypercall exits for one VM's DonatedTracker."""

    def __init__(self, tracker: DonatedTracker, memory: HostMemory, is_private: IsPrivate | None) -> None:
        # is_private None: a VMM that keeps no memory attributes cannot tell a private page.
        self.tracker = tracker
        self.memory = memory
        self.is_private = is_private
        #: every donation the guest asked for: (gpa, size, ret, reason or "")
        self.log: list[tuple[int, int, int, str]] = []

    def handle(self, gpa: int, size: int, flags: int) -> int:
        """The value for run->hypercall.ret (module docstring)."""
        try:
            if flags & ~DONATE_VALID_FLAGS:
                raise DonationRefusedError(22, f"flags 0x{flags:x}: no flag is defined")
            self.tracker.donate(gpa, size, self.memory.read, self.memory.write, self.is_private)
        except DonationRefusedError as exc:
            self.log.append((gpa, size, exc.errno, exc.reason))
            return neg(exc.errno)
        self.log.append((gpa, size, 0, ""))
        return 0

    def adopt(self, gpa: int, size: int) -> str | None:
        """Live migration's target: take over the donation the guest made on the source (its
        region arrived with the guest's memory), as if the guest had donated it here, so the
        guest keeps its structure where it is. None, or why the donation was refused (the
        tracker then stays without one and says so)."""
        try:
            self.tracker.donate(gpa, size, self.memory.read, self.memory.write, self.is_private)
        except DonationRefusedError as exc:
            self.log.append((gpa, size, exc.errno, f"migrated donation refused: {exc.reason}"))
            return exc.reason
        self.log.append((gpa, size, 0, "migrated from the source"))
        return None
