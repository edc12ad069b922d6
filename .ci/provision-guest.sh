#!/usr/bin/env bash
# Provision what the Linux guest test (tests/test_linux_guest.py) needs, in
# the QEMU chroot that .ci/provision-qemu.sh makes:
#
#   * a Linux kernel from trixie-backports (only the vmlinuz package
#     linux-binary-KVER: no initramfs generator, no systemd, no modules
#     tree; the guest needs nothing but built-in drivers and our module),
#   * its headers and the toolchain to build an out-of-tree module
#     (linux-headers-amd64, gcc, make), and busybox-static + cpio for the
#     initramfs.
#
# All from trixie-backports (-t trixie-backports), because the chroot's QEMU
# comes from there and mixing suites makes its libraries conflict.
#
# Idempotent: a finished run writes $CHROOT/.vuc-guest-kernel (the kernel
# version); a re-run with the marker and the files in place returns at once.
# Concurrent runs are serialised with flock.  Progress goes to stderr; the
# LAST stdout line is the kernel version (e.g. 7.3.4+deb13-amd64).  The
# kernel is then $CHROOT/usr/lib/modules/KVER/vmlinuz and the headers are
# $CHROOT/usr/src/linux-headers-KVER.
#
# Environment:
#   VUC_QEMU_CHROOT  the chroot (default /var/cache/vhost-user-cpufreq/trixie);
#                    made with .ci/provision-qemu.sh when it does not exist
# Needs root.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CHROOT="${VUC_QEMU_CHROOT:-/var/cache/vhost-user-cpufreq/trixie}"
MARKER="$CHROOT/.vuc-guest-kernel"
PACKAGES=(linux-headers-amd64 busybox-static gcc make cpio kmod libc6-dev)

log() { printf '[provision-guest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ready() {
    [ -f "$MARKER" ] || return 1
    local kver
    kver="$(cat "$MARKER")"
    [ -f "$CHROOT/usr/lib/modules/$kver/vmlinuz" ] \
        && [ -f "$CHROOT/usr/src/linux-headers-$kver/Makefile" ] \
        && [ -x "$CHROOT/usr/bin/gcc" ] && [ -x "$CHROOT/usr/bin/busybox" ] \
        && [ -x "$CHROOT/usr/bin/cpio" ] && [ -x "$CHROOT/usr/bin/make" ]
}

if ready; then
    log "reusing kernel $(cat "$MARKER") in $CHROOT"
    cat "$MARKER"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "installing into the chroot needs root"

if [ ! -f "$CHROOT/.vuc-qemu-version" ]; then
    log "no QEMU chroot at $CHROOT: running provision-qemu.sh"
    VUC_QEMU_CHROOT="$CHROOT" bash "$HERE/provision-qemu.sh" >/dev/null
    [ -f "$CHROOT/.vuc-qemu-version" ] \
        || die "provision-qemu.sh made no chroot at $CHROOT (it found a host QEMU?); set VUC_QEMU_CHROOT"
fi

exec 9>"$(dirname "$CHROOT")/.$(basename "$CHROOT").guest.lock"
log "waiting for lock"
flock 9
if ready; then
    log "another run finished meanwhile"
    cat "$MARKER"
    exit 0
fi

start=$(date +%s)
in_chroot() { chroot "$CHROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
apt_install() { in_chroot apt-get install -y -q --no-install-recommends -t trixie-backports "$@" >&2; }

log "apt-get update in chroot"
in_chroot apt-get update -q >&2
log "installing ${PACKAGES[*]} (trixie-backports)"
apt_install "${PACKAGES[@]}"

# The kernel version the headers meta-package points at.
kver="$(in_chroot dpkg-query -W -f '${Depends}' linux-headers-amd64 \
        | grep -o 'linux-headers-[^ ,]*-amd64' | head -n1 | sed 's/^linux-headers-//')"
[ -n "$kver" ] || die "cannot tell the kernel version from linux-headers-amd64"
log "kernel version $kver"

if [ ! -f "$CHROOT/usr/lib/modules/$kver/vmlinuz" ]; then
    if in_chroot apt-cache show "linux-binary-$kver" >/dev/null 2>&1; then
        # Just the vmlinuz (linux-image-KVER would pull in dracut and systemd).
        log "installing linux-binary-$kver"
        apt_install "linux-binary-$kver"
    else
        # Older packaging: unpack the image package without running its hooks.
        log "unpacking linux-image-$kver (no maintainer scripts)"
        in_chroot sh -c "cd /tmp && apt-get download -t trixie-backports linux-image-$kver >&2 \
            && dpkg-deb -x linux-image-${kver}_*.deb / && rm -f linux-image-${kver}_*.deb"
        if [ ! -f "$CHROOT/usr/lib/modules/$kver/vmlinuz" ] && [ -f "$CHROOT/boot/vmlinuz-$kver" ]; then
            mkdir -p "$CHROOT/usr/lib/modules/$kver"
            cp "$CHROOT/boot/vmlinuz-$kver" "$CHROOT/usr/lib/modules/$kver/vmlinuz"
        fi
    fi
fi
in_chroot apt-get clean >&2

[ -f "$CHROOT/usr/lib/modules/$kver/vmlinuz" ] || die "no vmlinuz for $kver"
[ -f "$CHROOT/usr/src/linux-headers-$kver/Makefile" ] || die "no headers for $kver"
in_chroot gcc --version >/dev/null || die "gcc does not run in the chroot"

echo "$kver" >"$MARKER"
log "kernel $kver, headers and toolchain ready in $CHROOT after $(( $(date +%s) - start ))s" \
    "(chroot now $(du -sh --one-file-system "$CHROOT" | cut -f1))"
echo "$kver"
