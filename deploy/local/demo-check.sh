#!/usr/bin/env bash
# `make demo-check` (not in CI): the demo with the real local model, checked.
# Passes when the agent task succeeded, fib.py is in the sandbox's final file
# listing, and the answer has the 20th Fibonacci number.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .local/demo
log=.local/demo/demo-check.log
unset ANTHROPIC_API_KEY OPENAI_API_KEY SHOAL_DEMO_LLM_URL
status=0
bash deploy/local/demo.sh 2>&1 | tee "$log" || status=$?
fail() { echo "demo-check: FAILED: $*" >&2; exit 1; }
[ "$status" = 0 ] || fail "the demo exited $status"
grep -q "state     succeeded" "$log" || fail "the task did not succeed"
grep -E "^files .*fib\.py" "$log" >/dev/null || fail "fib.py is not in the workspace listing"
grep -q "4181" "$log" || fail "the answer lacks the 20th Fibonacci number (4181)"
echo "demo-check: passed"
