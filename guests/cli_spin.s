# cli_spin.s - a guest that never finishes: `testbed run --timeout` must end it with status 3.

guest_main:
    GUEST_SYNC 1
guest_spin:
    jmp guest_spin
