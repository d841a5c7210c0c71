#!/usr/bin/env bash
# Runs the image built by deploy/docker/build.sh with podman (no daemon) and
# checks it end to end. Not part of `make test` (needs root and the image);
# docs/adr/0021-container-image.md records what it printed.
#
#   1. the default user is the non-root uid 65532; every binary runs;
#   2. --check-config on a mounted file: a good one passes, a bad one fails
#      naming the key;
#   3. bubblewrap inside the container: refused without privileges, works as
#      root with the capability set the chart grants (plus seccomp, AppArmor
#      and /proc unmasked), and privileged;
#   4. the scheduler (non-root) serves /healthz and /readyz against the local
#      RabbitMQ and Redis (deploy/local/services.sh) and stops cleanly on
#      SIGTERM;
#   5. a worker (root, local bubblewrap sandboxes) runs a real exec task the
#      containerised `shoal` CLI submits through that scheduler, and drains
#      and exits 0 on SIGTERM.
#
# Podman runs with the flags this machine needs: runc, cgroupfs, file events,
# explicit ulimits and host networking (never podman's default bridge).
# Environment: SHOAL_IMAGE (default localhost/shoal:dev), SHOAL_IMAGE_STORE.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${SHOAL_IMAGE:-localhost/shoal:dev}
# build.sh's container store.
STORE=${SHOAL_IMAGE_STORE:-$PWD/.local/image/storage}
PODMAN=(podman --root "$STORE" --runroot "$STORE-run" --storage-driver vfs
  --runtime runc --cgroup-manager cgroupfs --events-backend file)
RUN=("${PODMAN[@]}" run --rm --network host --ulimit nofile=1024:1024 --ulimit nproc=1000:1000)
# The local worker's privileges without --privileged (docs/adr/0021): the
# chart's capability list, no seccomp/AppArmor filter, an unmasked /proc.
CAPS_MASKED=(--cap-drop ALL --cap-add CHOWN,DAC_OVERRIDE,FOWNER,KILL,SETUID,SETGID,SYS_ADMIN,NET_ADMIN
  --security-opt seccomp=unconfined --security-opt apparmor=unconfined)
LOCAL_CAPS=("${CAPS_MASKED[@]}" --security-opt unmask=ALL)
BWRAP=(bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev true)

WORK=$(mktemp -d)
NAME=shoal-smoke-$$
containers=()
cleanup() {
  for c in "${containers[@]}"; do
    "${PODMAN[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

FAILURES=0
CHECKS=0
pass() { CHECKS=$((CHECKS + 1)); printf '  ok    %s\n' "$*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILURES=$((FAILURES + 1)); printf '  FAIL  %s\n' "$*" >&2; }
die() { printf 'smoke.sh: ERROR: %s\n' "$*" >&2; exit 1; }
# expect DESCRIPTION COMMAND...: passes when COMMAND exits 0, shows its output.
expect() {
  local what=$1
  shift
  local out
  if out=$("$@" 2>&1); then
    pass "$what: $(head -c 300 <<<"$out" | tr '\n' ' ')"
  else
    fail "$what (exit $?): $out"
  fi
}
# refuse DESCRIPTION NEEDLE COMMAND...: passes when COMMAND fails and its
# output contains NEEDLE.
refuse() {
  local what=$1 needle=$2
  shift 2
  local out status=0
  out=$("$@" 2>&1) || status=$?
  if [[ $status -ne 0 && $out == *"$needle"* ]]; then
    pass "$what: exit $status: $(head -c 300 <<<"$out" | tr '\n' ' ')"
  else
    fail "$what: expected a failure naming '$needle', got exit $status: $out"
  fi
}
# wait_http URL SECONDS: until URL answers 2xx.
wait_http() {
  local deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    curl -fsS -m 2 "$1" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

command -v podman >/dev/null || die "podman is missing (apt-get install podman runc)"
"${PODMAN[@]}" image exists "$IMAGE" || die "no image $IMAGE: run deploy/docker/build.sh (make image)"
echo "smoke.sh: $IMAGE ($("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE") bytes)"

# ---- 1. user and binaries ----------------------------------------------------
uid=$("${RUN[@]}" "$IMAGE" id -u 2>&1) || true
[[ $uid == 65532 ]] && pass "default user is uid 65532 (non-root)" || fail "default user: $uid"
for binary in shoal-worker shoal-scheduler shoal; do
  expect "$binary --version" "${RUN[@]}" "$IMAGE" "$binary" --version
done
# The launcher has no --version; it refuses an unknown argument by name.
refuse "shoal-sandbox-exec runs" 'unknown argument' "${RUN[@]}" "$IMAGE" shoal-sandbox-exec --version
expect "tools on PATH" "${RUN[@]}" "$IMAGE" sh -c \
  'for t in bwrap slirp4netns nft ip unshare git python3; do command -v $t >/dev/null || { echo "missing $t"; exit 1; }; done; echo all present'

# ---- 2. --check-config ---------------------------------------------------------
cat >"$WORK/good.toml" <<'EOF'
namespace = "smoke"
[worker]
slots = 2
[sandbox.templates.default]
min_idle = 0
EOF
sed 's/slots = 2/slots = 0/' "$WORK/good.toml" >"$WORK/bad.toml"
chmod 0644 "$WORK"/*.toml
for binary in shoal-worker shoal-scheduler; do
  expect "$binary --check-config (good file)" "${RUN[@]}" -v "$WORK/good.toml:/etc/shoal/shoal.toml:ro" \
    "$IMAGE" "$binary" --check-config --config /etc/shoal/shoal.toml
  refuse "$binary --check-config (bad file)" 'worker.slots' "${RUN[@]}" \
    -v "$WORK/bad.toml:/etc/shoal/shoal.toml:ro" "$IMAGE" "$binary" --check-config --config /etc/shoal/shoal.toml
  refuse "$binary --check-config (bad env override)" 'worker.slots' "${RUN[@]}" -e SHOAL__WORKER__SLOTS=0 \
    -v "$WORK/good.toml:/etc/shoal/shoal.toml:ro" "$IMAGE" "$binary" --check-config --config /etc/shoal/shoal.toml
done

# ---- 3. bubblewrap ---------------------------------------------------------------
# As the worker runs it: shoal-sandbox-exec (root) drops to a sandbox uid and
# execs bubblewrap, which makes its own user, pid, mount, net, ipc and uts
# namespaces and mounts a fresh /proc.
SANDBOXED=(shoal-sandbox-exec --uid=310099 --rlimits=1073741824,104857600,256,64,30 -- "${BWRAP[@]}")
refuse "bwrap as the non-root default user: the runtime's masked /proc refuses a new proc mount" \
  "Can't mount proc" "${RUN[@]}" "$IMAGE" "${BWRAP[@]}"
refuse "bwrap run directly as root, the chart's capabilities, /proc unmasked: no CAP_SETFCAP to map uid 0" \
  'uid map' "${RUN[@]}" --user 0 "${LOCAL_CAPS[@]}" "$IMAGE" "${BWRAP[@]}"
refuse "the launcher's sandbox with the chart's capabilities but /proc masked" \
  "Can't mount proc" "${RUN[@]}" --user 0 "${CAPS_MASKED[@]}" "$IMAGE" "${SANDBOXED[@]}"
expect "the launcher's sandbox (root -> uid 310099 -> bwrap --unshare-all) with the chart's capabilities, /proc unmasked" \
  "${RUN[@]}" --user 0 "${LOCAL_CAPS[@]}" "$IMAGE" sh -c "${SANDBOXED[*]} && echo sandbox ran"
expect "bwrap --unshare-all as root: the chart's capabilities + SETFCAP, /proc unmasked" \
  "${RUN[@]}" --user 0 "${LOCAL_CAPS[@]}" --cap-add SETFCAP "$IMAGE" sh -c "${BWRAP[*]} && echo sandbox ran"
expect "bwrap --unshare-all privileged" "${RUN[@]}" --user 0 --privileged "$IMAGE" sh -c "${BWRAP[*]} && echo sandbox ran"

# ---- 4. scheduler ------------------------------------------------------------------
env_file=$(bash deploy/local/services.sh env 2>/dev/null || true)
if [[ -z $env_file || ! -f $env_file ]] || ! bash deploy/local/services.sh status >/dev/null 2>&1; then
  fail "local RabbitMQ and Redis are not up (bash deploy/local/services.sh up): scheduler and worker not checked"
else
  # shellcheck source=/dev/null
  set -a; . "$env_file"; set +a
  namespace=smoke$$
  port=$(free_port)
  metrics_port=$(free_port)
  common=(--network host -e "SHOAL__BROKER__URL=$SHOAL__BROKER__URL" -e "SHOAL__REDIS__URL=$SHOAL__REDIS__URL"
    -e "SHOAL__NAMESPACE=$namespace" -v "$WORK/good.toml:/etc/shoal/shoal.toml:ro")
  "${PODMAN[@]}" run -d --name "$NAME-scheduler" "${common[@]}" --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
    -e "SHOAL__SCHEDULER__LISTEN=127.0.0.1:$port" "$IMAGE" shoal-scheduler --config /etc/shoal/shoal.toml >/dev/null
  containers+=("$NAME-scheduler")
  if wait_http "http://127.0.0.1:$port/readyz" 90; then
    pass "scheduler (uid 65532) /healthz: $(curl -fsS "http://127.0.0.1:$port/healthz"), /readyz: $(curl -fsS "http://127.0.0.1:$port/readyz")"
  else
    fail "scheduler not ready on 127.0.0.1:$port within 90 s: $("${PODMAN[@]}" logs "$NAME-scheduler" 2>&1 | tail -n 20)"
  fi

  # ---- 5. worker + a task ----------------------------------------------------------
  # A uid range of its own (the host's test suites use the default one).
  "${PODMAN[@]}" run -d --name "$NAME-worker" "${common[@]}" --user 0 "${LOCAL_CAPS[@]}" \
    --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
    -e "SHOAL__WORKER__METRICS_LISTEN=127.0.0.1:$metrics_port" -e SHOAL__WORKER__DRAIN_TIMEOUT_S=20 \
    -e SHOAL__SANDBOX__UID_BASE=310000 -e SHOAL__SANDBOX__UID_COUNT=100 \
    "$IMAGE" shoal-worker --config /etc/shoal/shoal.toml >/dev/null
  containers+=("$NAME-worker")
  if wait_http "http://127.0.0.1:$metrics_port/metrics" 90; then
    pass "worker (root, chart capabilities) serves /metrics on 127.0.0.1:$metrics_port"
  else
    fail "worker /metrics not up within 90 s: $("${PODMAN[@]}" logs "$NAME-worker" 2>&1 | tail -n 20)"
  fi
  out=$("${RUN[@]}" "$IMAGE" timeout 120 shoal --server "http://127.0.0.1:$port" -o json submit \
    --exec 'echo "hello from $(id -u) in $(pwd)"; cat /proc/1/comm' --wait 2>&1) || true
  if [[ $out == *'"succeeded"'* && $out == *"hello from"* ]]; then
    pass "an exec task ran in a bubblewrap sandbox in the worker's container: $(grep -o '"state": *"[a-z]*"\|"sandbox_id": *"[^"]*"\|hello from[^"]*' <<<"$out" | tr '\n' ' ')"
  else
    fail "the exec task did not succeed: $out
worker log: $("${PODMAN[@]}" logs "$NAME-worker" 2>&1 | tail -n 30)"
  fi
  echo "        worker's startup warnings: $("${PODMAN[@]}" logs "$NAME-worker" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -i 'warn' | head -n 5)"
  metrics=$(curl -fsS "http://127.0.0.1:$metrics_port/metrics" || true)
  if grep -q '^shoal_tasks_finished_total{kind="exec",state="succeeded"} 1$' <<<"$metrics"; then
    pass "worker /metrics counts it: $(grep '^shoal_tasks_finished_total' <<<"$metrics" | tr '\n' ' ')"
  else
    fail "worker /metrics lacks the finished task: $(grep '^shoal_' <<<"$metrics" | head -n 20)"
  fi
  for c in worker scheduler; do
    "${PODMAN[@]}" stop -t 60 "$NAME-$c" >/dev/null 2>&1 || true
    code=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$NAME-$c" 2>&1 || true)
    if [[ $code == 0 ]]; then
      pass "$c stopped on SIGTERM with exit 0: $("${PODMAN[@]}" logs "$NAME-$c" 2>&1 | grep -o '"message":"[^"]*stopped"\|[a-z]* stopped' | tail -n 1)"
    else
      fail "$c exit code after SIGTERM: $code; log: $("${PODMAN[@]}" logs "$NAME-$c" 2>&1 | tail -n 10)"
    fi
  done
fi

echo "smoke: $((CHECKS - FAILURES)) passed, $FAILURES failed"
[[ $FAILURES -eq 0 ]]
