"""KVM's side of migrating an encrypted guest: KVM_SEV_SEND_* and KVM_SEV_RECEIVE_*, and the
vCPU state userspace moves.

The commands (KVM_MEMORY_ENCRYPT_OP) are modelled on arch/x86/kvm/svm/sev.c: sev_send_start,
sev_send_update_data, sev_send_finish, sev_send_cancel, sev_receive_start,
sev_receive_update_data, sev_receive_finish. KVM validates the parameters (the errnos below
are sev.c's, including its inconsistencies: RECEIVE_UPDATE_DATA on a non-SEV VM is EINVAL where
every other command says ENOTTY), pins the page and hands the command to the firmware
(testbed/hw/psp.py), whose failure makes the ioctl return EIO with the firmware's status in
kvm_sev_cmd.error (`SevCommandError.fw_error`). The page is named by its GPA here (KVM takes the
userspace address of the memslot's page and pins it with sev_pin_page -> sev_pin_user_pages,
which turns any pin failure into ENOMEM - "if (npinned != npages) { ... return -ENOMEM; }" - so
a page outside the memslot is ENOMEM on both sides, after the parameter checks). With
hdr_len or trans_len 0, SEND_UPDATE_DATA is the length query
(__sev_send_update_data_query_lengths): a zeroed command to the firmware, whose lengths are
copied back whatever it answers (`SevCommandError.lengths`); the firmware's INVALID_LEN is
what QEMU's sev_send_get_packet_len expects.

Deliberate deviations (README): the commands are accepted on sev-snp and sw-protected VMs,
which have no such path in the real stack (SNP migrates through a guest migration agent,
guest_memfd has no upstream migration); RECEIVE_UPDATE_DATA on a VM with memory attributes
needs the GFN private first (EINVAL otherwise, the rule snp_launch_update applies to its
range); SEND/RECEIVE_UPDATE_VMSA follow the shape of the SEV-ES migration series, never merged;
`get_rmp_entries` (the SNP RMP's Assigned/Validated bits for the VMM) has no upstream ioctl;
`set_page_enc_bitmap` is the seed-era series' KVM_SET_PAGE_ENC_BITMAP, never merged.

vCPU state: for a VM whose state KVM can read, userspace moves it with KVM_GET/SET_REGS,
SREGS and MSRS (`get_vcpu_state` / `set_vcpu_state`); for SEV-ES and SNP those fail with EINVAL
(kvm_arch_vcpu_ioctl_get_regs: guest_state_protected) and the registers travel encrypted in the
VMSA packet. KVM's own per-vCPU SEV state (the SNP registered GHCB GPA, the AP jump table,
XCR0/XSS as the GHCB set them, the PV MSRs) is host state and moves in the clear either way.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from testbed.hw.exits import VcpuHardware
from testbed.hw.psp import HDR_LEN, FirmwareError, GuestFirmware, TransportSession
from testbed.hw.vcpu_state import VcpuState
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.uapi import KvmVmType
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE
from testbed.x86.addr import Gfn

#: include/linux/psp-sev.h: the largest blob psp_copy_user_blob() copies
SEV_FW_BLOB_MAX_SIZE = 0x4000
#: include/linux/slab.h KMALLOC_MAX_SIZE (1 << (MAX_PAGE_ORDER + PAGE_SHIFT), x86-64 defaults):
#: sev_send_update_data's kzalloc(hdr_len) / kzalloc(trans_len) of more fails (ENOMEM)
KMALLOC_MAX_SIZE = 1 << 22
U32_MAX = (1 << 32) - 1

if TYPE_CHECKING:
    from testbed.kvm.vcpu import KvmVcpu
    from testbed.kvm.vm import KvmVm

__all__ = [
    "KvmVcpuState",
    "ReceiveContext",
    "SendContext",
    "SevCommandError",
    "TransportSession",
    "get_rmp_entries",
    "get_vcpu_state",
    "receive_start",
    "send_start",
    "set_page_enc_bitmap",
    "set_vcpu_state",
]

#: The VM types the testbed's firmware step serves (see the module comment).
MIGRATABLE_TYPES = (KvmVmType.KVM_X86_SEV_VM, KvmVmType.KVM_X86_SEV_ES_VM, KvmVmType.KVM_X86_SNP_VM,
                    KvmVmType.KVM_X86_SW_PROTECTED_VM)


class SevCommandError(KvmIoctlError):
    """KVM_MEMORY_ENCRYPT_OP returned -EIO: the firmware failed the command with status
    `fw_error` (kvm_sev_cmd.error, SEV_RET_*). `lengths`: what a SEND_UPDATE_DATA length query
    wrote back to hdr_len and trans_len (None for any other command)."""

    def __init__(self, command: str, exc: FirmwareError, lengths: tuple[int, int] | None = None) -> None:
        self.fw_error = exc.status
        self.lengths = lengths
        super().__init__(command, errno.EIO, str(exc))


class _SevCommand:
    """A firmware failure inside is what KVM_MEMORY_ENCRYPT_OP returns for it: -EIO with the
    firmware status (SevCommandError). A class, not a generator: it wraps every page a
    migration sends and receives."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, FirmwareError):
            raise SevCommandError(self.command, exc) from None


def _firmware(vm: KvmVm, command: str, not_sev: int = errno.ENOTTY) -> GuestFirmware:
    """sev_guest(kvm) (the testbed's wider set of types), and the firmware on the VM's platform."""
    if vm.type not in MIGRATABLE_TYPES:
        raise KvmIoctlError(command, not_sev, f"not an SEV guest (VM type {vm.type.name})")
    hw = _hw(vm, command)
    return hw.sev_firmware()


def _hw(vm: KvmVm, command: str) -> VcpuHardware:
    vcpus = vm._vcpu_hw
    if not vcpus:
        raise KvmIoctlError(command, errno.EINVAL, "no vCPU: the testbed's firmware runs on its hardware")
    return vcpus[0]


def _page_params(command: str, gpa: int, length: int, size: int, blobs: tuple[bytes, ...] = ()) -> None:
    """The length checks of sev_send_update_data / sev_receive_update_data, the blobs copied
    from userspace (receive: psp_copy_user_blob() refuses one above SEV_FW_BLOB_MAX_SIZE with
    EINVAL), then the pin (sev_pin_page: ENOMEM when the page cannot be pinned)."""
    if not isinstance(gpa, int) or not isinstance(length, int) or length <= 0:
        raise KvmIoctlError(command, errno.EINVAL, f"guest_len {length!r} must be a positive integer")
    offset = gpa & (PAGE_SIZE - 1)
    if length > PAGE_SIZE or length + offset > PAGE_SIZE:
        # "Check if we are crossing the page boundary"
        raise KvmIoctlError(command, errno.EINVAL,
                            f"0x{gpa:x}+0x{length:x} crosses a page boundary (guest_len + offset > PAGE_SIZE)")
    _check_blobs(command, blobs)
    if gpa < 0 or gpa + length > size:
        # sev_pin_page() -> sev_pin_user_pages(): pin_user_pages_fast() pins nothing outside the
        # memslot's mapping, and "if (npinned != npages) { ... return -ENOMEM; }"
        raise KvmIoctlError(command, errno.ENOMEM, f"gpa 0x{gpa:x} is outside guest memory (0x{size:x} bytes): "
                            "the page cannot be pinned")


class _PinnedPage:
    """sev_pin_memory(kvm, params.guest_uaddr & PAGE_MASK, PAGE_SIZE, &n, ...) for the command's
    duration: the page counts in sev->pages_locked and is checked against the memlock limit as
    any pin is (KvmVm._pin_memory), and is unpinned when the command ends, whatever it said
    (sev_unpin_memory). A class, not a generator: it wraps every page a migration moves."""

    def __init__(self, vm: KvmVm, command: str, gpa: int) -> None:
        self.vm, self.command, self.gpa = vm, command, gpa
        self.npages = 0

    def __enter__(self) -> None:
        vm = self.vm
        self.npages = vm._pin_memory(self.command, (vm.ram_hva or 0) + (self.gpa & ~(PAGE_SIZE - 1)), PAGE_SIZE,
                                     True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.vm._locked(-self.npages)


def _check_blobs(command: str, blobs: tuple[bytes, ...]) -> None:
    """psp_copy_user_blob() (drivers/crypto/ccp/sev-dev.c): a blob longer than
    SEV_FW_BLOB_MAX_SIZE is EINVAL before the firmware sees it."""
    for name, blob in zip(("hdr_len", "trans_len"), blobs, strict=False):
        if len(blob) > SEV_FW_BLOB_MAX_SIZE:
            raise KvmIoctlError(command, errno.EINVAL, f"{name} {len(blob)}: above SEV_FW_BLOB_MAX_SIZE "
                                f"({SEV_FW_BLOB_MAX_SIZE})")


class SendContext:
    """The source side after KVM_SEV_SEND_START: one context per outgoing migration."""

    def __init__(self, vm: KvmVm, firmware: GuestFirmware) -> None:
        self._vm = vm
        self._fw = firmware

    def send_update_data(self, gpa: int, length: int = PAGE_SIZE, hdr_len: int | None = None,
                         trans_len: int | None = None) -> tuple[bytes, bytes]:
        """KVM_SEV_SEND_UPDATE_DATA (arch/x86/kvm/svm/sev.c sev_send_update_data): (packet
        header, transport data) of the guest's view of [gpa, gpa + length), which must not
        cross a page (EINVAL) and lie in RAM (ENOMEM: the pin fails).

        `hdr_len` / `trans_len` are the sizes of userspace's buffers (None: exactly what the
        packet needs, HDR_LEN and `length`; u32, EINVAL otherwise). Either 0 is the length
        query, before any other check ("if (!params.trans_len || !params.hdr_len) return
        __sev_send_update_data_query_lengths(...)"): the firmware gets a zeroed command and
        answers INVALID_LEN with the header length and the transport length for its zero-byte
        GUEST_LENGTH (0: QEMU's sev_send_get_packet_len reads only hdr_len and sizes the
        transport by the page); KVM copies both back whatever the firmware answered, so the
        ioctl fails with EIO and `SevCommandError.lengths` holds them. A buffer above
        KMALLOC_MAX_SIZE cannot be allocated (ENOMEM); one too small for the packet is EIO
        with INVALID_LEN, nothing copied back. Larger buffers come back at their size, the
        packet first and zeros after (the kzalloc'd buffer KVM copies out whole)."""
        command = "KVM_SEV_SEND_UPDATE_DATA"
        vm = self._vm
        _firmware(vm, command)
        for name, value in (("hdr_len", hdr_len), ("trans_len", trans_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= U32_MAX):
                raise KvmIoctlError(command, errno.EINVAL, f"{name} {value!r}: a __u32 is expected")
        if hdr_len == 0 or trans_len == 0:
            try:
                self._fw.send_update_data(0, 0, 0, 0)
            except FirmwareError as exc:
                raise SevCommandError(command, exc, lengths=exc.needed or (0, 0)) from None
            raise AssertionError("the firmware answered a zero-length SEND_UPDATE_DATA")  # pragma: no cover
        _page_params(command, gpa, length, vm.memory.size)
        with _PinnedPage(vm, command, gpa):
            for name, value in (("hdr_len", hdr_len), ("trans_len", trans_len)):
                if value is not None and value > KMALLOC_MAX_SIZE:
                    raise KvmIoctlError(command, errno.ENOMEM, f"{name} {value}: kzalloc() of more than "
                                        f"KMALLOC_MAX_SIZE ({KMALLOC_MAX_SIZE}) fails")
            with _SevCommand(command):
                header, packet = self._fw.send_update_data(gpa, length, HDR_LEN if hdr_len is None else hdr_len,
                                                           trans_len)
        if hdr_len is not None:
            header = header.ljust(hdr_len, b"\0")
        if trans_len is not None:
            packet = packet.ljust(trans_len, b"\0")
        return header, packet

    def send_vcpu_state(self) -> tuple[bytes, bytes]:
        """KVM_SEV_SEND_UPDATE_VMSA (the SEV-ES migration series' shape): the vCPU's state,
        sealed by the firmware (the host cannot read an SEV-ES/SNP guest's registers)."""
        command = "KVM_SEV_SEND_UPDATE_VMSA"
        _firmware(self._vm, command)
        with _SevCommand(command):
            return self._fw.send_update_vmsa()

    def send_finish(self) -> None:
        """KVM_SEV_SEND_FINISH: the outgoing context is closed (the source guest is SENT)."""
        command = "KVM_SEV_SEND_FINISH"
        _firmware(self._vm, command)
        with _SevCommand(command):
            self._fw.send_finish()

    def send_cancel(self) -> None:
        """KVM_SEV_SEND_CANCEL: the migration is abandoned; the source guest runs on."""
        command = "KVM_SEV_SEND_CANCEL"
        _firmware(self._vm, command)
        with _SevCommand(command):
            self._fw.send_cancel()


class ReceiveContext:
    """The target side after KVM_SEV_RECEIVE_START."""

    def __init__(self, vm: KvmVm, firmware: GuestFirmware) -> None:
        self._vm = vm
        self._fw = firmware

    def receive_update_data(self, header: bytes, packet: bytes, gpa: int, length: int = PAGE_SIZE) -> None:
        """KVM_SEV_RECEIVE_UPDATE_DATA (sev.c sev_receive_update_data): EINVAL for a non-SEV VM
        (sev.c says EINVAL here), an empty header or packet, a zero length or a range crossing
        a page, and (testbed) a GFN not private in the memory attributes; ENOMEM outside RAM
        (sev_pin_page, after the blobs are copied); EIO with the firmware's status for a packet
        that does not verify. Nothing is written on any error."""
        command = "KVM_SEV_RECEIVE_UPDATE_DATA"
        vm = self._vm
        _firmware(vm, command, not_sev=errno.EINVAL)
        header, packet = bytes(header), bytes(packet)
        if not header or not packet:
            raise KvmIoctlError(command, errno.EINVAL, "hdr_len and trans_len must be non-zero")
        _page_params(command, gpa, length, vm.memory.size, (header, packet))
        attrs = vm.mem_attrs
        if attrs is not None and not attrs.is_private(Gfn(gpa >> PAGE_SHIFT)):
            raise KvmIoctlError(command, errno.EINVAL, f"gpa 0x{gpa:x} is not private in the memory attributes: "
                                "set KVM_MEMORY_ATTRIBUTE_PRIVATE on it before receiving a private page")
        with _PinnedPage(vm, command, gpa), _SevCommand(command):
            self._fw.receive_update_data(header, packet, gpa, length)

    def receive_vcpu_state(self, header: bytes, packet: bytes) -> None:
        """KVM_SEV_RECEIVE_UPDATE_VMSA: the firmware verifies the VMSA packet and loads it."""
        command = "KVM_SEV_RECEIVE_UPDATE_VMSA"
        _firmware(self._vm, command, not_sev=errno.EINVAL)
        if len(header) != HDR_LEN or not packet:
            raise KvmIoctlError(command, errno.EINVAL, f"a {HDR_LEN}-byte header and a packet are needed")
        _check_blobs(command, (bytes(header), bytes(packet)))
        with _SevCommand(command):
            self._fw.receive_update_vmsa(bytes(header), bytes(packet))
        self._vm.protect_vcpu_state(_hw(self._vm, command))

    def receive_finish(self) -> None:
        """KVM_SEV_RECEIVE_FINISH: the guest is RUNNING and may be entered."""
        command = "KVM_SEV_RECEIVE_FINISH"
        _firmware(self._vm, command)
        with _SevCommand(command):
            self._fw.receive_finish()


def get_rmp_entries(vm: KvmVm) -> bytes | None:
    """Testbed extension (no upstream ioctl: SNP live migration is not upstream): the RMP entry
    of every GFN of RAM as one byte, bit 0 Assigned and bit 1 Validated - what the host kernel
    reads from the RMP table (arch/x86/virt/svm/sev.c struct rmpentry, __snp_lookup_rmpentry).
    The VMM compares them round to round: a PVALIDATE changes an entry without a write
    (testbed/migrate/migration.py). None on a VM without an RMP (not SEV-SNP)."""
    command = "KVM_SEV_SNP_GET_RMP_ENTRIES (testbed)"
    if not vm.snp:
        return None
    return _hw(vm, command).sev_firmware().rmp_entries(vm.memory.size >> PAGE_SHIFT)


def set_page_enc_bitmap(vm: KvmVm, start_gfn: int, num_pages: int, bitmap: bytes) -> None:
    """KVM_SET_PAGE_ENC_BITMAP of the seed-era series ("KVM: x86: Introduce
    KVM_SET_PAGE_ENC_BITMAP ioctl", never merged): load [start_gfn, start_gfn + num_pages)
    of the page-encryption bitmap (bit set = encrypted, bit 0 of byte 0 = start_gfn), as the
    incoming VMM does with the source's (QEMU's sev_load_incoming_bitmap). ENOTTY on a KVM
    without that protocol, EINVAL outside the bitmap or for a buffer too short."""
    name = "KVM_SET_PAGE_ENC_BITMAP"
    if not vm.page_enc_status_protocol:
        raise KvmIoctlError(name, errno.ENOTTY, "the page-encryption bitmap is the seed-era page-enc-status KVM's")
    bits = vm.page_enc_bitmap
    if start_gfn < 0 or num_pages < 0 or start_gfn + num_pages > bits.guest_pages or len(bitmap) * 8 < num_pages:
        raise KvmIoctlError(name, errno.EINVAL, f"gfn 0x{start_gfn:x} + {num_pages} pages ({len(bitmap)} bytes of "
                            f"bitmap) is outside the bitmap ({bits.guest_pages} pages)")
    for i in range(num_pages):
        bits.set_encrypted(start_gfn + i, 1, bool(bitmap[i >> 3] >> (i & 7) & 1))


def send_start(vm: KvmVm, session: TransportSession) -> SendContext:
    """KVM_SEV_SEND_START: ENOTTY unless an SEV guest (the testbed: any type in
    MIGRATABLE_TYPES); the firmware moves the guest to SUPDATE."""
    command = "KVM_SEV_SEND_START"
    fw = _firmware(vm, command)  # "if (!sev_guest(kvm)) return -ENOTTY;" before the arguments
    if not isinstance(session, TransportSession):
        raise KvmIoctlError(command, errno.EINVAL, f"expected a TransportSession, not {type(session).__name__}")
    with _SevCommand(command):
        fw.send_start(session)
    return SendContext(vm, fw)


def receive_start(vm: KvmVm, session: TransportSession) -> ReceiveContext:
    """KVM_SEV_RECEIVE_START: ENOTTY unless an SEV guest; a fresh guest context in RUPDATE.
    On SNP all RAM is assigned in the RMP, as SNP_LAUNCH_START leaves it (kvm/vm.py)."""
    command = "KVM_SEV_RECEIVE_START"
    fw = _firmware(vm, command)  # "if (!sev_guest(kvm)) return -ENOTTY;" before the arguments
    if not isinstance(session, TransportSession):
        raise KvmIoctlError(command, errno.EINVAL, f"expected a TransportSession, not {type(session).__name__}")
    with _SevCommand(command):
        fw.receive_start(session)
    if vm.snp:
        vm.sev_snp_launch_start()  # all RAM assigned in the RMP, as at launch
    return ReceiveContext(vm, fw)


# ------------------------------------------------------------------------- vCPU state
@dataclass(frozen=True)
class KvmVcpuState:
    """What userspace moves for one vCPU: the registers (None for a protected-state VM: they
    travel in the VMSA packet) and KVM's own per-vCPU state, which is host state."""

    regs: VcpuState | None
    kvm: dict[str, Any]


def get_vcpu_state(vcpu: KvmVcpu) -> KvmVcpuState:
    """KVM_GET_REGS/SREGS/MSRS (registers only where KVM may read them) and KVM's SEV state."""
    vm = vcpu.vm
    regs = None if vm.vcpu_state_protected(vcpu.hw) else vcpu.hw.save_state()
    kvm: dict[str, Any] = {"pv_msrs": dict(vcpu.pv_msrs.values)}
    sev = vcpu.sev_state
    if sev is not None:
        kvm["sev"] = {"registered_ghcb_gpa": sev.registered_ghcb_gpa, "ap_jump_table": sev.ap_jump_table,
                      "xcr0": sev.xcr0, "xss": sev.xss}
    return KvmVcpuState(regs, kvm)


def set_vcpu_state(vcpu: KvmVcpu, state: KvmVcpuState) -> None:
    """KVM_SET_REGS/SREGS/MSRS and KVM's SEV state. Registers of a vCPU whose state is the
    guest's are EINVAL (kvm_arch_vcpu_ioctl_set_regs: has_protected_state &&
    guest_state_protected: after the launch's VMSA or RECEIVE_UPDATE_VMSA, not on a target still
    waiting for it), as is a state of the wrong kind (one with SEV state for a VM without, and
    the reverse)."""
    name = "KVM_SET_REGS"
    if not isinstance(state, KvmVcpuState):
        raise KvmIoctlError(name, errno.EINVAL, f"expected a KvmVcpuState, not {type(state).__name__}")
    vm = vcpu.vm
    if state.regs is not None:
        if vm.vcpu_state_protected(vcpu.hw):
            raise KvmIoctlError(name, errno.EINVAL, "the guest's register state is protected (SEV-ES/SNP): "
                                "it moves in the VMSA packet (receive_vcpu_state)")
        vcpu.hw.load_state(state.regs)
    sev = vcpu.sev_state
    saved = state.kvm.get("sev")
    if (sev is None) != (saved is None):
        raise KvmIoctlError(name, errno.EINVAL, "the vCPU state is from a VM of another kind (SEV-ES state)")
    vcpu.pv_msrs.values.clear()
    vcpu.pv_msrs.values.update(state.kvm.get("pv_msrs", {}))
    if sev is not None and saved is not None:
        sev.registered_ghcb_gpa = saved["registered_ghcb_gpa"]
        sev.ap_jump_table = saved["ap_jump_table"]
        sev.xcr0 = saved["xcr0"]
        sev.xss = saved["xss"]
