#!/bin/sh
# Run inside the test host: the service on its one shared socket for libvirt's domains, set up as
# README ("Attach QEMU", libvirt) tells an administrator: the shipped units, QEMU's user in the
# service's group, the hook (deploy/libvirt/qemu-hook) tying each domain's name to its machine scope,
# and a configuration with classes only (no VM named) that admits registered VMs only.
# Leftovers of an earlier run in this (persistent) root are cleared first.
set -eu
SRC=/opt/vuc-src
test -x /usr/sbin/libvirtd || { echo "no libvirt in the test host's root (.ci/provision-testhost.sh)" >&2; exit 3; }
for d in $(virsh list --all --name); do
    virsh destroy "$d" >/dev/null 2>&1 || true
    virsh undefine "$d" >/dev/null
done
systemctl stop vhost-user-cpufreq.service 2>/dev/null || true
# The shipped unit keeps sockets and sessions in systemd's fd store across a stop (an earlier test's VMs).
systemctl clean --what=fdstore vhost-user-cpufreq.service 2>/dev/null || true
rm -rf /var/lib/vhost-user-cpufreq
sh "$SRC/tests/testhost/units.sh"
rm -f /etc/systemd/system/vhost-user-cpufreq.service.d/test-watchdog.conf
cat >/etc/vhost-user-cpufreq/config.toml <<CONF
[service]
control_socket = "/run/vhost-user-cpufreq/control.sock"
state_file = "/run/vhost-user-cpufreq/state.json"
shared_socket = "/run/vhost-user-cpufreq/vhost.sock"
shared_socket_mode = 0o660
state_dir = "/var/lib/vhost-user-cpufreq"
admit = "registered"
allowed_uids = [$(id -u libvirt-qemu)]

[class.pinned]
match_name = "lv-pinned-*"
match_cgroup = "/machine.slice/machine-qemu*"
pinning = "auto"

[class.libvirt]
match_cgroup = "/machine.slice/machine-qemu*"
pinning = "keep"
CONF
usermod -aG vhost-user-cpufreq libvirt-qemu
install -D -m 0755 "$SRC/deploy/libvirt/qemu-hook" /etc/libvirt/hooks/qemu.d/vhost-user-cpufreq
systemctl daemon-reload
# libvirtd reads the hooks and QEMU's user's groups when it starts.
systemctl restart libvirtd.service
systemctl start vhost-user-cpufreq.service
