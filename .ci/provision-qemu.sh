#!/usr/bin/env bash
# Provision a QEMU >= 10.2 that has the generic `vhost-user-test-device-pci`.
#
# * If qemu-system-x86_64 on PATH is new enough and has the device, print its
#   path and exit.
# * Otherwise create (or reuse) a Debian trixie chroot with QEMU from
#   trixie-backports at ${VUC_QEMU_CHROOT:-/var/cache/vhost-user-cpufreq/trixie}.
#
# Progress goes to stderr.  The LAST line on stdout is the command prefix to
# run QEMU, e.g. `chroot /var/cache/vhost-user-cpufreq/trixie qemu-system-x86_64`
# (a unix socket at $CHROOT/tmp/x.sock on the host is /tmp/x.sock inside).
#
# Idempotent: the chroot is built in a temporary sibling directory and renamed
# into place only after QEMU is installed and verified; a marker file
# ($CHROOT/.vuc-qemu-version) records the installed QEMU version.  A directory
# without the marker is never treated as finished.
#
# Environment:
#   VUC_QEMU_CHROOT   chroot location (default /var/cache/vhost-user-cpufreq/trixie)
#   VUC_DEBIAN_MIRROR Debian mirror URL (default: the one bookworm uses in
#                     /etc/apt/sources.list*, else http://deb.debian.org/debian)
#   VUC_QEMU_MIN      minimum QEMU version (default 10.2)
# Needs root when it has to build the chroot.
set -euo pipefail

CHROOT="${VUC_QEMU_CHROOT:-/var/cache/vhost-user-cpufreq/trixie}"
MIN_VERSION="${VUC_QEMU_MIN:-10.2}"
MARKER_NAME=".vuc-qemu-version"
DEVICE="vhost-user-test-device"

log() { printf '[provision-qemu] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# version_ge A B -> true if dotted version A >= B
version_ge() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# qemu_version CMD... -> prints e.g. 11.1.0 (empty on failure)
qemu_version() {
    "$@" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1
}

# qemu_ok CMD... -> true if version >= MIN and the device exists
qemu_ok() {
    local v
    v="$(qemu_version "$@")" || return 1
    [ -n "$v" ] || return 1
    version_ge "$v" "$MIN_VERSION" || return 1
    "$@" -device help 2>/dev/null | grep -q "$DEVICE"
}

# 1. A suitable QEMU on PATH?
if host_qemu="$(command -v qemu-system-x86_64 2>/dev/null)"; then
    if qemu_ok "$host_qemu"; then
        log "using host QEMU $(qemu_version "$host_qemu") at $host_qemu"
        echo "$host_qemu"
        exit 0
    fi
    log "host QEMU $(qemu_version "$host_qemu" || true) at $host_qemu is unsuitable (need >= $MIN_VERSION with $DEVICE)"
fi

# 2. An existing finished chroot?
chroot_ready() {
    [ -f "$CHROOT/$MARKER_NAME" ] && [ -x "$CHROOT/usr/bin/qemu-system-x86_64" ]
}
if chroot_ready; then
    if [ "$(id -u)" -ne 0 ]; then
        die "chroot $CHROOT exists but running it needs root (chroot)"
    fi
    if qemu_ok chroot "$CHROOT" qemu-system-x86_64; then
        log "reusing chroot $CHROOT (QEMU $(cat "$CHROOT/$MARKER_NAME"))"
        echo "chroot $CHROOT qemu-system-x86_64"
        exit 0
    fi
    die "chroot $CHROOT has a marker but its QEMU is unusable; remove it and re-run"
fi

# 3. Build it.
[ "$(id -u)" -eq 0 ] || die "building the QEMU chroot needs root"

find_mirror() {
    if [ -n "${VUC_DEBIAN_MIRROR:-}" ]; then echo "$VUC_DEBIAN_MIRROR"; return; fi
    local f uri=""
    shopt -s nullglob
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri="$(awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i ~ /^[a-z+]+:\/\//) { if ($(i+1) ~ /^bookworm$/) { print $i; exit } break } }' "$f")"
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ]; then
        for f in /etc/apt/sources.list.d/*.sources; do
            # deb822: pick the URIs of a stanza whose Suites include "bookworm"
            uri="$(awk 'BEGIN{RS=""; FS="\n"} {u=""; s=0; for (i=1;i<=NF;i++) { if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, a, /[ \t]+/); u=a[1] } if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) s=1 } if (s && u != "") { print u; exit } }' "$f")"
            [ -n "$uri" ] && break
        done
    fi
    shopt -u nullglob
    echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR="$(find_mirror)"
MIRROR="${MIRROR%/}"
log "Debian mirror: $MIRROR"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap on the host"
    DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >&2
fi

parent="$(dirname "$CHROOT")"
mkdir -p "$parent"

# Serialise concurrent provisioners.
exec 9>"$parent/.$(basename "$CHROOT").lock"
if command -v flock >/dev/null 2>&1; then
    log "waiting for lock $parent/.$(basename "$CHROOT").lock"
    flock 9
    if chroot_ready && qemu_ok chroot "$CHROOT" qemu-system-x86_64; then
        log "another run finished the chroot meanwhile"
        echo "chroot $CHROOT qemu-system-x86_64"
        exit 0
    fi
fi

[ -e "$CHROOT" ] && die "$CHROOT exists but is not a finished chroot (no $MARKER_NAME); remove it and re-run"

# Remove leftovers of interrupted builds (nothing may be mounted in them).
for old in "$parent/.$(basename "$CHROOT").building."*; do
    [ -d "$old" ] || continue
    if grep -qF " $old/" /proc/mounts 2>/dev/null; then
        die "stale build dir $old still has mounts; unmount and remove it"
    fi
    log "removing stale partial build $old"
    rm -rf --one-file-system "$old"
done

TMP="$parent/.$(basename "$CHROOT").building.$$"
cleanup() {
    local rc=$?
    if [ -n "${TMP:-}" ] && [ -d "$TMP" ]; then
        umount "$TMP/proc" 2>/dev/null || true
        if [ $rc -ne 0 ]; then
            log "build failed (rc=$rc); removing $TMP"
            rm -rf --one-file-system "$TMP"
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

start=$(date +%s)
log "debootstrap trixie (minbase) into $TMP"
debootstrap --variant=minbase trixie "$TMP" "$MIRROR" >&2

# Never start services inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$TMP/usr/sbin/policy-rc.d"
chmod 0755 "$TMP/usr/sbin/policy-rc.d"

echo "deb $MIRROR trixie-backports main" >"$TMP/etc/apt/sources.list.d/trixie-backports.list"
cp /etc/resolv.conf "$TMP/etc/resolv.conf" 2>/dev/null || true

log "apt-get update in chroot"
chroot "$TMP" env DEBIAN_FRONTEND=noninteractive apt-get update >&2
log "installing qemu-system-x86 from trixie-backports (~500 MB)"
chroot "$TMP" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends -t trixie-backports qemu-system-x86 >&2
chroot "$TMP" apt-get clean >&2

qemu_ok chroot "$TMP" qemu-system-x86_64 \
    || die "installed QEMU ($(qemu_version chroot "$TMP" qemu-system-x86_64 || true)) lacks $DEVICE or is < $MIN_VERSION"

version="$(qemu_version chroot "$TMP" qemu-system-x86_64)"
echo "$version" >"$TMP/$MARKER_NAME"
mv -T "$TMP" "$CHROOT"
TMP=""
log "QEMU $version ready in $CHROOT after $(( $(date +%s) - start ))s ($(du -sh --one-file-system "$CHROOT" | cut -f1))"
echo "chroot $CHROOT qemu-system-x86_64"
