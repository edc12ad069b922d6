#!/usr/bin/env bash
# Provision what the Linux guest tests (tests/test_linux_guest*.py) need, in
# the QEMU chroot that .ci/provision-qemu.sh makes:
#
#   .ci/provision-guest.sh [x86_64|arm64]      (default x86_64)
#
# x86_64:
#   * a Linux kernel from trixie-backports (only the vmlinuz package
#     linux-binary-KVER: no initramfs generator, no systemd, no modules
#     tree; the guest needs nothing but built-in drivers and our module),
#   * its headers and the toolchain to build an out-of-tree module
#     (linux-headers-amd64, gcc, make), and busybox-static + cpio for the
#     initramfs.
# arm64 (the x86_64 set first: the arm64 headers use its kbuild tools):
#   * dpkg --add-architecture arm64 in the chroot,
#   * qemu-system-arm (qemu-system-aarch64), linux-headers-arm64:arm64 (pulls
#     in the aarch64 cross compiler; the headers set CROSS_COMPILE, so the
#     same `make KDIR=...` builds the module) and linux-binary-KVER:arm64,
#   * device-tree-compiler: the test gives the vCPUs capacity-dmips-mhz in
#     the machine's device tree, as a VMM describing big.LITTLE vCPUs does,
#   * busybox-static:arm64 unpacked (dpkg -x) to $CHROOT/opt/vuc-arm64:
#     installing it would remove the amd64 busybox-static.
#
# All from trixie-backports (-t trixie-backports), because the chroot's QEMU
# comes from there and mixing suites makes its libraries conflict.
#
# Idempotent: a finished run writes $CHROOT/.vuc-guest-kernel (x86_64) or
# $CHROOT/.vuc-guest-kernel-arm64 (the kernel version); a re-run with the
# marker and the files in place returns at once.  Concurrent runs are
# serialised with flock.  Progress goes to stderr; the LAST stdout line is
# the kernel version (e.g. 7.3.4+deb13-amd64, 7.3.4+deb13-arm64).  The
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
PACKAGES=(linux-headers-amd64 busybox-static gcc make cpio kmod libc6-dev)
ARM64_PACKAGES=(qemu-system-arm linux-headers-arm64:arm64 device-tree-compiler)
ARM64_BUSYBOX=/opt/vuc-arm64    # busybox-static:arm64 unpacked here (usr/bin/busybox)

log() { printf '[provision-guest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "${1:-x86_64}" in
    x86_64|amd64) ARCH=x86_64; MARKER="$CHROOT/.vuc-guest-kernel" ;;
    arm64|aarch64) ARCH=arm64; MARKER="$CHROOT/.vuc-guest-kernel-arm64" ;;
    *) die "unknown architecture '$1' (x86_64 or arm64)" ;;
esac

ready() {
    [ -f "$MARKER" ] || return 1
    local kver
    kver="$(cat "$MARKER")"
    [ -f "$CHROOT/usr/lib/modules/$kver/vmlinuz" ] \
        && [ -f "$CHROOT/usr/src/linux-headers-$kver/Makefile" ] \
        && [ -x "$CHROOT/usr/bin/gcc" ] && [ -x "$CHROOT/usr/bin/busybox" ] \
        && [ -x "$CHROOT/usr/bin/cpio" ] && [ -x "$CHROOT/usr/bin/make" ] || return 1
    [ "$ARCH" = x86_64 ] && return 0
    [ -x "$CHROOT/usr/bin/qemu-system-aarch64" ] && [ -x "$CHROOT$ARM64_BUSYBOX/usr/bin/busybox" ] \
        && [ -x "$CHROOT/usr/bin/dtc" ]
}

if ready; then
    log "reusing $ARCH kernel $(cat "$MARKER") in $CHROOT"
    cat "$MARKER"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "installing into the chroot needs root"

if [ "$ARCH" = arm64 ]; then
    # The amd64 toolchain, kbuild tools and cpio first (its own lock and marker).
    bash "$0" x86_64 >/dev/null
elif [ ! -f "$CHROOT/.vuc-qemu-version" ]; then
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

# kernel_version META ARCH: the kernel version the headers meta-package points at.
kernel_version() {
    in_chroot dpkg-query -W -f '${Depends}' "$1" | grep -o "linux-headers-[^ ,:]*-$2" | head -n1 \
        | sed 's/^linux-headers-//'
}

if [ "$ARCH" = arm64 ]; then
    if ! in_chroot dpkg --print-foreign-architectures | grep -qx arm64; then
        log "dpkg --add-architecture arm64"
        in_chroot dpkg --add-architecture arm64
    fi
    log "apt-get update in chroot"
    in_chroot apt-get update -q >&2
    log "installing ${ARM64_PACKAGES[*]} (trixie-backports)"
    apt_install "${ARM64_PACKAGES[@]}"
    kver="$(kernel_version linux-headers-arm64:arm64 arm64)"
    [ -n "$kver" ] || die "cannot tell the kernel version from linux-headers-arm64:arm64"
    log "kernel version $kver"
    # Just the Image (linux-image-KVER would pull in dracut and systemd).
    [ -f "$CHROOT/usr/lib/modules/$kver/vmlinuz" ] || apt_install "linux-binary-$kver:arm64"
    if [ ! -x "$CHROOT$ARM64_BUSYBOX/usr/bin/busybox" ]; then
        # Unpacked, not installed: busybox-static:arm64 and :amd64 cannot be installed together.
        log "unpacking busybox-static:arm64 to $ARM64_BUSYBOX"
        in_chroot sh -c "rm -rf /tmp/vuc-bb && mkdir /tmp/vuc-bb && cd /tmp/vuc-bb \
            && apt-get download -q busybox-static:arm64 >&2 && dpkg-deb -x busybox-static_*_arm64.deb $ARM64_BUSYBOX \
            && cd / && rm -rf /tmp/vuc-bb"
    fi
    in_chroot apt-get clean >&2
    [ -x "$CHROOT/usr/bin/qemu-system-aarch64" ] || die "no qemu-system-aarch64"
    [ -x "$CHROOT$ARM64_BUSYBOX/usr/bin/busybox" ] || die "no arm64 busybox"
else
    log "apt-get update in chroot"
    in_chroot apt-get update -q >&2
    log "installing ${PACKAGES[*]} (trixie-backports)"
    apt_install "${PACKAGES[@]}"
    kver="$(kernel_version linux-headers-amd64 amd64)"
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
fi

[ -f "$CHROOT/usr/lib/modules/$kver/vmlinuz" ] || die "no vmlinuz for $kver"
[ -f "$CHROOT/usr/src/linux-headers-$kver/Makefile" ] || die "no headers for $kver"
in_chroot gcc --version >/dev/null || die "gcc does not run in the chroot"

echo "$kver" >"$MARKER"
log "$ARCH kernel $kver, headers and toolchain ready in $CHROOT after $(( $(date +%s) - start ))s" \
    "(chroot now $(du -sh --one-file-system "$CHROOT" | cut -f1))"
echo "$kver"
