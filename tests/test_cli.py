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
