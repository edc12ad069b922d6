#!/usr/bin/env bash
# Build virtio_cpufreq.ko and a boot-test initramfs inside the QEMU chroot.
#
#   guest-driver-model/linux/build.sh            # provisions first if needed
#   VUC_GUEST_NO_PROVISION=1 .../build.sh        # exit 3 when not provisioned
#   VUC_GUEST_ARCH=arm64 .../build.sh            # an arm64 guest (default x86_64)
#   VUC_GUEST_OUT=/var/cache/mine .../build.sh    # outputs in /var/cache/mine/ARCH (in the chroot)
#
# The same module source builds for both: the arm64 headers set
# CROSS_COMPILE, so only KDIR differs.  Outputs go to /var/cache/vuc-guest
# (x86_64) or /var/cache/vuc-guest-arm64.
#
# The kernel, headers and toolchain come from .ci/provision-guest.sh (into
# the chroot made by .ci/provision-qemu.sh).  The module is built in the
# chroot against the kernel's headers (objtool needs /proc, so the build
# runs in a private mount namespace with its own /proc: nothing is mounted
# in the shared chroot for anyone else).  Outputs live in the chroot at
# /var/cache/vuc-guest, so QEMU (which runs in the chroot) can open them.
#
# On success the last lines of stdout are KEY=VALUE pairs; paths are as
# QEMU inside the chroot sees them:
#   CHROOT=/var/cache/vhost-user-cpufreq/trixie
#   ARCH=x86_64
#   KVER=7.3.4+deb13-amd64
#   KERNEL=/usr/lib/modules/KVER/vmlinuz
#   INITRD=/var/cache/vuc-guest/initrd.gz
#   MODULE=/var/cache/vuc-guest/build/virtio_cpufreq.ko
#
# The initramfs holds static busybox, the module and an /init that:
# mounts proc/sys/dev, insmods the module, prints the cpufreq policies, sets
# the governor, spins a CPU-bound loop on one vCPU, waits for the host to
# change a frequency (the test does that from the back-end when it reads
# "VUC: wait-host-change"), prints the policies again and the driver's
# statistics, unbinds and rebinds the device (a driver reset and a new
# probe), rmmods the module, prints dmesg and powers off.  Its knobs are
# kernel command line words: vuc.busy_cpu=N (default 1), vuc.busy_secs=S
# (3), vuc.wait_secs=S (20), vuc.governor=NAME (schedutil), vuc.modparams=
# a,b (comma-separated module parameters), vuc.topo=1 (print each CPU's
# capacity, the scheduler domains and sched_energy_aware after probe, watch
# the frequency-scale source follow the host change, and run the placement
# check: see topo.sh).  Every line it prints starts with "VUC: " (dmesg lines
# with "VUC-DMESG: ").
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CHROOT="${VUC_QEMU_CHROOT:-/var/cache/vhost-user-cpufreq/trixie}"
case "${VUC_GUEST_ARCH:-x86_64}" in
    x86_64|amd64) ARCH=x86_64; OUT_GUEST=/var/cache/vuc-guest; BUSYBOX=/usr/bin/busybox ;;
    arm64|aarch64) ARCH=arm64; OUT_GUEST=/var/cache/vuc-guest-arm64; BUSYBOX=/opt/vuc-arm64/usr/bin/busybox ;;
    *) printf '[guest-build] ERROR: unknown VUC_GUEST_ARCH %s\n' "$VUC_GUEST_ARCH" >&2; exit 1 ;;
esac                                    # OUT_GUEST and BUSYBOX: inside the chroot
# VUC_GUEST_OUT (a directory inside the chroot) keeps one worktree's builds apart from another's:
# they go to $VUC_GUEST_OUT/x86_64 and $VUC_GUEST_OUT/arm64.
[ -z "${VUC_GUEST_OUT:-}" ] || OUT_GUEST="$VUC_GUEST_OUT/$ARCH"
OUT="$CHROOT$OUT_GUEST"

log() { printf '[guest-build] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

MARKER="$CHROOT/.vuc-guest-kernel"
[ "$ARCH" = arm64 ] && MARKER="$MARKER-arm64"
if [ -f "$MARKER" ] || [ "${VUC_GUEST_NO_PROVISION:-0}" != 1 ]; then
    KVER="$(bash "$REPO/.ci/provision-guest.sh" "$ARCH" | tail -n 1)"
else
    log "guest kernel not provisioned in $CHROOT (run .ci/provision-guest.sh)"
    exit 3
fi
[ -n "$KVER" ] || die "provision-guest.sh gave no kernel version"
KDIR="/usr/src/linux-headers-$KVER"

mkdir -p "$OUT/build" "$OUT/initramfs"
exec 9>"$OUT/.lock"
flock 9

# -- module ---------------------------------------------------------------------
for f in virtio_cpufreq.c Kbuild Makefile; do
    # Copy only what changed: make decides from the timestamps.
    cmp -s "$HERE/$f" "$OUT/build/$f" || cp "$HERE/$f" "$OUT/build/$f"
done
log "building virtio_cpufreq.ko against $KVER"
unshare --mount --propagation private sh -c '
    mount -t proc proc "$1/proc" &&
    exec chroot "$1" env LC_ALL=C make -s -C "$2/build" KDIR="$3" W=1' sh "$CHROOT" "$OUT_GUEST" "$KDIR" >&2 \
    || die "module build failed"
[ -f "$OUT/build/virtio_cpufreq.ko" ] || die "no virtio_cpufreq.ko"

# -- initramfs ------------------------------------------------------------------
R="$OUT/initramfs"
rm -rf "$R"
mkdir -p "$R/bin" "$R/proc" "$R/sys" "$R/dev" "$R/tmp"
cp "$CHROOT$BUSYBOX" "$R/bin/busybox"
cp "$OUT/build/virtio_cpufreq.ko" "$R/virtio_cpufreq.ko"
cp "$HERE/topo.sh" "$R/topo.sh"
cat >"$R/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "VUC: $*"; }
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "vuc.$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}
BUSY_CPU=$(arg busy_cpu 1)
BUSY_SECS=$(arg busy_secs 3)
WAIT_SECS=$(arg wait_secs 20)
GOV=$(arg governor schedutil)
PARAMS=$(arg modparams "" | tr ',' ' ')
TOPO=$(arg topo 0)
[ "$TOPO" = 1 ] && . /topo.sh
CF=/sys/devices/system/cpu/cpufreq

policies() {
    for p in "$CF"/policy*; do
        [ -d "$p" ] || continue
        say "policy $(basename "$p") driver=$(cat "$p/scaling_driver") governor=$(cat "$p/scaling_governor")" \
            "related=$(cat "$p/related_cpus" | tr ' ' ',') min=$(cat "$p/cpuinfo_min_freq")" \
            "max=$(cat "$p/cpuinfo_max_freq") cur=$(cat "$p/scaling_cur_freq")" \
            "hw_cur=$(cat "$p/cpuinfo_cur_freq" 2>/dev/null) $1"
    done
}
hw_cur() { cat "$CF"/policy*/cpuinfo_cur_freq 2>/dev/null | tr '\n' ' '; }
stats() {
    [ -n "$VDEV" ] && [ -d "$VDEV/cpufreq" ] || return 0
    line=""
    for f in "$VDEV"/cpufreq/*; do
        [ "$(basename "$f")" = freq_scale ] || line="$line $(basename "$f")=$(cat "$f")"
    done
    say "stats$line $1"
}

say "boot kernel=$(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
for d in /sys/bus/virtio/devices/*; do
    [ -d "$d" ] && say "virtio $(basename "$d") device=$(cat "$d/device") vendor=$(cat "$d/vendor")"
done
if [ -e /sys/devices/system/cpu/cpufreq/policy0 ]; then
    say "cpufreq already driven by $(cat /sys/devices/system/cpu/cpufreq/policy0/scaling_driver)"
fi
insmod /virtio_cpufreq.ko $PARAMS
say "insmod rc=$?"
VDEV=""
for d in /sys/bus/virtio/devices/*; do
    [ -d "$d/cpufreq" ] && VDEV="$d"
done
if [ -n "$VDEV" ]; then
    say "bound $(basename "$VDEV") driver=$(basename "$(readlink "$VDEV/driver")") features=$(cat "$VDEV/features")"
else
    say "not bound"
fi
policies probe
for p in "$CF"/policy*; do
    [ -d "$p" ] || continue
    say "available $(basename "$p") $(cat "$p/scaling_available_frequencies" 2>/dev/null)"
    [ "$(cat "$p/scaling_governor")" = "$GOV" ] || echo "$GOV" >"$p/scaling_governor" \
        || say "cannot set governor $GOV on $(basename "$p")"
done
stats probe
[ "$TOPO" = 1 ] && { sleep 1; topo_show probe; }   # the domains are rebuilt from a work item

say "busy-start cpu=$BUSY_CPU secs=$BUSY_SECS"
# The host opens its busy window when it reads that line, and under a loaded TCG
# the console can reach it well after the device's records: give it a head start.
sleep 2
taskset -c "$BUSY_CPU" sh -c 'while :; do :; done' &
BUSY=$!
sleep "$BUSY_SECS"
policies busy
stats busy

BEFORE=$(hw_cur)
[ "$TOPO" = 1 ] && fie_arm "$BUSY_CPU"
say "wait-host-change hw_cur=$BEFORE"
[ "$TOPO" = 1 ] && fie_watch "$BUSY_CPU" "$WAIT_SECS"
n=0
while [ "$(hw_cur)" = "$BEFORE" ] && [ $n -lt $((WAIT_SECS * 10)) ]; do
    usleep 100000
    n=$((n + 1))
done
if [ "$(hw_cur)" = "$BEFORE" ]; then
    say "host-change-timeout"
else
    say "host-change-seen polls=$n hw_cur=$(hw_cur)"
fi
policies changed
kill "$BUSY"
wait "$BUSY" 2>/dev/null
sleep 1
policies idle
stats end
[ "$TOPO" = 1 ] && { placement "$(arg placement_secs 10)"; placement_light "$(arg placement_secs 10)"; topo_change "$WAIT_SECS" "$(arg placement_secs 10)"; }

# A driver reset and a fresh probe of the same device (RESYNC, new config read).
if [ -n "$VDEV" ]; then
    DRV=/sys/bus/virtio/drivers/virtio_cpufreq
    NAME=$(basename "$VDEV")
    echo "$NAME" >"$DRV/unbind"
    say "unbind rc=$? policies_left=$(ls "$CF" 2>/dev/null | grep -c policy)"
    echo "$NAME" >"$DRV/bind"
    say "bind rc=$? policies=$(ls "$CF" 2>/dev/null | grep -c policy)"
    taskset -c "$BUSY_CPU" sh -c 'while :; do :; done' &
    BUSY=$!
    sleep 1
    kill "$BUSY"
    wait "$BUSY" 2>/dev/null
    policies rebound
    stats rebound
fi

rmmod virtio_cpufreq
say "rmmod rc=$? policies_left=$(ls "$CF" 2>/dev/null | grep -c policy)"
[ "$TOPO" = 1 ] && { sleep 1; topo_show removed; }
dmesg | grep -iE 'virtio_cpufreq|cpufreq|warning|bug|oops|call trace|taint|rcu|EM: |root_domain|pd[0-9]+:' \
    | sed 's/^/VUC-DMESG: /'
say "done"
poweroff -f
INIT
chmod 0755 "$R/init"
unshare --mount --propagation private sh -c '
    exec chroot "$1" sh -c "cd $2/initramfs && find . | cpio -o -H newc --quiet | gzip -1 >$2/initrd.gz.new"' \
    sh "$CHROOT" "$OUT_GUEST" || die "initramfs build failed"
mv -f "$OUT/initrd.gz.new" "$OUT/initrd.gz"
log "initramfs $(du -h "$OUT/initrd.gz" | cut -f1)"

echo "CHROOT=$CHROOT"
echo "ARCH=$ARCH"
echo "KVER=$KVER"
echo "KERNEL=/usr/lib/modules/$KVER/vmlinuz"
echo "INITRD=$OUT_GUEST/initrd.gz"
echo "MODULE=$OUT_GUEST/build/virtio_cpufreq.ko"
