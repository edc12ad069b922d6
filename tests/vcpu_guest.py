"""A VM in a process of its own, for tests: QEMU-named vCPU threads and a modelled guest on one socket.

``python -m tests.vcpu_guest SOCKET VCPUS [CPULIST]`` starts VCPUS threads named
as QEMU names its vCPU threads ("CPU i/KVM"), sets their affinity to CPULIST
first when given (as libvirt's ``<vcpupin>`` would), connects a modelled guest
to SOCKET, prints one JSON line ``{"tids": [...]}``, then reports a utilisation
for every vCPU every 20 ms until stdin closes.  Each test VM is then its own
SO_PEERCRED peer with its own threads, as each QEMU is.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from vhost_user_cpufreq.guest.frontend import connect_guest

from tests.helpers import named_vcpu_threads


async def _main(sock: str, vcpus: int, cpus: set[int] | None) -> None:
    with named_vcpu_threads(vcpus) as tids:
        if cpus is not None:
            for tid in tids:
                os.sched_setaffinity(tid, cpus)
        await _serve(sock, vcpus, tids)


async def _serve(sock: str, vcpus: int, tids: list[int]) -> None:
    guest = await connect_guest(sock, lazy_records=0)
    print(json.dumps({"tids": tids}), flush=True)
    loop = asyncio.get_running_loop()
    closed = loop.run_in_executor(None, sys.stdin.read)  # the test closes stdin to stop us
    step = 0
    while not closed.done():
        for v in range(vcpus):
            guest.driver.set_util(v, 200 + 100 * ((v + step) % 7))
        guest.driver.flush()
        step += 1
        await asyncio.sleep(0.02)
    await guest.close()


if __name__ == "__main__":
    cpulist = {int(c) for c in sys.argv[3].split(",")} if len(sys.argv) > 3 else None
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), cpulist))
