#!/usr/bin/env bash
# Local RabbitMQ + Redis for Shoal development and tests, without systemd.
#
# Usage: deploy/local/services.sh COMMAND
#   install           apt-get install the packages, only if something is missing
#   up                install, start Redis and RabbitMQ (no-op if running), write the env file
#   down              stop both (idempotent); leaves no process behind
#   restart-rabbitmq  stop the RabbitMQ node and start it again (data is kept)
#   restart-redis     stop Redis (SHUTDOWN flushes its append-only file) and start it again
#   status            print whether each service is up; exit 0 iff both are
#   env               print the path of the env file
#   rabbitmqctl ARGS  run rabbitmqctl against the local node with the right environment
#
# Everything lives under ${SHOAL_LOCAL_DIR:-<repo root>/.local}; all listeners bind
# 127.0.0.1 on non-default ports (see the SHOAL_* variables below), including a
# private epmd, so a system-wide RabbitMQ/epmd on the default ports is never touched.
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DATA_DIR="${SHOAL_LOCAL_DIR:-$REPO_ROOT/.local}"
case "$DATA_DIR" in
  /*) ;;
  *) DATA_DIR="$PWD/$DATA_DIR" ;;
esac
DATA_DIR="${DATA_DIR%/}"

AMQP_PORT="${SHOAL_AMQP_PORT:-35672}"
MGMT_PORT="${SHOAL_RABBITMQ_MGMT_PORT:-35673}"
PROM_PORT="${SHOAL_RABBITMQ_PROM_PORT:-35692}"
DIST_PORT="${SHOAL_RABBITMQ_DIST_PORT:-35674}"
# Private epmd, so that `epmd -kill` only ever hits the one started for this node.
EPMD_PORT="${SHOAL_EPMD_PORT:-35675}"
# Distribution ports of the rabbitmqctl CLI node. Upstream's default range is
# 35672-35682, which contains the AMQP/management/dist ports above: a CLI call made
# while the broker boots could grab 35672 and make the AMQP listener fail.
CTL_DIST_PORT_MIN="${SHOAL_RABBITMQ_CTL_DIST_PORT_MIN:-35680}"
CTL_DIST_PORT_MAX="${SHOAL_RABBITMQ_CTL_DIST_PORT_MAX:-$((CTL_DIST_PORT_MIN + 10))}"
REDIS_PORT="${SHOAL_REDIS_PORT:-36379}"
NODE="shoal@localhost"
RABBITMQ_START_TIMEOUT="${SHOAL_RABBITMQ_START_TIMEOUT:-60}"
REDIS_START_TIMEOUT="${SHOAL_REDIS_START_TIMEOUT:-15}"

for _v in AMQP_PORT MGMT_PORT PROM_PORT DIST_PORT EPMD_PORT CTL_DIST_PORT_MIN \
  CTL_DIST_PORT_MAX REDIS_PORT RABBITMQ_START_TIMEOUT REDIS_START_TIMEOUT; do
  if ! [[ ${!_v} =~ ^[0-9]+$ ]]; then
    echo "services.sh: $_v must be a number, got '${!_v}'" >&2
    exit 2
  fi
done
unset _v

RMQ_DIR="$DATA_DIR/rabbitmq"
RMQ_PID_FILE="$RMQ_DIR/rabbitmq.pid"
REDIS_DIR="$DATA_DIR/redis"
REDIS_PID_FILE="$REDIS_DIR/redis.pid"
ENV_FILE="$DATA_DIR/env"
LOCK_FILE="$DATA_DIR/.services.lock"

BROKER_URL="amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2f"
REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/"
MGMT_URL="http://127.0.0.1:${MGMT_PORT}"
PROM_URL="http://127.0.0.1:${PROM_PORT}/metrics"

# Debian's /usr/sbin/rabbitmq-* wrappers re-run the real scripts as the `rabbitmq`
# user (su, HOME=/var/lib/rabbitmq, so its .erlang.cookie) when called by root; they
# refuse any other user. Non-root callers use the real scripts directly (cookie in
# their own $HOME) and must own the data dir.
if [[ $(id -u) -eq 0 ]]; then
  AS_ROOT=1
  RMQ_BIN=/usr/sbin
else
  AS_ROOT=0
  RMQ_BIN=/usr/lib/rabbitmq/bin
fi

# Environment honoured by RabbitMQ 3.10 (rabbit_env) and its CLI. Exported for every
# subcommand so rabbitmq-server and rabbitmqctl agree; `su` (without -l) keeps it.
unset RABBITMQ_NODE_IP_ADDRESS RABBITMQ_NODE_PORT RABBITMQ_MNESIA_DIR RABBITMQ_LOGS \
  RABBITMQ_ENABLED_PLUGINS RABBITMQ_PLUGINS_EXPAND_DIR RABBITMQ_FEATURE_FLAGS_FILE \
  RABBITMQ_QUORUM_DIR RABBITMQ_STREAM_DIR RABBITMQ_ERLANG_COOKIE RABBITMQ_BASE
export RABBITMQ_NODENAME="$NODE"
export RABBITMQ_USE_LONGNAME=false
export RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf" # not /etc/rabbitmq/rabbitmq-env.conf
export RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
export RABBITMQ_CONFIG_FILES="$RMQ_DIR/conf.d" # not /etc/rabbitmq/conf.d
export RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
export RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
export RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
export RABBITMQ_LOG_BASE="$RMQ_DIR/log"
export RABBITMQ_PID_FILE="$RMQ_PID_FILE"
export RABBITMQ_DIST_PORT="$DIST_PORT"
export RABBITMQ_CTL_DIST_PORT_MIN="$CTL_DIST_PORT_MIN"
export RABBITMQ_CTL_DIST_PORT_MAX="$CTL_DIST_PORT_MAX"
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export ERL_EPMD_PORT="$EPMD_PORT"
export ERL_EPMD_ADDRESS=127.0.0.1

log() { printf '%s\n' "$*" >&2; }
die() {
  printf 'services.sh: %s\n' "$*" >&2
  exit 1
}

now_ms() {
  local t="${EPOCHREALTIME//[.,]/}"
  echo $((t / 1000))
}
# fmt_since START_MS -> "1.2s"
fmt_since() {
  local d=$(($(now_ms) - $1))
  printf '%d.%ds' $((d / 1000)) $((d % 1000 / 100))
}

# True if the process exists and is not a zombie (this machine's init does not
# reap orphans, so dead daemons linger as zombies under /proc).
pid_alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# pid_from_file FILE COMM_PREFIX -> prints the pid if it is alive and its comm matches.
pid_from_file() {
  local pid comm
  [[ -r $1 ]] || return 1
  pid="$(tr -dc '0-9' <"$1")"
  [[ -n $pid ]] || return 1
  pid_alive "$pid" || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
  [[ $comm == "$2"* ]] || return 1
  echo "$pid"
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_pid_gone PID SECONDS
wait_pid_gone() {
  local deadline=$((SECONDS + $2))
  while pid_alive "$1"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# kill_pid NAME PID: TERM, then KILL, each with a grace period.
kill_pid() {
  pid_alive "$2" || return 0
  log "$1: sending SIGTERM to pid $2"
  kill -TERM "$2" 2>/dev/null || true
  wait_pid_gone "$2" 20 && return 0
  log "$1: sending SIGKILL to pid $2"
  kill -KILL "$2" 2>/dev/null || true
  wait_pid_gone "$2" 10 || die "$1: pid $2 does not die"
}

have() {
  local p
  p="$(command -v "$1" 2>/dev/null)" && [[ -x $p ]] && return 0
  [[ -x /usr/sbin/$1 || -x /usr/bin/$1 ]]
}

# Serialise up/down/restart between concurrent callers (e.g. make -j). flock -o keeps
# the lock in the flock process itself, so the daemons started here never inherit it.
with_lock() {
  if [[ -z ${_SHOAL_SERVICES_LOCKED:-} ]]; then
    mkdir -p "$DATA_DIR"
    _SHOAL_SERVICES_LOCKED=1 exec flock -w 600 -o "$LOCK_FILE" "$BASH" "$SCRIPT_PATH" "$@"
  fi
  unset _SHOAL_SERVICES_LOCKED
}

# ---------------------------------------------------------------- install

POLICY_RC_D=/usr/sbin/policy-rc.d

cmd_install() {
  local missing=() b
  for b in rabbitmq-server redis-server redis-cli bwrap prometheus python3 slirp4netns nft ip git unzip; do
    have "$b" || missing+=("$b")
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  [[ $AS_ROOT -eq 1 ]] || die "missing ${missing[*]}; run as root to apt-get install them"
  log "install: missing ${missing[*]}; installing Debian packages"
  # Keep the packages' init scripts from starting system-wide daemons on the default
  # ports (no systemd here, and nothing would ever stop or reap them).
  local own_policy=0
  if [[ ! -e $POLICY_RC_D ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC_D"
    chmod 755 "$POLICY_RC_D"
    own_policy=1
    trap 'rm -f "$POLICY_RC_D"' EXIT
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    rabbitmq-server redis-server redis-tools bubblewrap prometheus util-linux python3 \
    slirp4netns nftables iproute2 git unzip
  if [[ $own_policy -eq 1 ]]; then
    rm -f "$POLICY_RC_D"
    trap - EXIT
  fi
  for b in rabbitmq-server redis-server redis-cli bwrap epmd slirp4netns nft ip git; do
    have "$b" || die "install: $b still missing after apt-get install"
  done
}

# ---------------------------------------------------------------- redis

redis_pid() { pid_from_file "$REDIS_PID_FILE" redis-server; }

redis_ping() {
  [[ $(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

redis_start() {
  mkdir -p "$REDIS_DIR"
  rm -f "$REDIS_PID_FILE"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
    --dir "$REDIS_DIR" --pidfile "$REDIS_PID_FILE" --logfile "$REDIS_DIR/redis.log" \
    --save "" --appendonly yes ||
    die "redis: redis-server failed to start; see $REDIS_DIR/redis.log"
}

redis_wait_ready() {
  local deadline=$((SECONDS + REDIS_START_TIMEOUT))
  until redis_ping; do
    if ((SECONDS >= deadline)); then
      tail -n 20 "$REDIS_DIR/redis.log" >&2 || true
      die "redis: not answering PING on port $REDIS_PORT after ${REDIS_START_TIMEOUT}s"
    fi
    sleep 0.1
  done
}

redis_stop() {
  local pid t0
  pid="$(redis_pid || true)"
  if [[ -z $pid ]] && ! redis_ping; then
    echo "redis: not running"
    return 0
  fi
  t0="$(now_ms)"
  # AOF is flushed and fsynced on SHUTDOWN, NOSAVE only skips the (disabled) RDB.
  timeout 10 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  if [[ -n $pid ]] && ! wait_pid_gone "$pid" 15; then
    kill_pid redis "$pid"
  fi
  rm -f "$REDIS_PID_FILE"
  echo "redis: stopped in $(fmt_since "$t0")"
}

# ---------------------------------------------------------------- rabbitmq

rmqctl() { "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"; }

rabbit_pid() { pid_from_file "$RMQ_PID_FILE" beam; }

# Registered with our private epmd (asks epmd; starts nothing).
rabbit_registered() {
  have epmd || return 1
  epmd -port "$EPMD_PORT" -names 2>/dev/null | grep -q "^name ${NODE%@*} at port "
}

rabbit_running() {
  rabbit_pid >/dev/null && port_open "$AMQP_PORT"
}

rabbit_write_config() {
  mkdir -p "$RMQ_DIR"/{mnesia,log,conf.d}
  cat >"$RMQ_DIR/rabbitmq.conf" <<EOF
# Generated by deploy/local/services.sh on every start; edit the script, not this file.
listeners.tcp.default = 127.0.0.1:${AMQP_PORT}
management.tcp.ip = 127.0.0.1
management.tcp.port = ${MGMT_PORT}
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = ${PROM_PORT}

# 3 h, above the longest task timeout Shoal accepts (the worker's maximum task
# timeout is 2 h). RabbitMQ closes a channel whose delivery stays unacked longer
# than this, and Shoal keeps a message unacked while its task runs.
consumer_timeout = 10800000

# 16 MiB, above Shoal's broker.max_message_bytes (8 MiB by default): the
# scheduler refuses a larger task at submit (413), so the broker's own limit is
# never what stops a task (docs/adr/0016-message-size.md).
max_message_size = 16777216

# guest/guest stays usable: it is only refused on non-loopback connections.
log.console = false
log.file = shoal.log
log.file.level = info
EOF
  echo '[rabbitmq_management,rabbitmq_prometheus].' >"$RMQ_DIR/enabled_plugins"
  echo '# Intentionally empty: keeps /etc/rabbitmq/rabbitmq-env.conf out.' \
    >"$RMQ_DIR/rabbitmq-env.conf"
  if [[ $AS_ROOT -eq 1 ]]; then
    # The node runs as the `rabbitmq` user (see RMQ_BIN above).
    chown -R rabbitmq:rabbitmq "$RMQ_DIR"
    runuser -u rabbitmq -- test -w "$RMQ_DIR/mnesia" ||
      die "rabbitmq: user 'rabbitmq' cannot write $RMQ_DIR (are all parent dirs world-searchable?); set SHOAL_LOCAL_DIR elsewhere"
  fi
}

rabbit_log_tail() {
  local f
  for f in "$RMQ_DIR/log/startup.log" "$RMQ_DIR/log/shoal.log"; do
    if [[ -s $f ]]; then
      log "---- tail of $f"
      tail -n 25 "$f" >&2 || true
    fi
  done
}

# Launches the node in the background; rabbit_wait_ready waits for it.
rabbit_launch() {
  if port_open "$AMQP_PORT"; then
    die "rabbitmq: port $AMQP_PORT is already in use by another process"
  fi
  rabbit_write_config
  rm -f "$RMQ_PID_FILE"
  "$RMQ_BIN/rabbitmq-server" -detached >"$RMQ_DIR/log/startup.log" 2>&1 || {
    rabbit_log_tail
    die "rabbitmq: rabbitmq-server -detached failed"
  }
}

rabbit_wait_ready() {
  local deadline=$((SECONDS + RABBITMQ_START_TIMEOUT)) start=$SECONDS remaining pid
  while :; do
    remaining=$((deadline - SECONDS))
    if ((remaining <= 0)); then
      rabbit_log_tail
      die "rabbitmq: not ready after ${RABBITMQ_START_TIMEOUT}s"
    fi
    # Fails at once until the node has registered with epmd; then blocks until boot ends.
    if timeout $((remaining + 5)) "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q \
      await_startup --timeout "$remaining" >/dev/null 2>&1 &&
      port_open "$AMQP_PORT"; then
      return 0
    fi
    pid="$(tr -dc '0-9' 2>/dev/null <"$RMQ_PID_FILE" || true)"
    if [[ -n $pid ]] && ! pid_alive "$pid"; then
      rabbit_log_tail
      die "rabbitmq: the node (pid $pid) died while booting"
    fi
    if [[ -z $pid ]] && ((SECONDS - start > 20)); then
      rabbit_log_tail
      die "rabbitmq: no node process 20s after launch"
    fi
    sleep 0.5
  done
}

# rabbit_stop [keep-epmd]
rabbit_stop() {
  local pid t0
  pid="$(rabbit_pid || true)"
  if [[ -z $pid ]] && ! rabbit_registered; then
    echo "rabbitmq: not running"
  else
    t0="$(now_ms)"
    # With the pid file, `stop` also waits until the OS process has exited.
    if [[ -n $pid ]]; then
      timeout 90 "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q stop "$RMQ_PID_FILE" >/dev/null 2>&1 ||
        log "rabbitmq: rabbitmqctl stop failed; killing pid $pid"
      wait_pid_gone "$pid" 30 || kill_pid rabbitmq "$pid"
    else
      timeout 90 "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q stop >/dev/null 2>&1 ||
        log "rabbitmq: rabbitmqctl stop failed (node registered with epmd, no pid file)"
    fi
    rm -f "$RMQ_PID_FILE"
    echo "rabbitmq: stopped in $(fmt_since "$t0")"
  fi
  if [[ ${1:-} != keep-epmd ]]; then
    epmd_kill
  fi
}

# Stops the private epmd (started by the node or by any rabbitmqctl call).
epmd_kill() {
  have epmd || return 0
  local _
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    epmd -port "$EPMD_PORT" -names >/dev/null 2>&1 || return 0
    # Refused while a node is still registered (e.g. a CLI call on its way out).
    epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
    sleep 0.3
  done
  die "epmd: could not stop epmd on port $EPMD_PORT ($(epmd -port "$EPMD_PORT" -names 2>&1 | tr '\n' ' '))"
}

# ---------------------------------------------------------------- env file

write_env_file() {
  local tmp="$ENV_FILE.tmp.$$"
  cat >"$tmp" <<EOF
# Written by deploy/local/services.sh up. KEY=value lines: \`set -a; . FILE; set +a\`
# in bash, \`include FILE\` + \`export\` in make.
SHOAL__BROKER__URL=${BROKER_URL}
SHOAL__REDIS__URL=${REDIS_URL}
SHOAL_RABBITMQ_MGMT_URL=${MGMT_URL}
SHOAL_RABBITMQ_PROM_URL=${PROM_URL}
SHOAL_SERVICES_SCRIPT=${SCRIPT_PATH}
EOF
  mv -f "$tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- commands

cmd_up() {
  cmd_install
  mkdir -p "$DATA_DIR"
  local t0 rabbit_t0="" redis_line rabbit_line
  local rabbit_urls="$BROKER_URL (management $MGMT_URL, metrics $PROM_URL)"

  if rabbit_running; then
    rabbit_line="rabbitmq: already running  $rabbit_urls"
  elif rabbit_pid >/dev/null; then
    # A node process exists but is not listening yet: still booting.
    rabbit_t0="$(now_ms)"
  else
    log "rabbitmq: starting node $NODE"
    rabbit_t0="$(now_ms)"
    rabbit_launch
  fi

  if redis_ping; then
    redis_line="redis:    already running  $REDIS_URL"
  else
    log "redis: starting"
    t0="$(now_ms)"
    redis_start
    redis_wait_ready
    redis_line="redis:    ready in $(fmt_since "$t0")  $REDIS_URL"
  fi

  if [[ -n $rabbit_t0 ]]; then
    rabbit_wait_ready
    rabbit_line="rabbitmq: ready in $(fmt_since "$rabbit_t0")  $rabbit_urls"
  fi

  write_env_file
  echo "$redis_line"
  echo "$rabbit_line"
  echo "env:      $ENV_FILE"
}

cmd_down() {
  rabbit_stop
  redis_stop
}

cmd_restart_rabbitmq() {
  cmd_install
  local t0
  t0="$(now_ms)"
  rabbit_stop keep-epmd
  log "rabbitmq: starting node $NODE"
  local t1
  t1="$(now_ms)"
  rabbit_launch
  rabbit_wait_ready
  echo "rabbitmq: ready in $(fmt_since "$t1") (restart took $(fmt_since "$t0"))  $BROKER_URL"
}

# Redis runs with appendonly yes (see redis_start), so what it acknowledged
# before SHUTDOWN is back after the restart.
cmd_restart_redis() {
  cmd_install
  local t0 t1
  t0="$(now_ms)"
  redis_stop
  log "redis: starting"
  t1="$(now_ms)"
  redis_start
  redis_wait_ready
  echo "redis: ready in $(fmt_since "$t1") (restart took $(fmt_since "$t0"))  $REDIS_URL"
}

cmd_status() {
  local rc=0 pid
  if redis_ping; then
    pid="$(redis_pid || echo '?')"
    echo "redis:    up    $REDIS_URL (pid $pid)"
  else
    echo "redis:    down  $REDIS_URL"
    rc=1
  fi
  if rabbit_running; then
    echo "rabbitmq: up    $BROKER_URL (pid $(rabbit_pid), management $MGMT_URL)"
  elif rabbit_pid >/dev/null; then
    echo "rabbitmq: booting (pid $(rabbit_pid); AMQP port $AMQP_PORT not open yet)"
    rc=1
  else
    echo "rabbitmq: down  $BROKER_URL"
    rc=1
  fi
  return "$rc"
}

usage() {
  sed -n '2,13p' "$SCRIPT_PATH" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

main() {
  (($# >= 1)) || usage
  case "$1" in
  install)
    with_lock "$@"
    cmd_install
    ;;
  up)
    with_lock "$@"
    cmd_up
    ;;
  down)
    with_lock "$@"
    cmd_down
    ;;
  restart-rabbitmq)
    with_lock "$@"
    cmd_restart_rabbitmq
    ;;
  restart-redis)
    with_lock "$@"
    cmd_restart_redis
    ;;
  status) cmd_status ;;
  env) echo "$ENV_FILE" ;;
  rabbitmqctl)
    shift
    exec "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"
    ;;
  -h | --help | help) usage ;;
  *)
    echo "services.sh: unknown command '$1'" >&2
    usage
    ;;
  esac
}

main "$@"
