"""The Linux module with the shared frequency page (SPEC §8) through QEMU 11.1: cpuinfo_cur_freq
follows the host with no config read and no config change notification after probe.

Same guest image and /init as tests/test_linux_guest.py (guest-driver-model/linux/build.sh).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import pytest

from .qemu.fixture import QemuLab, _child_setup, qemu_command
from .test_linux_guest import (  # noqa: F401 - guest_image is a fixture
    BOOT_TIMEOUT,
    BUSY_CPU,
    CPU_MODEL,
    HOST_CHANGE,
    VMAP,
    GuestImage,
    expected_policies,
    guest_image,
    parse_policies,
    parse_stats,
)

pytestmark = pytest.mark.qemu


async def test_linux_guest_reads_the_host_frequency_from_the_page(qemu_lab: QemuLab, guest_image: GuestImage) -> None:
    lab = qemu_lab
    install = lab.install
    slot = await lab.add_vm("linux", VMAP, shared_page=True)
    cmd = qemu_command(install.prefix, vu_socket=install.guest_path(lab.socket_path("linux")), smp=len(VMAP))
    cmd += ["-cpu", CPU_MODEL, "-serial", "stdio", "-kernel", guest_image.kernel, "-initrd", guest_image.initrd,
            "-append", f"console=ttyS0 quiet panic=-1 vuc.busy_cpu={BUSY_CPU} vuc.busy_secs=2 vuc.wait_secs=20",
            "-no-reboot"]
    lines: list[str] = []
    mark: dict[str, dict[str, int]] = {}

    def snap() -> dict[str, int]:
        c = slot.counters
        return {"reads": c.get("config_reads"), "notes": c.get("config_notifications"),
                "page_updates": c.get("freq_page_updates"), "mapped": c.get("shmem_mapped")}

    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(BOOT_TIMEOUT):
            while line_b := await proc.stdout.readline():
                line = line_b.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                if line.startswith("VUC: busy-start"):
                    mark["probed"] = snap()
                elif line.startswith("VUC: wait-host-change"):
                    mark["before"] = snap()
                    lab.source.set_frequencies(HOST_CHANGE)
                elif line.startswith("VUC: host-change-seen"):
                    mark["seen"] = snap()
            rc = await proc.wait()
    except TimeoutError:
        pytest.fail(f"guest did not finish within {BOOT_TIMEOUT}s:\n" + "\n".join(lines[-60:]), pytrace=False)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = "\n".join(lines)
    ctx = f"\n--- guest output ({time.monotonic() - t0:.1f}s) ---\n{output}"
    assert rc == 0 and "VUC: done" in output, f"QEMU exited {rc}{ctx}"
    assert re.search(r"virtio_cpufreq virtio\d+: .*, frequency page", output), ctx
    probe, end = parse_stats(lines, "probe"), parse_stats(lines, "end")
    assert probe["page"] == 1, ctx
    # The host change reached cpuinfo_cur_freq through the page ...
    assert "VUC: host-change-seen" in output, ctx
    changed = parse_policies(lines, "changed")
    for n, (cpus, _, _, cur) in expected_policies(slot.device.config).items():
        assert changed[n].hw_cur == cur, ctx
    print(f"\nlinux guest with the page: probe {probe}\n  end {end}\n  back-end {mark}", file=sys.stderr)
    assert end["page_reads"] > 0, end
    # ... with not one config read or config change notification after probe (driver and back-end agree).
    assert end["config_reads"] == probe["config_reads"] and end["config_changes"] == 0, (probe, end)
    assert mark["probed"]["mapped"] == 1 and mark["seen"]["page_updates"] > mark["before"]["page_updates"], mark
    # The first driver instance's own count at its removal: config read at probe only. The back-end
    # saw exactly the reads of both instances (the rebind probes again) and sent no notification.
    removed = re.findall(r"removed after \d+ batches, \d+ records, \d+ notifications, (\d+) config reads", output)
    assert len(removed) == 2 and int(removed[0]) == probe["config_reads"], (removed, probe)
    assert slot.counters.get("config_reads") == sum(int(r) for r in removed), (removed, slot.counters.snapshot())
    assert slot.counters.get("config_notifications") == 0 and mark["seen"]["notes"] == 0, slot.counters.snapshot()
    # Unbind and bind: a device reset with the page mapped, then the page placed again (QEMU lives on).
    assert re.search(r"VUC: bind rc=0 policies=2", output), ctx
    assert parse_stats(lines, "rebound")["page"] == 1 and slot.counters.get("shmem_mapped") == 2, slot.counters.snapshot()
    assert {n: p.hw_cur for n, p in parse_policies(lines, "rebound").items()} == {n: p.hw_cur for n, p in changed.items()}
    assert slot.counters.total("rejected") == 0, slot.counters.snapshot()
