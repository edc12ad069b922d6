"""The command line as a new user meets it: help on every option, quiet `check`, no silent defaults."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vhost_user_cpufreq.backend.service import check
from vhost_user_cpufreq.backend.service.cli import _config_from_args, build_parser

SCRIPT = Path(sys.executable).with_name("vhost-user-cpufreq")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_option_of_every_command_says_what_it_does() -> None:
    subs = _subparsers(build_parser())
    assert set(subs) == {"demo", "serve", "check", "status", "simulate", "vm"}
    subs |= {f"vm {op}": p for op, p in _subparsers(subs["vm"]).items()}
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
            text = sub.format_help()
            if action.default not in (None, False):
                # The default is on the screen, next to the option.
                # (compared without whitespace: argparse wraps long paths at their hyphens)
                assert f"default:{action.default}" in "".join(text.split()), (name, action.dest)


def test_serve_without_vcpus_says_it_describes_one(caplog: pytest.LogCaptureFixture) -> None:
    args = build_parser().parse_args(["serve", "--socket-path", "/tmp/never.sock"])
    with caplog.at_level(logging.WARNING):
        cfg = _config_from_args(args)
    assert cfg.vms["vm0"].vcpus == 1
    assert any("no --vcpus given" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    args = build_parser().parse_args(["serve", "--socket-path", "/tmp/never.sock", "--vcpus", "4"])
    with caplog.at_level(logging.WARNING):
        assert _config_from_args(args).vms["vm0"].vcpus == 4
    assert not caplog.records


def test_check_json_is_the_only_output() -> None:
    r = subprocess.run([str(SCRIPT), "check", "--json"], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode in (0, 1), r.stderr
    findings = json.loads(r.stdout)
    assert {f["name"] for f in findings} >= {"cpufreq", "dataplane", "uclamp", "qemu"}
    # The probes' own warnings would repeat the table on stderr.
    assert r.stderr == "", r.stderr


def test_check_names_vuc_qemu_when_it_is_what_it_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VUC_QEMU", str(fake))
    f = check._qemu()
    assert f.state == "ok" and f"VUC_QEMU={fake}" in f.detail and "11.1.3" in f.detail, f
    monkeypatch.delenv("VUC_QEMU")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    f = check._qemu()
    assert f.state == "info" and "VUC_QEMU is not set" in f.detail, f
    monkeypatch.setenv("VUC_QEMU", str(tmp_path / "missing"))
    f = check._qemu()
    assert f.state == "info" and f.detail.startswith(f"VUC_QEMU={tmp_path / 'missing'}:"), f
    assert os.environ["PATH"] == str(tmp_path / "empty")


async def test_the_readmes_one_vm_serve_line_serves_four_vcpus_on_this_machine(tmp_path: Path) -> None:
    """README's `serve --socket-path ... --vcpus 4`, run as written (the socket moved into a temporary
    directory, a control socket added to ask it): a 4-vCPU guest is served on whatever this machine
    has, unpinned and said so where 4 vCPUs do not fit one to a CPU (CI's 2-CPU machines)."""
    import re

    from vhost_user_cpufreq.backend.service.daemon import query_status

    from .helpers import short_tmpdir, start_guest, stop_process, until

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"^vhost-user-cpufreq (serve --socket-path (\S+) --vcpus 4)\b", readme, re.M)
    assert m, "README no longer gives the one-VM serve line"
    with short_tmpdir("vuc-readme-") as d:
        args = m.group(1).replace(m.group(2), str(d / "vm0.sock")).split()
        log = tmp_path / "serve.log"
        proc = subprocess.Popen([str(SCRIPT), *args, "--control-socket", str(d / "control.sock")],
                                stderr=open(log, "wb"))
        try:
            await until(lambda: (d / "control.sock").exists() or proc.poll() is not None, 30, "the service's start")
            assert proc.poll() is None, log.read_text()
            g = await start_guest(str(d / "vm0.sock"))
            try:
                assert g.driver.config.num_vcpus == 4
                for v in range(4):
                    g.driver.set_util(v, 100 + 200 * v)
                g.driver.flush()

                def served() -> bool:
                    vm = query_status(str(d / "control.sock"))["vms"]["vm0"]
                    return vm["connected"] and [c["util"] for c in vm["vcpus"]] == [100, 300, 500, 700]
                await until(served, 10, "the guest's records in status")
                vm = query_status(str(d / "control.sock"))["vms"]["vm0"]
            finally:
                await g.close()
        finally:
            stop_process(proc)
        text = log.read_text()
    assert proc.returncode == 0, text
    online = len(os.sched_getaffinity(0))
    if online < 4:
        assert vm["pinning"]["mode"] == "none" and "does not fit" in vm["pinning"]["note"], vm["pinning"]
        assert "served unpinned" in text, text
    else:
        assert vm["pinning"]["mode"] == "auto", vm["pinning"]
