#!/usr/bin/env bash
# Provision the Linux test host (tests/testhost/): a Debian trixie root file
# system that QEMU boots with the trixie-backports kernel over virtiofs, with
# systemd as PID 1.
#
#   * the root file system, debootstrapped inside the QEMU chroot at
#     /var/cache/vuc-testhost/root (so the chroot's virtiofsd can serve it):
#     systemd, udev, Python 3 with this project's Debian-packaged
#     dependencies, gcc for the C data plane, and a venv at /opt/vuc (system
#     site packages, plus qemu.qmp from PyPI) that the fixture installs the
#     project into before each boot;
#   * virtiofsd in the QEMU chroot;
#   * a user and group vhost-user-cpufreq, as the shipped unit expects; no
#     getty on tty1, a root login on the serial console for humans;
#   * a layer on top (its own marker, $ROOT/.vuc-testhost-libvirt, so that a
#     root built without it is extended, not rebuilt): libvirt and QEMU from
#     trixie-backports (libvirt 12, QEMU >= 10.2, the first with
#     vhost-user-test-device-pci; trixie's own QEMU 10.0 lacks it) and
#     systemd-machined, for the libvirt test in tests/test_testhost.py.
#
# Idempotent and cached like the QEMU chroot: a finished run writes
# $ROOT/.vuc-testhost (a version stamp of this script); a re-run with the
# marker returns at once.  Concurrent runs are serialised with flock.
# Progress goes to stderr; the LAST stdout line is the root's path as QEMU
# (in the chroot) sees it.
#
# Environment:
#   VUC_QEMU_CHROOT    the QEMU chroot (default /var/cache/vhost-user-cpufreq/trixie)
#   VUC_DEBIAN_MIRROR  Debian mirror (default: as provision-qemu.sh chose)
# Needs root.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CHROOT="${VUC_QEMU_CHROOT:-/var/cache/vhost-user-cpufreq/trixie}"
ROOT_GUEST=/var/cache/vuc-testhost/root  # as the chroot sees it
ROOT="$CHROOT$ROOT_GUEST"
# Bump when the package list or the set-up below changes: old roots are rebuilt.
STAMP="testhost-7"
# The libvirt layer's version: bump when its packages or set-up change.
LIBVIRT_STAMP="libvirt-3"
LIBVIRT_PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 systemd-container)
# debootstrap takes the base; apt, which resolves virtual packages (python3-ply-lex-3.10), the rest.
BASE=systemd,systemd-sysv,udev,dbus,python3,python3-venv,util-linux,procps,kmod,iproute2,libcap2-bin
PACKAGES=(python3-cffi python3-pyudev python3-prometheus-client gcc libc6-dev
          python3-pytest python3-pytest-asyncio python3-hypothesis python3-yaml)

log() { printf '[provision-testhost] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ready() { [ "$(cat "$ROOT/.vuc-testhost" 2>/dev/null)" = "$STAMP" ] && [ -x "$CHROOT/usr/libexec/virtiofsd" ]; }
libvirt_ready() { [ "$(cat "$ROOT/.vuc-testhost-libvirt" 2>/dev/null)" = "$LIBVIRT_STAMP" ]; }

# The libvirt layer, added to a finished root in place.  Under the test hosts' boot lock
# (tests/testhost/host.py): no test host runs on the root while its packages change.
add_libvirt() {
    libvirt_ready && return 0
    [ "$(id -u)" -eq 0 ] || die "adding libvirt to the test host's root needs root"
    exec 8>"$(dirname "$ROOT")/.boot.lock"
    log "waiting for the boot lock"
    flock 8
    if libvirt_ready; then exec 8>&-; return 0; fi
    local t0 m
    t0=$(date +%s)
    m="${VUC_DEBIAN_MIRROR:-}"
    [ -n "$m" ] || m="$(grep -ho 'https\?://[^ ]*' "$ROOT"/etc/apt/sources.list "$ROOT"/etc/apt/sources.list.d/* \
                        2>/dev/null | head -n1 || true)"
    m="${m:-http://deb.debian.org/debian}"
    echo "deb $m trixie-backports main" >"$ROOT/etc/apt/sources.list.d/trixie-backports.list"
    # Nothing starts in the chroot (the packages' postinst would try libvirtd, virtlogd...).
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
    local r=(chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C)
    log "installing ${LIBVIRT_PACKAGES[*]} from trixie-backports"
    "${r[@]}" apt-get update -q >&2
    "${r[@]}" apt-get install -y -q --no-install-recommends -t trixie-backports "${LIBVIRT_PACKAGES[@]}" >&2
    "${r[@]}" apt-get clean >&2
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT/usr/sbin/policy-rc.d"
    # The test domains have no network: no default network (a bridge, dnsmasq, firewall rules) at
    # every boot, and no libvirt-guests suspending domains at every poweroff.
    rm -f "$ROOT"/etc/libvirt/qemu/networks/autostart/*.xml
    "${r[@]}" systemctl mask libvirt-guests.service >&2
    # The root is a virtiofs share whose server may not set trusted.* xattrs, where libvirt remembers
    # the owners of the files it hands QEMU: it does without.
    grep -q '^remember_owner = 0' "$ROOT/etc/libvirt/qemu.conf" || echo 'remember_owner = 0' >>"$ROOT/etc/libvirt/qemu.conf"
    "${r[@]}" qemu-system-x86_64 -device help 2>/dev/null | grep -q vhost-user-test-device \
        || die "the test host's QEMU lacks vhost-user-test-device-pci"
    echo "$LIBVIRT_STAMP" >"$ROOT/.vuc-testhost-libvirt"
    log "libvirt layer ready in $(( $(date +%s) - t0 ))s"
    exec 8>&-
}

if ready; then
    add_libvirt
    log "reusing $ROOT"
    echo "$ROOT_GUEST"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "building the test host's root file system needs root"

if [ ! -f "$CHROOT/.vuc-qemu-version" ]; then
    log "no QEMU chroot at $CHROOT: running provision-qemu.sh"
    VUC_QEMU_CHROOT="$CHROOT" bash "$HERE/provision-qemu.sh" >/dev/null
fi
[ -f "$CHROOT/.vuc-qemu-version" ] || die "no QEMU chroot at $CHROOT (provision-qemu.sh found a host QEMU?)"

mkdir -p "$(dirname "$ROOT")"
exec 9>"$(dirname "$ROOT")/.lock"
log "waiting for lock"
flock 9
if ready; then
    add_libvirt
    log "another run finished meanwhile"
    echo "$ROOT_GUEST"
    exit 0
fi
start=$(date +%s)

in_chroot() { chroot "$CHROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
if [ ! -x "$CHROOT/usr/libexec/virtiofsd" ]; then
    log "installing virtiofsd in the QEMU chroot"
    in_chroot apt-get update -q >&2
    in_chroot apt-get install -y -q --no-install-recommends virtiofsd >&2
    in_chroot apt-get clean >&2
fi

mirror="${VUC_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(grep -ho 'https\?://[^ ]*' "$CHROOT"/etc/apt/sources.list "$CHROOT"/etc/apt/sources.list.d/* 2>/dev/null \
              | head -n1)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

building="$ROOT.building.$$"
rm -rf "$ROOT".building.*
log "debootstrap trixie ($mirror) into $building"
debootstrap --variant=minbase --include="$BASE" trixie "$building" "$mirror" >&2 \
    || die "debootstrap failed (see $building/debootstrap/debootstrap.log)"

in_root() { chroot "$building" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
log "installing ${PACKAGES[*]}"
in_root apt-get update -q >&2
in_root apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2
log "venv /opt/vuc (qemu.qmp from PyPI, fetched by this machine's pip and its certificates)"
in_root python3 -m venv --system-site-packages /opt/vuc >&2
mkdir -p "$building/tmp/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$building/tmp/wheels" qemu.qmp >&2 \
    || die "cannot download qemu.qmp from PyPI"
in_root sh -c '/opt/vuc/bin/pip install -q --no-index --no-deps --disable-pip-version-check /tmp/wheels/*.whl' >&2
rm -rf "$building/tmp/wheels"
in_root groupadd --system vhost-user-cpufreq
in_root useradd --system --gid vhost-user-cpufreq --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin vhost-user-cpufreq
echo testhost >"$building/etc/hostname"
# Root's password is empty: a login on the serial console, for a person debugging a boot.
in_root passwd -d root >&2
# The tests talk to the agent; nothing waits for a network or a terminal.
in_root systemctl mask getty@tty1.service systemd-networkd-wait-online.service \
    systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer man-db.timer dpkg-db-backup.timer >&2 2>/dev/null || true
# What a first boot would do under TCG for a minute and more, done once here: hwdb and the
# journal catalog built, a machine id, /etc and /var marked up to date (ConditionNeedsUpdate).
in_root systemd-hwdb update >&2
in_root journalctl --update-catalog >&2
in_root systemd-machine-id-setup >&2
touch "$building/etc/.updated" "$building/var/.updated"
# The cpu controller enabled below the root, as a host running libvirt has it (machine.slice):
# cgroups then carry cpu.uclamp.min/max.
mkdir -p "$building/etc/systemd/system/system.slice.d"
printf '[Slice]\nCPUWeight=100\n' >"$building/etc/systemd/system/system.slice.d/vuc-cpu.conf"
in_root apt-get clean >&2
rm -rf "$building"/var/lib/apt/lists/*
echo "$STAMP" >"$building/.vuc-testhost"

rm -rf "$ROOT.old"
[ -d "$ROOT" ] && mv "$ROOT" "$ROOT.old"
mv "$building" "$ROOT"
rm -rf "$ROOT.old"
add_libvirt
log "test host root ready in $(( $(date +%s) - start ))s ($(du -sh --one-file-system "$ROOT" | cut -f1))"
echo "$ROOT_GUEST"
