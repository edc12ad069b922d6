#!/bin/sh
# Run inside the test host: install the shipped systemd units as a package would, with a
# configuration serving one VM, and a watchdog short enough to see it fire in a test.
set -eu
SRC=/opt/vuc-src
ln -sf /opt/vuc/bin/vhost-user-cpufreq /usr/bin/vhost-user-cpufreq
install -m 0644 "$SRC/deploy/systemd/vhost-user-cpufreq.service" "$SRC/deploy/systemd/vhost-user-cpufreq@.socket" \
    /etc/systemd/system/
mkdir -p /etc/vhost-user-cpufreq /etc/systemd/system/vhost-user-cpufreq.service.d
cat >/etc/vhost-user-cpufreq/config.toml <<CONF
[service]
control_socket = "/run/vhost-user-cpufreq/control.sock"
state_file = "/run/vhost-user-cpufreq/state.json"

[vm.vm0]
socket = "/run/vhost-user-cpufreq/vm0.sock"
vcpus = 2
pinning = [0, 1]
clamp = "thread"
socket_mode = 0o660
CONF
printf '[Service]\nWatchdogSec=6\n' >/etc/systemd/system/vhost-user-cpufreq.service.d/test-watchdog.conf
systemctl daemon-reload
