"""The migration firmware step (testbed/hw/psp.py) behind KVM's KVM_SEV_SEND_* and
KVM_SEV_RECEIVE_* (testbed/kvm/migration.py).

Modelled on arch/x86/kvm/svm/sev.c (sev_send_start, sev_send_update_data with
__sev_send_update_data_query_lengths, sev_send_finish, sev_send_cancel, sev_receive_start,
sev_receive_update_data, sev_receive_finish: their parameter checks and errnos; sev_pin_page ->
sev_pin_user_pages turns a failed pin into ENOMEM; sev_es_sync_vmsa puts the x87/SSE state and
XCR0 in the VMSA) and the SEV API specification's SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA (a
packet sealed under the transport keys; a MAC that does not verify is refused, nothing written).
sev-snp and sw-protected have no such path in the real stack: the testbed models the same
step for them (README, "Deliberate deviations").
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import testbed
from testbed.api import Vcpu, Vm
from testbed.hw.psp import (
    HDR_LEN,
    SEV_RET_ASID_OWNED,
    SEV_RET_BAD_MEASUREMENT,
    SEV_RET_INVALID_GUEST,
    SEV_RET_INVALID_GUEST_STATE,
    SEV_RET_INVALID_LEN,
    SEV_RET_INVALID_PARAM,
)
from testbed.kvm.ioctl import KvmIoctlError
from testbed.kvm.migration import (
    KMALLOC_MAX_SIZE,
    ReceiveContext,
    SendContext,
    SevCommandError,
    TransportSession,
    get_rmp_entries,
    receive_start,
    send_start,
    set_page_enc_bitmap,
)
from testbed.layout import Layout
from testbed.machine import Machine, VmOptions

MEMORY = 8 << 20
FREE = Layout(MEMORY).defines()["GUEST_FREE_GPA"]
MARK = 0x5EC2E7DA7A5EC2E7

GUEST = """
guest_main:
    mov rdi, GUEST_FREE_GPA
    mov rsi, 4
    call set_memory_private
    GUEST_ASSERT_EQ rax, 0
    mov rdi, GUEST_FREE_GPA
    mov rcx, 4
    movabs rdx, MARK
write_loop:
    mov qword ptr [rdi], rcx
    mov qword ptr [rdi + 8], rdx
    mov qword ptr [rdi + 16], rdi
    add rdi, 0x1000
    dec rcx
    jnz write_loop
    GUEST_SYNC 1
    mov rdi, GUEST_FREE_GPA
    mov rcx, 4
    movabs rdx, MARK
read_loop:
    mov rax, [rdi]
    GUEST_ASSERT_EQ rax, rcx
    mov rax, [rdi + 8]
    GUEST_ASSERT_EQ rax, rdx
    mov rax, [rdi + 16]
    GUEST_ASSERT_EQ rax, rdi
    add rdi, 0x1000
    dec rcx
    jnz read_loop
    GUEST_SYNC 2
    GUEST_DONE
"""
TYPES = ["sev", "sev-es", "sev-snp", "sw-protected"]


@contextmanager
def source(vm_type: str) -> Iterator[Vm]:
    """A VM of `vm_type` stopped at the guest's first sync, its private pages written."""
    with testbed.Vm(vm_type=vm_type, memory=MEMORY, seed=1) as vm:
        vcpu = vm.load("<send-receive>", text=GUEST, defines={"MARK": MARK})
        assert vcpu.run_to_ucall().args[0] == 1
        vm.machine.kvm_vcpu.complete_pending()
        yield vm


class Target(Vm):
    """An incoming VM and its vCPU."""

    vcpu: Vcpu


@contextmanager
def target(src: Vm) -> Iterator[Target]:
    """An incoming VM of the source's configuration but its own key (seed 2)."""
    options = VmOptions(vm_type=src.options.vm_type, memory=MEMORY, seed=2)
    dst, vcpu = Target.attach(Machine(src.machine.program, options, incoming=True))
    assert isinstance(dst, Target)
    dst.vcpu = vcpu
    with dst:
        yield dst


def guest_view(vm: Vm, gpa: int) -> bytes:
    """The page as the guest reads it through a C=1 mapping (the CPU's view)."""
    return vm.machine.memory.cpu_read(gpa, 4096, private=True)


def migrate_all(src: Vm, dst: Vm, session: TransportSession) -> tuple[SendContext, ReceiveContext, int]:
    """Every page and the vCPU: private pages through the firmware, shared ones raw."""
    ctx = src.send_start(session)
    rctx = dst.receive_start(session)
    attrs = src.machine.kvm_vm.mem_attrs
    shared = {gfn + i for gfn, n in src.shared_ranges() for i in range(n)}
    sent = 0
    for gfn in range(MEMORY >> 12):
        gpa = gfn << 12
        private = attrs.is_private(gfn) if attrs is not None else gfn not in shared
        if attrs is not None:
            dst.set_memory_attributes(gpa, 4096, private)
        if private:
            header, packet = ctx.send_update_data(gpa)
            rctx.receive_update_data(header, packet, gpa)
            sent += 1
        else:
            dst.write(gpa, src.read(gpa, 4096))
    state = src.get_vcpu_state()
    if state.regs is None:
        rctx.receive_vcpu_state(*ctx.send_vcpu_state())
    dst.set_vcpu_state(state)
    return ctx, rctx, sent


@pytest.mark.parametrize("vm_type", TYPES)
def test_round_trip_gives_the_same_guest_plaintext(vm_type: str) -> None:
    """A private page sent by the source's firmware and received by the target's, whose key
    differs, reads the same to the guest on the target; the guest resumes there and checks its
    pages itself (sync 2). On legacy SEV the host sees different ciphertext on the two sides."""
    session = TransportSession.create(5)
    with source(vm_type) as src, target(src) as dst:
        ctx, rctx, sent = migrate_all(src, dst, session)
        ctx.send_finish()
        rctx.receive_finish()
        assert sent >= 4
        assert dst.machine.cpu.save_state() == src.machine.cpu.save_state()
        for gpa in range(FREE, FREE + 4 * 4096, 4096):
            assert dst.is_private(gpa) == src.is_private(gpa) or vm_type == "sev-es"
            page = guest_view(src, gpa)
            assert page[8:16] == MARK.to_bytes(8, "little")
            assert guest_view(dst, gpa) == page
            if vm_type in ("sev", "sev-es"):
                assert src.read(gpa, 4096) != dst.read(gpa, 4096)  # ciphertext under two keys
        assert dst.vcpu.run_to_ucall().args[0] == 2


def test_packet_is_not_the_plaintext() -> None:
    """The host holds only the packet header (FLAGS, IV, MAC: 52 bytes) and the transport
    ciphertext: neither contains the page's plaintext."""
    with source("sev-snp") as src:
        ctx = src.send_start(TransportSession.create(1))
        header, packet = ctx.send_update_data(FREE)
        plain = guest_view(src, FREE)
        assert len(header) == HDR_LEN and len(packet) == 4096
        assert packet != plain
        assert MARK.to_bytes(8, "little") not in packet + header
        again = ctx.send_update_data(FREE)
        assert again[1] != packet  # a fresh IV per packet


@pytest.mark.parametrize("corrupt", ["packet", "mac", "iv", "flags", "other-session"])
def test_corrupted_packet_is_refused_and_nothing_is_written(corrupt: str) -> None:
    """A packet or header changed in transit (or sealed in another session) fails the MAC:
    RECEIVE_UPDATE_DATA returns EIO with firmware status BAD_MEASUREMENT, and the target page
    is untouched (host view and guest view)."""
    with source("sev") as src, target(src) as dst:
        session = TransportSession.create(2)
        other = TransportSession.create(3)
        ctx = src.send_start(other if corrupt == "other-session" else session)
        rctx = dst.receive_start(session)
        header, packet = ctx.send_update_data(FREE)
        flip = {"packet": (packet, 100), "flags": (header, 0), "iv": (header, 10), "mac": (header, 30)}
        if corrupt in flip:
            data, at = flip[corrupt]
            changed = bytearray(data)
            changed[at] ^= 0x01
            if data is packet:
                packet = bytes(changed)
            else:
                header = bytes(changed)
        before_host, before_guest = dst.read(FREE, 4096), guest_view(dst, FREE)
        with pytest.raises(SevCommandError) as exc:
            rctx.receive_update_data(header, packet, FREE)
        assert exc.value.errno == errno.EIO
        assert exc.value.fw_error == SEV_RET_BAD_MEASUREMENT
        assert dst.read(FREE, 4096) == before_host
        assert guest_view(dst, FREE) == before_guest


@pytest.mark.parametrize(("gpa", "length", "err"), [
    (FREE, 0, errno.EINVAL),  # !params.guest_len
    (FREE, 4097, errno.EINVAL),  # guest_len > PAGE_SIZE
    (FREE + 16, 4096, errno.EINVAL),  # guest_len + offset > PAGE_SIZE: crosses a page
    (FREE + 0xFF0, 32, errno.EINVAL),
    (MEMORY, 4096, errno.ENOMEM),  # not in the memslot: sev_pin_user_pages "npinned != npages"
])
def test_send_and_receive_length_checks(gpa: int, length: int, err: int) -> None:
    """sev_send_update_data / sev_receive_update_data: a zero length, a length above a page and
    a range that crosses a page boundary are EINVAL; a page outside guest memory cannot be
    pinned (ENOMEM: sev_pin_user_pages returns -ENOMEM whenever fewer pages were pinned than
    asked). Checked before the firmware runs, on both sides."""
    with source("sev") as src, target(src) as dst:
        session = TransportSession.create(4)
        ctx = src.send_start(session)
        rctx = dst.receive_start(session)
        with pytest.raises(KvmIoctlError) as exc:
            ctx.send_update_data(gpa, length)
        assert exc.value.errno == err
        header, packet = ctx.send_update_data(FREE)
        with pytest.raises(KvmIoctlError) as exc:
            rctx.receive_update_data(header, packet, gpa, length)
        assert exc.value.errno == err


def test_command_errnos_and_firmware_states() -> None:
    """ENOTTY for SEND_START on a VM that is not an SEV guest, but EINVAL for
    RECEIVE_UPDATE_DATA there (sev.c's own inconsistency); EINVAL for an empty header or
    packet and (testbed) for a page not private in the target's attributes; the firmware's
    state machine: a command after SEND_FINISH is EIO with INVALID_GUEST_STATE; RECEIVE_START
    where a guest context already owns the VM's ASID (a second one, or on a launched guest)
    fails KVM's ACTIVATE (sev_bind_asid) with ASID_OWNED; SEND_START on a target never launched
    nor received names handle 0: INVALID_GUEST."""
    session = TransportSession.create(6)
    with testbed.Vm(memory=MEMORY) as plain:
        plain.load("<plain>", text="guest_main:\n    GUEST_DONE\n")
        with pytest.raises(KvmIoctlError) as exc:
            plain.send_start(session)
        assert exc.value.errno == errno.ENOTTY
        from testbed.kvm.migration import ReceiveContext as Rc

        fake = Rc(plain.machine.kvm_vm, None)  # type: ignore[arg-type]
        with pytest.raises(KvmIoctlError) as exc:
            fake.receive_update_data(b"h" * HDR_LEN, b"p", 0)
        assert exc.value.errno == errno.EINVAL
    with source("sev") as src, target(src) as dst:
        with pytest.raises(SevCommandError) as fw:
            dst.send_start(session)
        assert fw.value.errno == errno.EIO and fw.value.fw_error == SEV_RET_INVALID_GUEST
        with pytest.raises(SevCommandError) as fw:
            src.receive_start(session)
        assert fw.value.errno == errno.EIO and fw.value.fw_error == SEV_RET_ASID_OWNED
        src.send_start(session).send_cancel()  # the launched guest is untouched: it can still send
    with source("sw-protected") as src, target(src) as dst:
        ctx = src.send_start(session)
        rctx = dst.receive_start(session)
        header, packet = ctx.send_update_data(FREE)
        for bad in ((b"", packet), (header, b"")):
            with pytest.raises(KvmIoctlError) as exc:
                rctx.receive_update_data(*bad, FREE)
            assert exc.value.errno == errno.EINVAL
        assert not dst.is_private(FREE)
        with pytest.raises(KvmIoctlError, match="not private") as exc:
            rctx.receive_update_data(header, packet, FREE)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(SevCommandError) as fw:
            dst.receive_start(session)  # the ASID is bound to the first one's context (sev_bind_asid)
        assert fw.value.fw_error == SEV_RET_ASID_OWNED
        ctx.send_finish()
        with pytest.raises(SevCommandError) as fw:
            ctx.send_update_data(FREE)
        assert fw.value.errno == errno.EIO and fw.value.fw_error == SEV_RET_INVALID_GUEST_STATE


def test_blobs_above_the_firmware_maximum_and_the_vm_type_come_first() -> None:
    """sev_receive_update_data copies the header and the packet with psp_copy_user_blob(), which
    refuses one above SEV_FW_BLOB_MAX_SIZE (0x4000) with EINVAL before the firmware runs (no
    firmware status); SEND_START/RECEIVE_START on a VM that is not an SEV guest are ENOTTY
    before their arguments are read ("if (!sev_guest(kvm)) return -ENOTTY;" comes first)."""
    with source("sev") as src, target(src) as dst:
        session = TransportSession.create(9)
        ctx = src.send_start(session)
        rctx = dst.receive_start(session)
        header, packet = ctx.send_update_data(FREE)
        for bad in ((header, packet + bytes(0x4001 - len(packet))), (header + bytes(0x4001 - len(header)), packet)):
            with pytest.raises(KvmIoctlError) as exc:
                rctx.receive_update_data(*bad, FREE)
            assert exc.value.errno == errno.EINVAL and not isinstance(exc.value, SevCommandError)
        rctx.receive_update_data(header, packet, FREE)  # nothing was consumed: the real one still lands
    with testbed.Vm(memory=MEMORY) as plain:
        plain.load("<plain>", text="guest_main:\n    GUEST_DONE\n")
        for start in (send_start, receive_start):
            with pytest.raises(KvmIoctlError) as exc:
                start(plain.machine.kvm_vm, None)  # type: ignore[arg-type]
            assert exc.value.errno == errno.ENOTTY


def test_protected_vcpu_state_moves_only_in_the_vmsa_packet() -> None:
    """SEV-ES: KVM cannot read or write the registers of a launched vCPU (KVM_GET/SET_REGS are
    EINVAL once guest_state_protected), so they travel in the firmware's VMSA packet; the
    target's vCPU is not protected until RECEIVE_UPDATE_VMSA loads it (its registers are the
    VMM's until then); a tampered VMSA packet is BAD_MEASUREMENT, and a page packet offered as
    a VMSA (or the reverse) is refused (INVALID_PARAM)."""
    session = TransportSession.create(8)
    with source("sev-es") as src, target(src) as dst:
        state = src.get_vcpu_state()
        assert state.regs is None and "sev" in state.kvm
        regs_from_elsewhere = dst.machine.cpu.save_state()
        assert dst.get_vcpu_state().regs == regs_from_elsewhere  # not launched: readable
        dst.set_vcpu_state(type(state)(regs_from_elsewhere, state.kvm))  # and writable
        ctx = src.send_start(session)
        rctx = dst.receive_start(session)
        header, packet = ctx.send_vcpu_state()
        bad = bytearray(packet)
        bad[0] ^= 1
        with pytest.raises(SevCommandError) as fw:
            rctx.receive_vcpu_state(header, bytes(bad))
        assert fw.value.fw_error == SEV_RET_BAD_MEASUREMENT
        page = ctx.send_update_data(FREE)
        with pytest.raises(SevCommandError) as fw:
            rctx.receive_vcpu_state(*page)
        assert fw.value.fw_error == SEV_RET_INVALID_PARAM
        with pytest.raises(SevCommandError) as fw:
            rctx.receive_update_data(header, packet, FREE)
        assert fw.value.fw_error == SEV_RET_INVALID_PARAM
        rctx.receive_vcpu_state(header, packet)
        assert dst.machine.cpu.save_state() == src.machine.cpu.save_state()
        assert dst.get_vcpu_state().regs is None  # the guest's now
        with pytest.raises(KvmIoctlError) as exc:
            dst.set_vcpu_state(type(state)(regs_from_elsewhere, state.kvm))
        assert exc.value.errno == errno.EINVAL


def test_send_update_data_length_query_and_buffer_sizes() -> None:
    """hdr_len/trans_len 0 is the length query (EIO, INVALID_LEN, lengths back); bad buffer sizes fail as in sev.c."""
    # sev.c sev_send_update_data: "if (!params.trans_len || !params.hdr_len) return
    # __sev_send_update_data_query_lengths(...)" comes before every other check, and copies the lengths back
    # whatever the firmware answered; QEMU's sev_send_get_packet_len expects SEV_RET_INVALID_LEN. Too small
    # for the packet: EIO/INVALID_LEN, nothing copied back; above KMALLOC_MAX_SIZE: kzalloc fails, ENOMEM.
    with source("sev") as src:
        ctx = src.send_start(TransportSession.create(11))
        for kwargs in ({"hdr_len": 0}, {"trans_len": 0}, {"hdr_len": 0, "trans_len": 0}):
            with pytest.raises(SevCommandError) as query:
                ctx.send_update_data(MEMORY, **kwargs)  # outside RAM: the query comes first
            assert query.value.errno == errno.EIO and query.value.fw_error == SEV_RET_INVALID_LEN
            assert query.value.lengths == (HDR_LEN, 0)
        for kwargs in ({"hdr_len": HDR_LEN - 1}, {"trans_len": 4095}):
            with pytest.raises(SevCommandError) as small:
                ctx.send_update_data(FREE, **kwargs)
            assert small.value.fw_error == SEV_RET_INVALID_LEN and small.value.lengths is None
        with pytest.raises(KvmIoctlError) as big:
            ctx.send_update_data(FREE, trans_len=KMALLOC_MAX_SIZE + 1)
        assert big.value.errno == errno.ENOMEM
        with pytest.raises(KvmIoctlError) as wide:
            ctx.send_update_data(FREE, hdr_len=1 << 32)
        assert wide.value.errno == errno.EINVAL
        header, packet = ctx.send_update_data(FREE, hdr_len=64, trans_len=5000)
        assert len(header) == 64 and header[HDR_LEN:] == bytes(64 - HDR_LEN)
        assert len(packet) == 5000 and packet[4096:] == bytes(5000 - 4096)
        exact = ctx.send_update_data(FREE)
        assert (len(exact[0]), len(exact[1])) == (HDR_LEN, 4096)
        ctx.send_finish()
        with pytest.raises(SevCommandError) as after:
            ctx.send_update_data(FREE, hdr_len=0)
        assert after.value.fw_error == SEV_RET_INVALID_GUEST_STATE and after.value.lengths == (0, 0)


def test_send_cancel_only_between_send_start_and_send_finish() -> None:
    """SEND_CANCEL takes SUPDATE back to RUNNING (SEND_START works again); anywhere else it is INVALID_GUEST_STATE."""
    # amd-memory-encryption.rst, KVM_SEV_SEND_CANCEL: "After completion of SEND_START, but before SEND_FINISH".
    with source("sev") as src:
        fw = src.machine.cpu.sev_firmware()
        ctx = src.send_start(TransportSession.create(12))
        ctx.send_cancel()
        assert fw.state == "RUNNING"
        with pytest.raises(SevCommandError) as twice:
            ctx.send_cancel()
        assert twice.value.fw_error == SEV_RET_INVALID_GUEST_STATE
        again = src.send_start(TransportSession.create(13))
        again.send_update_data(FREE)
        again.send_finish()
        assert fw.state == "SENT"
        with pytest.raises(SevCommandError) as late:
            again.send_cancel()
        assert late.value.errno == errno.EIO and late.value.fw_error == SEV_RET_INVALID_GUEST_STATE
        assert fw.state == "SENT"


def test_vmsa_packet_carries_x87_sse_state_and_xcr0() -> None:
    """SEV-ES: the x87/SSE state and XCR0 set on the source's vCPU arrive on the target's in the VMSA packet."""
    # sev.c sev_es_sync_vmsa copies x87_fcw/fsw/ftw/fop/rip/dp, mxcsr, fpreg_x87, fpreg_xmm and xcr0 into it.
    with source("sev-es") as src, target(src) as dst:
        hw = src.machine.cpu
        st = tuple((0x8000000000000000 | i, 0x3FFF + i) for i in range(8))
        xmm = tuple((0xA5 << 120) | i for i in range(16))
        hw.set_fpu_state((0x027F, 0x3000, 0x0FFF, 0x55, 0x1234, 0x5678, 0x7F80), st, xmm)
        hw.set_xcr0(1)
        session = TransportSession.create(14)
        ctx = src.send_start(session)
        rctx = dst.receive_start(session)
        rctx.receive_vcpu_state(*ctx.send_vcpu_state())
        got = dst.machine.cpu.save_state()
        assert got == hw.save_state()
        assert got.xmm == xmm and got.x87 == st and got.xcr0 == 1
        assert (got.fpu[0], got.fpu[1], got.fpu[6]) == (0x027F, 0x3000, 0x7F80)


def test_rmp_entries_and_page_enc_bitmap_ioctls() -> None:
    """The RMP read gives Assigned/Validated per GFN (None off SNP); KVM_SET_PAGE_ENC_BITMAP loads bits, or fails."""
    # KVM_SET_PAGE_ENC_BITMAP is the seed-era series' (never merged); the RMP read is a testbed extension.
    with source("sev-snp") as snp:
        entries = get_rmp_entries(snp.machine.kvm_vm)
        assert entries is not None and len(entries) == MEMORY >> 12
        assert entries[FREE >> 12] == 3  # the guest's own page: assigned, validated
        with pytest.raises(KvmIoctlError) as exc:
            set_page_enc_bitmap(snp.machine.kvm_vm, 0, 1, b"\x00")
        assert exc.value.errno == errno.ENOTTY
    with testbed.Vm(vm_type="sev", memory=MEMORY, hc_protocol="page-enc-status") as vm:
        vm.load("<page-enc>", text="guest_main:\n    GUEST_DONE\n")
        kvm_vm = vm.machine.kvm_vm
        assert get_rmp_entries(kvm_vm) is None
        set_page_enc_bitmap(kvm_vm, 8, 3, b"\x05")  # 8 and 10 encrypted, 9 not
        assert kvm_vm.get_page_enc_bitmap(8, 3) == b"\x05"
        with pytest.raises(KvmIoctlError) as exc:
            set_page_enc_bitmap(kvm_vm, (MEMORY >> 12) - 1, 2, b"\x00")
        assert exc.value.errno == errno.EINVAL


def test_send_update_data_pins_its_page_for_the_command() -> None:
    """SEND_UPDATE_DATA pins the guest page with sev_pin_memory(kvm, params.guest_uaddr &
    PAGE_MASK, PAGE_SIZE, ...) for the command: it counts in pages_locked against the memlock
    limit (ENOMEM when the registered RAM already fills it) and is unpinned after."""
    with source("sev") as src:
        kvm_vm = src.machine.kvm_vm
        locked = kvm_vm.pages_locked
        ctx = src.send_start(TransportSession.create(3))
        ctx.send_update_data(FREE)
        assert kvm_vm.pages_locked == locked
        kvm_vm.memlock_limit_pages = locked
        with pytest.raises(KvmIoctlError) as info:
            ctx.send_update_data(FREE)
        assert info.value.errno == errno.ENOMEM and kvm_vm.pages_locked == locked
        kvm_vm.memlock_limit_pages = locked + 1
        ctx.send_update_data(FREE)
        assert kvm_vm.pages_locked == locked
