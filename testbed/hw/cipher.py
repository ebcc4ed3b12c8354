"""The memory controller's cipher: AES-XTS with a per-VM key, tweaked by the physical address.

SEV encrypts each 16-byte block with a key the host never sees and a tweak derived from the
system physical address, so equal plaintext at two addresses (or in two VMs) gives different
ciphertext. AES-256-XTS over a 4 KiB frame with the frame's physical address as tweak has the
same observable properties; it is not AMD's exact construction (which is undocumented).
"""

from __future__ import annotations

import random

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

XTS_KEY_BYTES = 64  # AES-256-XTS: two 256-bit keys


class FrameCipher:
    """Encrypts and decrypts whole 4 KiB frames for one VM."""

    def __init__(self, key: bytes) -> None:
        if len(key) != XTS_KEY_BYTES or key[:32] == key[32:]:
            raise ValueError("AES-XTS needs 64 key bytes whose two halves differ")
        self._algorithm = algorithms.AES(key)

    @classmethod
    def from_seed(cls, seed: int | None) -> FrameCipher:
        """A key from `seed` (reproducible runs) or from the OS's randomness (seed None)."""
        if seed is None:
            import os

            key = os.urandom(XTS_KEY_BYTES)
            while key[:32] == key[32:]:  # pragma: no cover - astronomically unlikely
                key = os.urandom(XTS_KEY_BYTES)
        else:
            rng = random.Random(seed)
            key = rng.randbytes(XTS_KEY_BYTES)
        return cls(key)

    @staticmethod
    def _tweak(pa: int) -> bytes:
        return pa.to_bytes(16, "little")

    def encrypt(self, pa: int, plaintext: bytes | memoryview) -> bytes:
        """Ciphertext of the frame at physical address `pa`."""
        enc = Cipher(self._algorithm, modes.XTS(self._tweak(pa))).encryptor()
        return enc.update(plaintext) + enc.finalize()

    def decrypt(self, pa: int, ciphertext: bytes | memoryview) -> bytes:
        """Plaintext the CPU sees when it reads the frame at `pa` through a C=1 mapping."""
        dec = Cipher(self._algorithm, modes.XTS(self._tweak(pa))).decryptor()
        return dec.update(ciphertext) + dec.finalize()
