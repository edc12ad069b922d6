#!/usr/bin/env bash
# Build the service's OCI image from this checkout with Debian's tools only:
# debootstrap (a minimal Debian bookworm root, Python 3.11) and umoci (the
# OCI image layout), no container engine and no registry.
#
#   deploy/image/build.sh OUT_DIR [TAG]
#
# OUT_DIR becomes an OCI image layout holding vhost-user-cpufreq:TAG (default:
# the package version): `skopeo copy oci:OUT_DIR:TAG docker://...` pushes it,
# `umoci unpack --image OUT_DIR:TAG DIR` unpacks it.  The entrypoint is
# vhost-user-cpufreq; the DaemonSet (deploy/kubernetes/) gives it `serve`.
#
# The base root (debootstrap + python3-venv) is cached in
# /var/cache/vhost-user-cpufreq/image-base-bookworm (VUC_IMAGE_BASE); the
# package and its dependencies are built as wheels here, with this
# checkout's C data plane compiled in, and installed into /opt/vuc in the
# image without network access from inside it.  Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${1:?usage: build.sh OUT_DIR [TAG]}
TAG=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}
BASE=${VUC_IMAGE_BASE:-/var/cache/vhost-user-cpufreq/image-base-bookworm}
MIRROR=${VUC_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAMP="$BASE/.vuc-image-base-1"
log() { echo "[build-image] $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "needs root (debootstrap, chroot)"; exit 1; }
for tool in debootstrap umoci python3; do
    command -v "$tool" >/dev/null || { log "missing $tool (apt-get install debootstrap umoci)"; exit 1; }
done

mkdir -p "$(dirname "$BASE")"
exec 9>"$BASE.lock"
flock 9  # one builder of the base at a time
if [ ! -f "$STAMP" ]; then
    rm -rf --one-file-system "$BASE.building"
    log "debootstrap bookworm (minbase) into $BASE"
    debootstrap --variant=minbase bookworm "$BASE.building" "$MIRROR" >&2
    printf '#!/bin/sh\nexit 101\n' >"$BASE.building/usr/sbin/policy-rc.d"  # never start services
    chmod 0755 "$BASE.building/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$BASE.building/etc/resolv.conf" 2>/dev/null || true
    chroot "$BASE.building" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    chroot "$BASE.building" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends python3 python3-venv >&2
    chroot "$BASE.building" apt-get clean
    rm -rf "$BASE.building/var/lib/apt/lists/"* "$BASE.building/etc/resolv.conf"
    touch "$BASE.building/.vuc-image-base-1"
    rm -rf --one-file-system "$BASE"
    mv -T "$BASE.building" "$BASE"
fi
flock -u 9

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vuc-image.XXXXXX")
trap 'rm -rf --one-file-system "$WORK"' EXIT
log "wheels of this checkout and its dependencies"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip wheel setuptools cffi >&2
"$WORK/venv/bin/pip" wheel -q -w "$WORK/wheels" . >&2

ROOT="$WORK/root"
cp -a "$BASE" "$ROOT"
cp -r "$WORK/wheels" "$ROOT/tmp/wheels"
chroot "$ROOT" python3 -m venv /opt/vuc
chroot "$ROOT" /opt/vuc/bin/pip install -q --no-index --find-links /tmp/wheels vhost-user-cpufreq >&2
ln -s /opt/vuc/bin/vhost-user-cpufreq "$ROOT/usr/local/bin/vhost-user-cpufreq"
rm -rf "$ROOT/tmp/wheels" "$ROOT/.vuc-image-base-1" "$ROOT/usr/sbin/policy-rc.d"
find "$ROOT/opt/vuc" -name __pycache__ -prune -exec rm -rf {} +

log "OCI image $OUT:$TAG"
[ -d "$OUT" ] || umoci init --layout "$OUT"
umoci new --image "$OUT:$TAG"
umoci unpack --image "$OUT:$TAG" "$WORK/bundle" >&2
cp -a "$ROOT/." "$WORK/bundle/rootfs/"
umoci repack --image "$OUT:$TAG" "$WORK/bundle" >&2
umoci config --image "$OUT:$TAG" --author "vhost-user-cpufreq" \
    --config.entrypoint vhost-user-cpufreq --config.cmd check \
    --config.env PATH=/opt/vuc/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.label org.opencontainers.image.title=vhost-user-cpufreq \
    --config.label "org.opencontainers.image.version=$TAG" \
    --architecture amd64 --os linux
umoci gc --layout "$OUT"
echo "$OUT:$TAG"
