"""The Keystone worker: the one place Keystone is imported, run as its own process by engine.py.

Reads requests (base: u64, length: u32, text) on stdin and answers (length: u32, status byte,
payload) on a private copy of stdout: status 0 and the encoding, or 1 and Keystone's error
text. fd 1 itself goes to /dev/null so that nothing Keystone prints can corrupt replies. It
is run as a script (not `-m`), so it imports nothing of testbed; a hang or crash here is the
worker's, never the testbed's (engine.py turns it into a located error).
"""

import os
import struct
import sys

from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError


def main() -> None:
    """Serve requests until stdin closes."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    requests = sys.stdin.buffer
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    replies.write(b"R")
    replies.flush()
    while True:
        header = requests.read(12)
        if len(header) < 12:
            break
        base, size = struct.unpack("<QI", header)
        text = requests.read(size)
        try:
            encoding, _count = ks.asm(text, base, as_bytes=True)
            reply = b"\0" + (encoding or b"")
        except KsError as e:
            reply = b"\1" + str(e).encode()
        replies.write(struct.pack("<I", len(reply)) + reply)
        replies.flush()


if __name__ == "__main__":
    main()
