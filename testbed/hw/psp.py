"""The AMD Secure Processor's migration commands: SEND_* on the source, RECEIVE_* on the target.

SEV API specification (AMD pub. 55766), "SEND_START", "SEND_UPDATE_DATA", "SEND_UPDATE_VMSA",
"SEND_FINISH", "SEND_CANCEL", "RECEIVE_START", "RECEIVE_UPDATE_DATA", "RECEIVE_UPDATE_VMSA",
"RECEIVE_FINISH". The firmware reads a guest page as the guest sees it (C=1, the guest's key),
re-encrypts it for transport under the transport encryption key (TEK, AES-128-CTR) and
authenticates it with the transport integrity key (TIK, HMAC-SHA-256); the hypervisor gets a
packet header (FLAGS, IV, MAC) and the ciphertext, never plaintext. The target's firmware checks
the MAC, decrypts, and writes the page with the target guest's own key. A packet whose MAC does
not verify is refused (BAD_MEASUREMENT) and nothing is written. As in the specification, a
packet is bound to neither a GPA nor an order: the hypervisor chooses where it lands.

In the real flow SEND_START / RECEIVE_START derive the TEK and TIK from the platforms' PDH key
exchange (the session blob carries them wrapped); here both sides are handed one
`TransportSession`. The guest state machine is the specification's: SEND_* need SUPDATE (from
RUNNING via SEND_START), RECEIVE_* need RUPDATE (from RECEIVE_START); the wrong state is
INVALID_GUEST_STATE. RECEIVE_FINISH leaves the target RUNNING, SEND_FINISH the source SENT. A
migration target starts with no guest context (UNINIT: KVM's handle 0, every other command is
INVALID_GUEST); RECEIVE_START where a context owns the VM's ASID already is ASID_OWNED (KVM's
ACTIVATE in sev_bind_asid).

Not in the real stack: the same commands on guest_memfd VMs (sw-protected, SNP). SNP migrates
through a guest migration agent and guest_memfd private memory has no upstream migration path;
the testbed models the same firmware step for them (README, "Deliberate deviations"). On SNP
a received page enters the RMP assigned and with the validated state it had on the source
(FLAGS bit 1, a testbed extension covered by the MAC).
"""

from __future__ import annotations

import functools
import hmac
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from testbed.errors import TestbedError
from testbed.hw.memory import GuestMemory
from testbed.hw.rmp import Rmp
from testbed.x86 import PAGE_SHIFT, PAGE_SIZE

# SEV firmware status codes (include/uapi/linux/psp-sev.h, sev_ret_code)
SEV_RET_SUCCESS = 0x00
SEV_RET_INVALID_PLATFORM_STATE = 0x01
SEV_RET_INVALID_GUEST_STATE = 0x02
SEV_RET_INVALID_LEN = 0x04
SEV_RET_INVALID_ADDRESS = 0x09
SEV_RET_BAD_MEASUREMENT = 0x0B
SEV_RET_ASID_OWNED = 0x0C
SEV_RET_INVALID_GUEST = 0x10
SEV_RET_INVALID_PARAM = 0x16
SEV_RET_INVALID_PAGE_STATE = 0x1A

SEV_RET_NAMES = {
    SEV_RET_INVALID_PLATFORM_STATE: "INVALID_PLATFORM_STATE", SEV_RET_INVALID_GUEST_STATE: "INVALID_GUEST_STATE",
    SEV_RET_INVALID_LEN: "INVALID_LEN", SEV_RET_INVALID_ADDRESS: "INVALID_ADDRESS",
    SEV_RET_BAD_MEASUREMENT: "BAD_MEASUREMENT", SEV_RET_INVALID_PARAM: "INVALID_PARAM",
    SEV_RET_INVALID_PAGE_STATE: "INVALID_PAGE_STATE", SEV_RET_ASID_OWNED: "ASID_OWNED",
    SEV_RET_INVALID_GUEST: "INVALID_GUEST",
}

#: PACKET_HEADER: FLAGS (u32), IV (16 bytes), MAC (32 bytes)
PACKET_HEADER = struct.Struct("<I16s32s")
HDR_LEN = PACKET_HEADER.size
#: FLAGS bit 0: COMPRESSED (the testbed never compresses)
PACKET_FLAG_COMPRESSED = 1 << 0
#: FLAGS bit 1 (testbed extension): the page was validated in the source's RMP (SNP)
PACKET_FLAG_VALIDATED = 1 << 1
#: FLAGS bit 2 (testbed extension): the packet is a vCPU state (VMSA), not a page
PACKET_FLAG_VMSA = 1 << 2

# Guest states (SEV API "Guest States")
#: no guest context: a migration target before RECEIVE_START (KVM's sev->handle is 0)
GSTATE_UNINIT = "UNINIT"
GSTATE_RUNNING = "RUNNING"
GSTATE_SUPDATE = "SUPDATE"
GSTATE_SENT = "SENT"
GSTATE_RUPDATE = "RUPDATE"


class FirmwareError(TestbedError):
    """A firmware command failed with SEV status `status` (KVM returns -EIO and the status in
    kvm_sev_cmd.error). `needed`: for INVALID_LEN, the (header, transport) lengths the
    firmware wrote back into the command buffer."""

    def __init__(self, command: str, status: int, detail: str,
                 needed: tuple[int, int] | None = None) -> None:
        self.command = command
        self.status = status
        self.needed = needed
        name = SEV_RET_NAMES.get(status, f"0x{status:x}")
        super().__init__(f"{command}: firmware status {name} (0x{status:x}): {detail}")


@dataclass
class TransportSession:
    """The transport keys both platforms' firmware hold after the PDH exchange: TEK (AES-128)
    and TIK (HMAC-SHA-256). `create(seed)` makes reproducible keys."""

    tek: bytes
    tik: bytes
    #: packets sealed in this session: each takes its own CTR counter range (the IV)
    sealed: int = field(default=0)

    def __post_init__(self) -> None:
        if len(self.tek) != 16 or len(self.tik) != 32:
            raise ValueError("a transport session needs a 16-byte TEK and a 32-byte TIK")

    @classmethod
    def create(cls, seed: int | None = None) -> TransportSession:
        """New keys: from `seed` (reproducible) or from the OS's randomness."""
        raw = os.urandom(48) if seed is None else random.Random(f"transport-{seed}").randbytes(48)
        return cls(raw[:16], raw[16:])

    def _ctr(self, iv: bytes) -> Cipher[modes.CTR]:
        return Cipher(algorithms.AES(self.tek), modes.CTR(iv))

    def _crypt(self, iv: bytes, data: bytes) -> bytes:
        """AES-128-CTR of `data` from counter block `iv` (encryption and decryption alike),
        through one CTR context kept for the session and re-seeded per packet (reset_nonce,
        cryptography >= 43; a new context costs ~20 us of set-up per packet): the same bytes as
        a fresh `_ctr(iv)`, which stays the path on older versions."""
        ctx = self.__dict__.get("_ctx")
        if ctx is None:
            ctx = self._ctr(iv).encryptor()
            if not hasattr(ctx, "reset_nonce"):
                return ctx.update(data) + ctx.finalize()
            self.__dict__["_ctx"] = ctx
        else:
            ctx.reset_nonce(iv)
        return bytes(ctx.update(data))

    @functools.cached_property
    def _keyed_mac(self) -> hmac.HMAC:
        """An HMAC-SHA-256 keyed with the TIK and fed nothing: copied for each packet."""
        return hmac.new(self.tik, digestmod="sha256")

    def _mac(self, flags: int, iv: bytes, packet: bytes) -> bytes:
        """HMAC-SHA-256 under the TIK over FLAGS, IV and the packet, from one HMAC keyed for the
        session and copied per packet (hmac's copy(), for messages that share a prefix: here
        the key's pads): the same bytes as hmac.digest(tik, FLAGS + IV + packet, "sha256")
        without the key set-up of a new HMAC each packet. Kept like the CTR context: the keys
        do not change in a session."""
        mac = self._keyed_mac.copy()
        mac.update(struct.pack("<I", flags) + iv)
        mac.update(packet)
        return mac.digest()

    def seal(self, plaintext: bytes, flags: int) -> tuple[bytes, bytes]:
        """(header, packet): the plaintext under the TEK, the MAC under the TIK over FLAGS,
        IV and the ciphertext."""
        # One IV per packet: counter blocks never repeat across packets (a page is 256 blocks).
        iv = (self.sealed << 12).to_bytes(16, "big")
        self.sealed += 1
        packet = self._crypt(iv, plaintext)
        return PACKET_HEADER.pack(flags, iv, self._mac(flags, iv, packet)), packet

    def open(self, command: str, header: bytes, packet: bytes) -> tuple[int, bytes]:
        """(flags, plaintext) of a packet whose MAC verifies; FirmwareError otherwise."""
        if len(header) != HDR_LEN:
            raise FirmwareError(command, SEV_RET_INVALID_LEN, f"packet header of {len(header)} bytes, not {HDR_LEN}")
        flags, iv, mac = PACKET_HEADER.unpack(header)
        if not hmac.compare_digest(mac, self._mac(flags, iv, packet)):
            raise FirmwareError(command, SEV_RET_BAD_MEASUREMENT, "the packet's MAC does not verify")
        if flags & PACKET_FLAG_COMPRESSED:
            raise FirmwareError(command, SEV_RET_INVALID_PARAM, "compressed packets are not supported")
        return flags, self._crypt(iv, packet)


class GuestFirmware:
    """The firmware's context for one guest: its state machine and the commands that move
    pages and vCPU state in and out. `read_state` / `write_state` give the vCPU's state
    record (hw/vcpu_state.py) as bytes."""

    def __init__(self, memory: GuestMemory, rmp: Rmp | None, read_state: Callable[[], bytes],
                 write_state: Callable[[bytes], None]) -> None:
        self._mem = memory
        self._rmp = rmp
        self._read_state = read_state
        self._write_state = write_state
        self.state = GSTATE_RUNNING
        self._session: TransportSession | None = None
        #: packets sent and received (for reports)
        self.sent = 0
        self.received = 0

    # ------------------------------------------------------------------- checks
    def incoming(self) -> None:
        """No guest context yet: the VM was never launched and waits for RECEIVE_START."""
        self.state = GSTATE_UNINIT

    def _no_guest(self, command: str) -> None:
        """A command on handle 0 (no LAUNCH_START or RECEIVE_START made a guest context)."""
        if self.state == GSTATE_UNINIT:
            raise FirmwareError(command, SEV_RET_INVALID_GUEST, "no guest context (handle 0): the VM was never "
                                "launched or received")

    def _need(self, command: str, state: str) -> TransportSession:
        self._no_guest(command)
        if self.state != state or self._session is None:
            raise FirmwareError(command, SEV_RET_INVALID_GUEST_STATE, f"guest state {self.state}, needs {state}")
        return self._session

    def _check_range(self, command: str, gpa: int, length: int) -> None:
        if length <= 0 or gpa < 0 or gpa + length > self._mem.size or (gpa >> PAGE_SHIFT) != (
                (gpa + length - 1) >> PAGE_SHIFT):
            raise FirmwareError(command, SEV_RET_INVALID_ADDRESS,
                                f"0x{gpa:x}+0x{length:x} is not inside one page of guest memory")

    # -------------------------------------------------------------------- source
    def send_start(self, session: TransportSession) -> None:
        """SEND_START: RUNNING -> SUPDATE with the session's keys."""
        self._no_guest("SEND_START")
        if self.state != GSTATE_RUNNING:
            raise FirmwareError("SEND_START", SEV_RET_INVALID_GUEST_STATE, f"guest state {self.state}, needs RUNNING")
        self._session = session
        self.state = GSTATE_SUPDATE

    def send_update_data(self, gpa: int, length: int, hdr_len: int = HDR_LEN,
                         trans_len: int | None = None) -> tuple[bytes, bytes]:
        """SEND_UPDATE_DATA: the guest's view (C=1) of [gpa, gpa + length), sealed. A header
        buffer shorter than the packet header (HDR_LEN bytes) or a transport buffer shorter
        than the data (`trans_len`, default `length`: the testbed never compresses) is
        INVALID_LEN with the lengths needed written back (`FirmwareError.needed`) - the answer
        KVM's length query (a zeroed command: every length 0) relies on, and QEMU's
        sev_send_get_packet_len checks for ("if (*fw_err != SEV_RET_INVALID_LEN)"). The state
        is checked first."""
        command = "SEND_UPDATE_DATA"
        session = self._need(command, GSTATE_SUPDATE)
        if hdr_len < HDR_LEN or (trans_len if trans_len is not None else length) < length:
            raise FirmwareError(command, SEV_RET_INVALID_LEN, f"buffers of {hdr_len} (header) and "
                                f"{trans_len} (transport) bytes: {HDR_LEN} and {length} are needed",
                                needed=(HDR_LEN, length))
        self._check_range(command, gpa, length)
        frame = gpa >> PAGE_SHIFT
        flags = 0
        mem = self._mem
        if mem.guest_memfd:
            if self._rmp is not None and not self._rmp.is_assigned(frame):
                raise FirmwareError(command, SEV_RET_INVALID_PAGE_STATE, f"gpa 0x{gpa:x} is not assigned to the guest")
            assert mem.private is not None
            plaintext = bytes(mem.private[gpa : gpa + length])  # the guest_memfd page (zeros if never allocated)
            if self._rmp is not None and self._rmp.validated[frame]:
                flags |= PACKET_FLAG_VALIDATED
        else:
            plaintext = mem.cpu_read(gpa, length, private=True)
        self.sent += 1
        return session.seal(plaintext, flags)

    def send_update_vmsa(self) -> tuple[bytes, bytes]:
        """SEND_UPDATE_VMSA: the vCPU's state, sealed."""
        session = self._need("SEND_UPDATE_VMSA", GSTATE_SUPDATE)
        self.sent += 1
        return session.seal(self._read_state(), PACKET_FLAG_VMSA)

    def send_finish(self) -> None:
        """SEND_FINISH: SUPDATE -> SENT; the session's keys are forgotten."""
        self._need("SEND_FINISH", GSTATE_SUPDATE)
        self.state = GSTATE_SENT
        self._session = None

    def send_cancel(self) -> None:
        """SEND_CANCEL: SUPDATE -> RUNNING (the migration was abandoned; a new one may start).
        Only between SEND_START and SEND_FINISH: a guest already SENT (or RUNNING) is
        INVALID_GUEST_STATE (Documentation/virt/kvm/x86/amd-memory-encryption.rst,
        KVM_SEV_SEND_CANCEL: "After completion of SEND_START, but before SEND_FINISH, the
        source VMM can issue the SEND_CANCEL command to stop a migration")."""
        self._no_guest("SEND_CANCEL")
        if self.state != GSTATE_SUPDATE:
            raise FirmwareError("SEND_CANCEL", SEV_RET_INVALID_GUEST_STATE,
                                f"guest state {self.state}, needs {GSTATE_SUPDATE}")
        self.state = GSTATE_RUNNING
        self._session = None

    def rmp_entries(self, nframes: int) -> bytes | None:
        """SNP: the RMP entries of frames [0, nframes) as one byte each (bit 0 Assigned, bit 1
        Validated: hw/rmp.py `entries`); None without an RMP."""
        return self._rmp.entries(nframes) if self._rmp is not None else None

    # -------------------------------------------------------------------- target
    def receive_start(self, session: TransportSession) -> None:
        """RECEIVE_START: a new guest context in RUPDATE with the session's keys. KVM then binds
        the VM's ASID to it (sev_bind_asid: ACTIVATE), which fails when a guest context of
        this VM - a launched guest, an earlier RECEIVE_START - owns the ASID already: ASID_OWNED,
        and KVM decommissions the new context (nothing changes here)."""
        if self.state != GSTATE_UNINIT:
            raise FirmwareError("RECEIVE_START", SEV_RET_ASID_OWNED,
                                f"guest state {self.state}: the VM's ASID is bound to its guest context already")
        self._session = session
        self.state = GSTATE_RUPDATE

    def receive_update_data(self, header: bytes, packet: bytes, gpa: int, length: int) -> None:
        """RECEIVE_UPDATE_DATA: verify, decrypt, write [gpa, gpa + length) with this guest's
        key. Nothing is written unless the whole packet verifies and fits."""
        command = "RECEIVE_UPDATE_DATA"
        session = self._need(command, GSTATE_RUPDATE)
        self._check_range(command, gpa, length)
        flags, plaintext = session.open(command, header, packet)
        if flags & PACKET_FLAG_VMSA:
            raise FirmwareError(command, SEV_RET_INVALID_PARAM, "the packet is a vCPU state, not a page")
        if len(plaintext) != length:
            raise FirmwareError(command, SEV_RET_INVALID_LEN, f"packet of {len(plaintext)} bytes for {length}")
        mem = self._mem
        frame = gpa >> PAGE_SHIFT
        if mem.guest_memfd:
            assert mem.private is not None
            mem.private[gpa : gpa + length] = plaintext
            mem.materialise(frame, 1, True)
            if self._rmp is not None:
                self._rmp.receive_assigned(frame, bool(flags & PACKET_FLAG_VALIDATED))
        else:
            mem.cpu_write(gpa, plaintext, private=True)
        if mem.on_host_write is not None:
            mem.on_host_write(gpa, length)  # translated code of the page is stale
        self.received += 1

    def receive_update_vmsa(self, header: bytes, packet: bytes) -> None:
        """RECEIVE_UPDATE_VMSA: verify, decrypt and load the vCPU's state."""
        command = "RECEIVE_UPDATE_VMSA"
        session = self._need(command, GSTATE_RUPDATE)
        flags, plaintext = session.open(command, header, packet)
        if not flags & PACKET_FLAG_VMSA:
            raise FirmwareError(command, SEV_RET_INVALID_PARAM, "the packet is a page, not a vCPU state")
        try:
            self._write_state(plaintext)
        except TestbedError as exc:
            raise FirmwareError(command, SEV_RET_INVALID_PARAM, str(exc)) from None
        self.received += 1

    def receive_finish(self) -> None:
        """RECEIVE_FINISH: RUPDATE -> RUNNING."""
        self._need("RECEIVE_FINISH", GSTATE_RUPDATE)
        self.state = GSTATE_RUNNING
        self._session = None


__all__ = [
    "HDR_LEN",
    "PAGE_SIZE",
    "SEV_RET_BAD_MEASUREMENT",
    "FirmwareError",
    "GuestFirmware",
    "TransportSession",
]
