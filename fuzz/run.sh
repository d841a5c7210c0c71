#!/usr/bin/env bash
# `make fuzz`: builds the fuzz targets once, then runs each for FUZZ_SECONDS
# (default 60), one after the other on one core. A crash stops the run; its
# input is saved under fuzz/artifacts/<target>/ (turn it into a regression
# test next to the parser, then fix the parser).
#
#   FUZZ_SECONDS=600 make fuzz              longer runs
#   FUZZ_TARGETS="task_spec" make fuzz      a subset
#   FUZZ_SANITIZER=address make fuzz        with AddressSanitizer
#
# Sanitizer: `none` by default. Everything fuzzed here is safe Rust, so ASan
# would find nothing that Rust's own checks miss, and it halves throughput;
# libFuzzer still catches every panic (libfuzzer-sys turns it into an abort).
# ASan needs `-Zsanitizer`, a nightly flag, so RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept it (checked with Rust 1.95: the ASan build works).
# The coverage instrumentation (`-Cpasses=sancov-module`) is stable, but we
# set it for every sanitizer: cargo fingerprints it, and switching would
# rebuild every dependency.
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-none}
read -r -a targets <<<"${FUZZ_TARGETS:-task_spec llm_openai llm_anthropic llm_tool_text}"

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1

# Release with debug assertions (cargo fuzz's default): integer overflow
# panics here even though the production profile would wrap.
cargo fuzz build --sanitizer "$sanitizer"

for target in "${targets[@]}"; do
  # The fuzzer adds what it finds to the first directory; the committed seeds
  # in corpus/ stay as they are.
  grown=target/corpus/$target
  mkdir -p "$grown"
  dict=()
  [[ -f dict/$target.dict ]] && dict=("-dict=dict/$target.dict")
  echo "== $target: ${seconds}s"
  cargo fuzz run --sanitizer "$sanitizer" "$target" "$grown" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 "${dict[@]}"
done
