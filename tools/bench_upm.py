"""Pinned memory, legacy vs UPM: peak pinned pages and the testbed's own RSS growth.

For each guest size (1 GiB, 64 GiB) and seed workload (testbed/workloads.py: `boot`,
`dma_churn`), a generated guest touches a few percent of its memory privately (guest_memset
over 2 MiB chunks spread evenly over the RAM above 32 MiB that no conversion of either
workload touches: the "working set", the same for both and private to the end) and then
performs the workload's conversions with set_memory_shared / set_memory_private, writing one
byte to the first page of each range it made shared (a device's DMA into it; the rest of a
shared range is never written, so it costs the VMM nothing). Each (VM type, size, workload)
runs in a fresh process so RSS growth is its own: `sev` (legacy: KVM_MEMORY_ENCRYPT_REG_REGION
pins all RAM at launch) against `sev-snp` (guest_memfd: pinned on the first private fault,
released on conversion).

    python tools/bench_upm.py [--quick] [--json]
    python tools/bench_upm.py --write-guest 1G dma_churn FILE.s [--churn 300]   # the guest alone
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

GIB = 1 << 30
SIZES = {"1G": GIB, "64G": 64 * GIB}
TYPES = ("sev", "sev-snp")
WORKLOADS = ("boot", "dma_churn")
CHUNK = 2 << 20


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


#: the working set's chunks start above this (below: the runtime, its tables and the image)
TOUCH_BASE = 32 << 20


def working_set(size: int, touch_percent: float, convs: list[tuple[int, int, bool]]) -> list[int]:
    """The GPAs of the working set's 2 MiB chunks: `touch_percent` of RAM, spread evenly over the
    chunk-aligned slots above TOUCH_BASE that none of `convs` overlaps (a chunk inside a range
    the workload converts would leave the working set, and one sharing a 2 MiB accept unit
    with such a range would be accepted by the conversion, not by the touch)."""
    nchunks = max(1, int(size * touch_percent / 100) // CHUNK)
    taken = {chunk for gfn, n, _shared in convs
             for chunk in range((gfn << 12) // CHUNK, (((gfn + n) << 12) - 1) // CHUNK + 1)}
    free = [gpa for gpa in range(TOUCH_BASE, size - CHUNK + 1, CHUNK) if gpa // CHUNK not in taken]
    if nchunks > len(free):
        raise SystemExit(f"--touch-percent {touch_percent}: {nchunks} chunks of 2 MiB, only {len(free)} free")
    return [free[i * len(free) // nchunks] for i in range(nchunks)]


def _guest(size: int, workload: str, touch_percent: float, churn: int, free_gpa: int) -> str:
    from testbed import workloads

    pages = size >> 12

    def conversions(name: str) -> list[tuple[int, int, bool]]:
        extra = {"conversions": churn} if name == "dma_churn" else {}
        return [(gfn, n, shared) for gfn, n, shared in workloads.make_workload(name, pages, seed=1, **extra)
                if gfn << 12 >= free_gpa + (1 << 20)]

    convs = conversions(workload)
    # dma_churn's ranges hold boot's: the same working set for both workloads
    touch = working_set(size, touch_percent, conversions("dma_churn"))
    lines = ["guest_main:", "    lea r12, [rip + touch_table]", f"    mov r13, {len(touch)}", "1:",
             "    mov rdi, [r12]", "    mov rsi, 0x5a", f"    mov rdx, {CHUNK}", "    call guest_memset",
             "    add r12, 8", "    dec r13", "    jnz 1b", "    GUEST_SYNC 1",
             "    lea r12, [rip + conv_table]", f"    mov r13, {len(convs)}", "    test r13, r13", "    jz 3f", "2:",
             "    mov rdi, [r12]", "    mov rsi, [r12 + 8]", "    cmp qword ptr [r12 + 16], 0", "    je 4f",
             "    call set_memory_shared", "    GUEST_ASSERT_EQ rax, 0",
             "    mov rdi, [r12]", "    mov byte ptr [rdi], 0xd3", "    jmp 5f",
             "4:", "    call set_memory_private", "    GUEST_ASSERT_EQ rax, 0",
             "5:", "    add r12, 24", "    dec r13", "    jnz 2b", "3:", "    GUEST_SYNC 2", "    ret",
             ".align 8", "touch_table:"]
    lines += [f"    .quad {gpa}" for gpa in touch]
    lines += ["conv_table:"]
    lines += [f"    .quad {gfn << 12}, {n}, {1 if shared else 0}" for gfn, n, shared in convs]
    return "\n".join(lines) + "\n"


def one(vm_type: str, size_name: str, workload: str, touch_percent: float, churn: int) -> dict[str, Any]:
    """One run in this process: the report's memory figures and the RSS growth."""
    import testbed
    from testbed.layout import Layout

    size = SIZES[size_name]
    text = _guest(size, workload, touch_percent, churn, Layout(size).free_gpa)
    rss0 = _rss_kib()
    start = time.perf_counter()
    with testbed.Vm(vm_type=vm_type, memory=size, timeout=600) as vm:
        vcpu = vm.load("bench_upm.s", text=text)
        syncs = 0
        while True:
            uc = vcpu.run_to_ucall()
            if uc.cmd == "done":
                break
            syncs += 1
        memory = vm.memory_report()
        assert memory is not None
        rss1 = _rss_kib()
    return {"vm_type": vm_type, "size": size_name, "workload": workload, "syncs": syncs,
            "pinned_peak_mib": memory["pinned_peak_pages"] * 4096 / (1 << 20),
            "pinned_final_mib": memory["pinned_final_pages"] * 4096 / (1 << 20),
            "shared_peak_mib": memory["shared_peak_pages"] * 4096 / (1 << 20),
            "rss_growth_mib": (rss1 - rss0) / 1024, "wall_s": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 GiB only, fewer churn conversions")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--touch-percent", type=float, default=2.0)
    parser.add_argument("--churn", type=int, default=2000, help="dma_churn conversions after boot")
    parser.add_argument("--one", nargs=3, metavar=("VM_TYPE", "SIZE", "WORKLOAD"), help=argparse.SUPPRESS)
    parser.add_argument("--write-guest", nargs=3, metavar=("SIZE", "WORKLOAD", "FILE"),
                        help="write the guest for SIZE (1G, 64G) and WORKLOAD to FILE and stop (for "
                             "`testbed run FILE --memory SIZE --vm-type sev --plot-memory PNG`)")
    args = parser.parse_args(argv)
    if args.write_guest:
        from testbed.layout import Layout

        size_name, workload_name, path = args.write_guest
        guest_size = SIZES[size_name]
        with open(path, "w") as guest_file:
            guest_file.write(_guest(guest_size, workload_name, args.touch_percent, args.churn,
                                    Layout(guest_size).free_gpa))
        return 0
    if args.one:
        print(json.dumps(one(*args.one, args.touch_percent, args.churn)))
        return 0
    sizes = ["1G"] if args.quick else list(SIZES)
    churn = 200 if args.quick else args.churn
    rows = []
    for size in sizes:
        for workload in WORKLOADS:
            for vm_type in TYPES:
                cmd = [sys.executable, __file__, "--one", vm_type, size, workload,
                       "--touch-percent", str(args.touch_percent), "--churn", str(churn)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr)
                    return 1
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'size':>5} {'workload':>10} {'vm type':>8} {'pinned peak':>12} {'pinned final':>13} "
          f"{'shared peak':>12} {'RSS growth':>11} {'wall':>7}")
    for r in rows:
        print(f"{r['size']:>5} {r['workload']:>10} {r['vm_type']:>8} {r['pinned_peak_mib']:>9.1f} MiB "
              f"{r['pinned_final_mib']:>9.1f} MiB {r['shared_peak_mib']:>8.1f} MiB {r['rss_growth_mib']:>7.1f} MiB "
              f"{r['wall_s']:>6.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
