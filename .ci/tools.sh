#!/usr/bin/env bash
# Install the tools the metrics tests demand under VUC_REQUIRE_TOOLS=1:
# promtool and the prometheus server, from Debian's `prometheus` package.
# Run as root; idempotent (does nothing when both binaries are there).
#
# The package's postinst starts the service through invoke-rc.d when no
# systemd runs (CI containers): a stray server on :9090, and a failed start
# fails the install.  A temporary policy-rc.d that denies every start (exit
# 101, see /usr/share/doc/init-system-helpers/README.policy-rc.d) prevents
# both; an existing policy-rc.d is left alone.
set -euo pipefail

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "tools.sh: promtool/prometheus missing and not root: cannot apt-get install prometheus" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
ours=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    ours=1
fi
cleanup() { if [ -n "$ours" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
promtool --version 2>&1 | head -n 1
