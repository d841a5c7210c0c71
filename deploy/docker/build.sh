#!/usr/bin/env bash
# Builds Shoal's container image without a Docker engine or a registry
# (`make image`). Not part of `make test`: it takes minutes.
#
#   1. makes a Debian bookworm base with mmdebstrap (minbase, the host's apt
#      sources) and imports it into buildah's storage as $SHOAL_IMAGE_BASE,
#      once (SHOAL_IMAGE_REBASE=1 makes it again);
#   2. compiles the release binaries on the host (bookworm, so their glibc
#      matches the image's);
#   3. stages the binaries as bin/ in a context directory and builds
#      deploy/docker/Dockerfile.prebuilt with buildah (vfs storage, chroot
#      isolation, --pull=never): the runtime stage of deploy/docker/Dockerfile;
#   4. prints the image's size; SHOAL_IMAGE_ARCHIVE=FILE also writes it as a
#      docker-archive (for `podman load`, `kind load image-archive`, skopeo).
#
# Run it as root (buildah's chroot isolation and mmdebstrap need it); the
# Debian packages buildah, mmdebstrap, binutils (and podman, runc for
# deploy/docker/smoke.sh) are apt-get installed when missing.
#
# Environment: SHOAL_IMAGE (default localhost/shoal:dev), SHOAL_IMAGE_BASE
# (default localhost/shoal-base:bookworm), SHOAL_IMAGE_STORE (the container
# store, default .local/image/storage), SHOAL_IMAGE_REBASE,
# SHOAL_IMAGE_ARCHIVE, SANDBOX_PACKAGES (passed as the build argument).
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${SHOAL_IMAGE:-localhost/shoal:dev}
BASE=${SHOAL_IMAGE_BASE:-localhost/shoal-base:bookworm}
WORK=.local/image
BINARIES=(shoal-scheduler shoal shoal-worker shoal-sandbox-exec)
# A container store of the project's own (vfs: overlay is not available
# everywhere this runs), so nothing else's images or podman database on the
# machine get in the way; deploy/docker/smoke.sh runs podman on the same one.
STORE=${SHOAL_IMAGE_STORE:-$PWD/$WORK/storage}
STORAGE=(--root "$STORE" --runroot "$STORE-run" --storage-driver vfs)
BUILDAH=(buildah "${STORAGE[@]}")

log() { printf 'image: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root (buildah --isolation chroot and mmdebstrap need it)"

missing=()
for tool in buildah mmdebstrap podman runc strip; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (Debian packages)"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    buildah mmdebstrap podman runc uidmap
fi
for tool in buildah mmdebstrap strip; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool still missing after apt-get install"
done

# ---- 1. base ---------------------------------------------------------------
mkdir -p "$WORK"
if [[ ${SHOAL_IMAGE_REBASE:-0} == 1 ]] || ! "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  sources=/etc/apt/sources.list.d/debian.sources
  [[ -f $sources ]] || sources=/etc/apt/sources.list
  [[ -f $sources ]] || die "no apt sources on this host for mmdebstrap"
  log "making the bookworm base with mmdebstrap (from $sources)"
  rm -f "$WORK/base.tar"
  mmdebstrap --variant=minbase --format=tar \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$WORK/base.tar" "$sources"
  log "importing it as $BASE"
  ctr=$("${BUILDAH[@]}" from scratch)
  trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
  "${BUILDAH[@]}" add "$ctr" "$WORK/base.tar" /
  "${BUILDAH[@]}" config --cmd /bin/bash \
    --label org.opencontainers.image.description="Debian bookworm minbase (mmdebstrap)" "$ctr"
  "${BUILDAH[@]}" commit --rm "$ctr" "$BASE"
  trap - EXIT
  rm -f "$WORK/base.tar"
fi

# ---- 2. binaries -----------------------------------------------------------
log "compiling the release binaries"
cargo build --release --locked -p shoal-worker -p shoal-scheduler --bins
glibc=$(ldd --version | head -n1 | awk '{print $NF}')
case $glibc in
  2.3[0-6] | 2.[12][0-9]) ;;
  *) die "host glibc $glibc is newer than bookworm's 2.36: the binaries would not run in the image; build on bookworm or use deploy/docker/Dockerfile" ;;
esac

# ---- 3. image --------------------------------------------------------------
context=$WORK/context
rm -rf "$context"
mkdir -p "$context/bin"
# Debug info (the release profile keeps line tables) is most of their size;
# the symbols stay, so a backtrace still names its functions.
for binary in "${BINARIES[@]}"; do
  install -m 0755 "target/release/$binary" "$context/bin/$binary"
  strip --strip-debug "$context/bin/$binary"
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD -- shared scheduler worker Cargo.lock 2>/dev/null; then
  revision="$revision-dirty"
fi
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "VERSION=$version" --build-arg "REVISION=$revision")
if [[ -n ${SANDBOX_PACKAGES+set} ]]; then
  build_args+=(--build-arg "SANDBOX_PACKAGES=$SANDBOX_PACKAGES")
fi
log "building $IMAGE (revision $revision)"
"${BUILDAH[@]}" bud --isolation chroot --pull=never --layers=false \
  "${build_args[@]}" -f deploy/docker/Dockerfile.prebuilt -t "$IMAGE" "$context"

# ---- 4. report -------------------------------------------------------------
size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -n1)
log "built $IMAGE: $size (base $("${BUILDAH[@]}" images --format '{{.Size}}' "$BASE" | head -n1))"
if [[ -n ${SHOAL_IMAGE_ARCHIVE:-} ]]; then
  rm -f "$SHOAL_IMAGE_ARCHIVE"
  "${BUILDAH[@]}" push "$IMAGE" "docker-archive:$SHOAL_IMAGE_ARCHIVE:$IMAGE"
  log "wrote $SHOAL_IMAGE_ARCHIVE"
fi
