# cli_assert.s - a guest whose GUEST_ASSERT_EQ fails: `testbed run` must exit with status 1.
#
# Scenario (host half: tests/test_cli.py): sync 0x5a, then assert RAX (0x1234) equals 0x4321.
# The abort ucall must name this file and the line of the GUEST_ASSERT_EQ below.

guest_main:
    GUEST_SYNC 0x5a
    mov rax, 0x1234
    GUEST_ASSERT_EQ rax, 0x4321        # cli_assert: the failing assert
    GUEST_SYNC 0xbad
    ret
