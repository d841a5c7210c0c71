#!/usr/bin/env bash
# `make demo-check` (not in CI): the demo with the real local model, checked.
# Passes when the agent task succeeded, fib.py is in the sandbox's final file
# listing, and the last run of fib.py the agent made printed exactly the first
# 20 Fibonacci numbers. SHOAL_DEMO_CHECK_LOG names the log (for trials).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .local/demo
log=${SHOAL_DEMO_CHECK_LOG:-.local/demo/demo-check.log}
unset ANTHROPIC_API_KEY OPENAI_API_KEY SHOAL_DEMO_LLM_URL
status=0
bash deploy/local/demo.sh 2>&1 | tee "$log" || status=$?
fail() { echo "demo-check: FAILED: $*" >&2; exit 1; }
[ "$status" = 0 ] || fail "the demo exited $status"
grep -q "state     succeeded" "$log" || fail "the task did not succeed"
grep -E "^files .*fib\.py" "$log" >/dev/null || fail "fib.py is not in the workspace listing"
python3 deploy/local/check-fib-output.py "$log" || fail "fib.py's output is wrong"
echo "demo-check: passed"
