"""The OCI image built from this checkout with Debian's tools (deploy/image/build.sh) runs the service.

Builds the image (the debootstrapped base is cached; the first build takes a few
minutes), unpacks it with umoci as a runtime would, and runs its entrypoint's
``check`` in it, with the host's /proc and /sys as a pod has them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from vhost_user_cpufreq.backend.service.check import run_checks

from .helpers import unavailable

pytestmark = pytest.mark.root
BUILD = Path(__file__).resolve().parent.parent / "deploy" / "image" / "build.sh"


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Path, str]]:
    if os.geteuid() != 0:
        unavailable("VUC_REQUIRE_ROOT", "building the image needs root (debootstrap, chroot)")
    for tool in ("debootstrap", "umoci", "unshare"):
        if shutil.which(tool) is None:
            unavailable("VUC_REQUIRE_TOOLS", f"needs {tool} (apt-get install debootstrap umoci util-linux)")
    d = Path(tempfile.mkdtemp(prefix="vuc-image-"))
    try:
        r = subprocess.run([str(BUILD), str(d / "oci")], capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, r.stderr[-4000:]
        ref = r.stdout.strip().splitlines()[-1]
        yield d, ref
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_image_runs_check_with_the_c_data_plane(image: tuple[Path, str]) -> None:
    d, ref = image
    assert ref == f"{d / 'oci'}:0.1.0"
    bundle = d / "bundle"
    subprocess.run(["umoci", "unpack", "--image", ref, str(bundle)], check=True, capture_output=True, timeout=300)
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["vhost-user-cpufreq", "check"]  # entrypoint + default command
    root = bundle / "rootfs"
    # What the image runs is the package installed in it, not this checkout.
    assert (root / "opt/vuc/bin/vhost-user-cpufreq").exists() and not (root / "work").exists()
    script = (f"mount --rbind /sys {root}/sys && mount -t proc proc {root}/proc && "
              f"exec chroot {root} env PATH={dict(e.split('=', 1) for e in config['process']['env'])['PATH']} "
              f"{' '.join(config['process']['args'])} --json")
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr  # 1: serving would be degraded on this host, said per finding
    found = {f["name"]: f for f in json.loads(r.stdout)}
    # The same probes as the checkout's own check, and the C data plane loads inside the image.
    assert set(found) == {f.name for f in run_checks("/sys", None)}
    assert found["dataplane"]["state"] == "ok", found["dataplane"]
    assert found["permissions"]["state"] == "ok"
