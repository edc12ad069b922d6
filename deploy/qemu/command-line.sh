#!/bin/sh
# Start a VM with the vhost-user cpufreq device, without libvirt.
#
#   command-line.sh [NAME [QEMU ARGS...]]
#
# NAME (default web1) is QEMU's -name: on the service's shared socket it is
# how the VM is told apart (and the first [class.NAME] matching it applies).
# The service must already listen, because QEMU connects once, while
# creating the device, and does not survive the back-end going away.
# Extra arguments (disks, network, -daemonize, ...) are appended as given.
#
# Needs QEMU >= 10.2: the first with vhost-user-test-device-pci, the generic
# vhost-user device that takes the virtio id and config size from the command
# line.  Environment:
#   QEMU        the command that runs qemu-system-x86_64 (may be several
#               words, e.g. "chroot /srv/trixie qemu-system-x86_64")
#   VUC_SOCKET  the back-end's socket (default the shared one,
#               /run/vhost-user-cpufreq/vhost.sock; a [vm.NAME]'s own socket
#               for the per-VM model)
#   MEM, SMP    guest RAM and vCPUs (default 4G, 4; with a per-VM socket keep
#               SMP equal to the VM's `vcpus` in the service's configuration)
#   ACCEL       accelerator (default kvm)
set -eu

NAME=${1:-web1}
[ "$#" -gt 0 ] && shift
QEMU=${QEMU:-qemu-system-x86_64}
VUC_SOCKET=${VUC_SOCKET:-/run/vhost-user-cpufreq/vhost.sock}
MEM=${MEM:-4G}
SMP=${SMP:-4}
ACCEL=${ACCEL:-kvm}

# Guest RAM is a shared memfd: the back-end maps it through the fds QEMU sends
# with the memory table, to read the request ring and its buffers.
#
# The device: virtio-id 38 is an id QEMU 10.2+ accepts (ids without a name in
# its table abort it) and that no QEMU device model uses; one queue (the
# request queue), 256 entries; 256 bytes of config space, which QEMU reads
# from the back-end with GET_CONFIG on every guest access.
#
# $QEMU is split into words on purpose (a prefix such as chroot).
# shellcheck disable=SC2086
exec $QEMU \
    -name "$NAME" \
    -accel "$ACCEL" \
    -machine q35,memory-backend=mem \
    -m "$MEM" \
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on" \
    -smp "$SMP" \
    -chardev "socket,id=vucpufreq,path=$VUC_SOCKET" \
    -device vhost-user-test-device-pci,chardev=vucpufreq,virtio-id=38,num_vqs=1,vq_size=256,config_size=256 \
    "$@"
