#!/usr/bin/env bash
# `make chaos`: the fleet chaos run (ADR 0034) against RabbitMQ and Redis of its
# own, so that restarting them never disturbs the services `make up` started.
#
# Builds the binaries, starts private services (data in .local/chaos, ports in
# the 4xxxx range; Redis with appendonly on, as deploy/local/services.sh always
# starts it), runs `shoal-chaos` (3 workers x 8 slots, 1,000 tasks, a worker
# kill -9 every 5 s, one RabbitMQ and one Redis restart), which writes
# docs/RELIABILITY.md, and stops the services. Extra arguments go to
# shoal-chaos (e.g. `CHAOS_ARGS="--exec 200 --agents 20"`).
set -euo pipefail
cd "$(dirname "$0")/.."
export SHOAL_LOCAL_DIR="${SHOAL_CHAOS_DIR:-$PWD/.local/chaos}"
export SHOAL_AMQP_PORT="${SHOAL_CHAOS_AMQP_PORT:-45772}"
export SHOAL_RABBITMQ_MGMT_PORT=$((SHOAL_AMQP_PORT + 1))
export SHOAL_RABBITMQ_PROM_PORT=$((SHOAL_AMQP_PORT + 2))
export SHOAL_RABBITMQ_DIST_PORT=$((SHOAL_AMQP_PORT + 3))
export SHOAL_EPMD_PORT=$((SHOAL_AMQP_PORT + 4))
export SHOAL_RABBITMQ_CTL_DIST_PORT_MIN=$((SHOAL_AMQP_PORT + 5))
export SHOAL_RABBITMQ_CTL_DIST_PORT_MAX=$((SHOAL_AMQP_PORT + 10))
export SHOAL_REDIS_PORT="${SHOAL_CHAOS_REDIS_PORT:-46479}"
services=deploy/local/services.sh

cargo build -p shoal-scheduler -p shoal-worker -p shoal-tests --bins

bash "$services" up
stop() { bash "$services" down || true; }
trap stop EXIT
set -a
# shellcheck source=/dev/null
. "$(bash "$services" env)"
set +a

# shellcheck disable=SC2086 # CHAOS_ARGS is a list of arguments
target/debug/shoal-chaos --report docs/RELIABILITY.md ${CHAOS_ARGS:-}
