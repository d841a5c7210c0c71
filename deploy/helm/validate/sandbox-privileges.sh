#!/usr/bin/env bash
# Which privileges does a pod running local (bubblewrap) sandboxes need?
# An experiment behind docs/adr/0020, not part of `make test` (it needs
# podman, mmdebstrap, a Debian mirror and about two minutes): it builds a
# bookworm root filesystem with bubblewrap, iproute2, nftables and
# slirp4netns, copies in target/debug/shoal-sandbox-exec, and runs the
# operations a Shoal worker performs for its sandboxes, as root in a podman
# container, under several security settings:
#
#   defaults        the runtime's default capabilities, seccomp and masked /proc
#   caps            exactly the eight capabilities, default seccomp, /proc unmasked
#   caps-masked     the same with the default (masked) /proc
#   caps-minus-X    the eight minus X, for each X (shows each one is needed)
#   privileged      --privileged
#   userns-caps     the eight capabilities in a user namespace of 65536 uids
#                   (Kubernetes' hostUsers: false) with /proc unmasked, state
#                   and /run on volumes, sandbox uid 10000
#   userns-masked   the same with the default (masked) /proc
#
# then runs the real shoal-worker (local RabbitMQ and Redis) in the chart's
# worker profiles: privileged with a network template and cgroups required,
# its state volume 0755 (as the chart's init container leaves it) and 0777
# (a bare emptyDir); non-root Daytona-only with its state on a 0777 volume
# and on /dev/shm (the preset's old workaround, needless since the worker skips
# the local provider when no template uses it).
#
# Usage: deploy/helm/validate/sandbox-privileges.sh [WORKDIR]   (run as root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
WORK="${1:-$ROOT/.local/sandbox-privileges}"
ROOTFS="$WORK/rootfs"
CAPS=(CHOWN DAC_OVERRIDE FOWNER KILL SETUID SETGID SYS_ADMIN NET_ADMIN)

for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "sandbox-privileges: $tool is not installed" >&2; exit 1; }
done
[[ -x "$ROOT/target/debug/shoal-sandbox-exec" ]] \
  || { echo "sandbox-privileges: build first (cargo build -p shoal-worker --bins)" >&2; exit 1; }

if [[ ! -x "$ROOTFS/usr/bin/bwrap" ]]; then
  mkdir -p "$WORK"
  mmdebstrap --variant=minbase --include=bubblewrap,iproute2,nftables,slirp4netns,util-linux \
    bookworm "$ROOTFS" >"$WORK/mmdebstrap.log" 2>&1
fi
install -m 0755 "$ROOT/target/debug/shoal-sandbox-exec" "$ROOTFS/usr/local/bin/"

cat >"$ROOTFS/usr/local/bin/probe.sh" <<'EOF'
#!/bin/bash
# As root in the container: what a worker does for a local sandbox.
U=${PROBE_UID:-200000}
RL=--rlimits=4294967296,536870912,1024,256,3600
r() { local what="$1"; shift; if out=$("$@" 2>&1); then echo "ok    $what"; else echo "FAIL  $what: $(echo "$out" | tail -1)"; fi; }
mkdir -p /var/lib/shoal/s/workspace /var/lib/shoal/s/tmp
r "chown workspace to the sandbox uid" chown $U:$U /var/lib/shoal/s/workspace /var/lib/shoal/s/tmp
r "mount a size-capped tmpfs workspace" mount -t tmpfs -o size=16m,mode=0755,uid=$U,gid=$U tmpfs /var/lib/shoal/s/workspace
BW=(bwrap --unshare-all --die-with-parent --new-session --ro-bind /usr /usr --symlink usr/bin /bin
  --symlink usr/sbin /sbin --symlink usr/lib /lib --symlink usr/lib64 /lib64 --proc /proc --dev /dev
  --size 1048576 --tmpfs /dev/shm --bind /var/lib/shoal/s/workspace /workspace --bind /var/lib/shoal/s/tmp /tmp
  --remount-ro / --hostname sandbox --chdir /workspace --clearenv --setenv PATH /usr/bin:/bin)
r "launcher drops to the sandbox uid, bwrap --unshare-all --proc" shoal-sandbox-exec --uid=$U $RL -- "${BW[@]}" -- \
  sh -c 'mkdir -m 700 /workspace/d && echo hi > /workspace/d/f && chmod 600 /workspace/d/f && mkdir -m 1777 /workspace/s && touch /workspace/s/g'
r "read a 0600 file in a 0700 dir of the sandbox" cat /var/lib/shoal/s/workspace/d/f
shoal-sandbox-exec --uid=$U $RL -- sleep 30 &
sleep 0.3
r "kill a process of the sandbox uid" kill -9 $!
wait 2>/dev/null
r "ip netns add" ip netns add shoal-probe
r "nftables rules in the sandbox's netns" ip netns exec shoal-probe nft add table inet shoal
r "launcher enters the netns (setns)" shoal-sandbox-exec --uid=$U --netns=/run/netns/shoal-probe $RL -- "${BW[@]}" --share-net -- true
r "/dev/net/tun for slirp4netns" test -c /dev/net/tun -a -r /dev/net/tun
r "cgroupfs writable (per-sandbox cgroups)" sh -c 'd=$(ls -d /sys/fs/cgroup/memory 2>/dev/null || echo /sys/fs/cgroup); mkdir "$d/shoal-probe" && rmdir "$d/shoal-probe"'
r "remove a file in the sandbox's sticky dir" rm -f /var/lib/shoal/s/workspace/s/g
r "remove the sandbox's 0700 dir" rm -rf /var/lib/shoal/s/workspace/d
umount /var/lib/shoal/s/workspace 2>/dev/null; rm -rf /var/lib/shoal/s; ip netns del shoal-probe 2>/dev/null
true
EOF
chmod 0755 "$ROOTFS/usr/local/bin/probe.sh"

P=(podman run --rm --runtime runc --cgroup-manager cgroupfs --events-backend file --network host
  --ulimit nofile=1024:1024 --ulimit nproc=1000:1000)
probe() { # NAME OPTIONS...
  local name="$1"
  shift
  echo "### $name"
  timeout 120 "${P[@]}" "$@" --rootfs "$ROOTFS" /usr/local/bin/probe.sh 2>&1 | grep -v Killed
}
joined() { local IFS=,; echo "$*"; }

probe defaults
probe caps --cap-drop=all --cap-add="$(joined "${CAPS[@]}")" --security-opt unmask=ALL
probe caps-masked --cap-drop=all --cap-add="$(joined "${CAPS[@]}")"
for drop in "${CAPS[@]}"; do
  keep=()
  for cap in "${CAPS[@]}"; do [[ "$cap" == "$drop" ]] || keep+=("$cap"); done
  probe "caps-minus-$drop" --cap-drop=all --cap-add="$(joined "${keep[@]}")" --security-opt unmask=ALL
done
probe privileged --privileged
# shellcheck disable=SC2054 # the commas are tmpfs and capability list syntax
USERNS=(--uidmap 0:300000:65536 --gidmap 0:300000:65536 --env PROBE_UID=10000
  --tmpfs /var/lib/shoal:rw,mode=0711 --tmpfs /run:rw --cap-drop=all --cap-add="$(joined "${CAPS[@]}")")
probe userns-caps "${USERNS[@]}" --security-opt unmask=ALL
probe userns-masked "${USERNS[@]}"

# ---- the real worker in the chart's worker profiles -------------------------
# Needs the local RabbitMQ and Redis (deploy/local/services.sh up); uses its
# own namespace and removes its queues and keys afterwards.
ENV_FILE="$ROOT/.local/env"
if [[ ! -f "$ENV_FILE" ]] || ! bash "$ROOT/deploy/local/services.sh" status >/dev/null 2>&1; then
  echo "sandbox-privileges: local RabbitMQ/Redis not running (bash deploy/local/services.sh up); worker cases not run" >&2
  exit 1
fi
set -a
# shellcheck disable=SC1090
. "$ENV_FILE"
set +a
NS="privprobe$$"
PORT=39464
install -m 0755 "$ROOT/target/debug/shoal-worker" "$ROOTFS/usr/local/bin/"
STATE="$WORK/state"

worker_case() { # NAME STATE_MODE SANDBOX_ROOT TEMPLATE_TOML PODMAN_OPTIONS...
  local name="$1" mode="$2" root="$3" template="$4"
  shift 4
  rm -rf "$STATE" && mkdir -p "$STATE" && chmod "$mode" "$STATE"
  cat >"$ROOTFS/etc/shoal-probe.toml" <<EOF
namespace = "$NS"
[worker]
metrics_listen = "0.0.0.0:$PORT"
drain_timeout_s = 5
pod_deletion_cost = false
[sandbox]
root = "$root/sandboxes"
uid_dir = "$root/sandbox-uids"
$template
[daytona]
api_url = "http://127.0.0.1:9/api"
EOF
  echo "### worker: $name"
  timeout 60 "${P[@]}" --read-only -v /etc/ssl/certs:/etc/ssl/certs:ro -v "$STATE:/var/lib/shoal" "$@" \
    -e SHOAL__BROKER__URL="$SHOAL__BROKER__URL" -e SHOAL__REDIS__URL="$SHOAL__REDIS__URL" \
    -e DAYTONA_API_KEY=dummy -e RUST_LOG=warn \
    --rootfs "$ROOTFS" /usr/local/bin/shoal-worker --config /etc/shoal-probe.toml >"$WORK/worker-$name.log" 2>&1 &
  local pid=$! ready="" idle=""
  for _ in $(seq 1 60); do
    ready="$(curl -s -m 1 "127.0.0.1:$PORT/readyz" || true)"
    [[ "$ready" == *running* ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  sleep 3
  idle="$(curl -s -m 1 "127.0.0.1:$PORT/metrics" | grep -E '^shoal_pool_idle' | tr '\n' ' ' || true)"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "readyz: ${ready:-none}  ${idle}"
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/worker-$name.log" | grep -E 'Error|refus|parent|ERROR' | head -3 | cut -c1-200 || true
}

LOCAL_NET=$'cgroups = "required"\n[sandbox.templates.default]\nnetwork = true\nmin_idle = 2'
DAYTONA=$'cgroups = "off"\n[sandbox.templates.default]\nprovider = "daytona"\nmin_idle = 0'
worker_case privileged-state-0755 0755 /var/lib/shoal "$LOCAL_NET" --privileged --tmpfs /run:rw,mode=0755
worker_case privileged-state-0777 0777 /var/lib/shoal "$LOCAL_NET" --privileged --tmpfs /run:rw,mode=0755
worker_case daytona-nonroot-state-0777 0777 /var/lib/shoal "$DAYTONA" \
  --user 65532:65532 --cap-drop=all --security-opt no-new-privileges
worker_case daytona-nonroot-devshm 0777 /dev/shm/shoal "$DAYTONA" \
  --user 65532:65532 --cap-drop=all --security-opt no-new-privileges

# Clean up the probe namespace's queues, exchanges and keys.
MGMT="${SHOAL_RABBITMQ_MGMT_URL:-http://127.0.0.1:35673}"
for kind in queues exchanges; do
  curl -s -u guest:guest "$MGMT/api/$kind/%2f" \
    | python3 -c "import json,sys; [print(x['name']) for x in json.load(sys.stdin) if x['name'].startswith('$NS.')]" \
    | while read -r item; do curl -s -o /dev/null -u guest:guest -X DELETE "$MGMT/api/$kind/%2f/$item"; done
done
redis_port="${SHOAL__REDIS__URL##*:}"
redis_port="${redis_port%%/*}"
redis-cli -p "$redis_port" --scan --pattern "$NS*" | xargs -r redis-cli -p "$redis_port" del >/dev/null
rm -rf "$STATE"
