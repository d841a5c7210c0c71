#!/usr/bin/env bash
# Trials of the demo on the real local model: runs demo-check N times
# (default 5) with the services and the model kept up between runs, and
# prints a Markdown table (result, LLM calls, tokens, wall time per run) for
# docs/demo-trials.md. Logs in .local/demo/trials/.
#   deploy/local/demo-trials.sh [N]      SHOAL_DEMO_MODEL=0.5b for the small one
set -uo pipefail
cd "$(dirname "$0")/../.."
n=${1:-5}
dir=.local/demo/trials
mkdir -p "$dir"
started_llm=0 started_services=0
if ! bash deploy/local/services.sh status >/dev/null 2>&1; then
  bash deploy/local/services.sh up >/dev/null || exit 1
  started_services=1
fi
if ! bash deploy/local/llm.sh status >/dev/null 2>&1; then
  bash deploy/local/llm.sh start || exit 1
  started_llm=1
fi
passed=0
echo "| run | result | LLM calls | tokens in / out | wall time (submit → end) | failure |"
echo "|---|---|---:|---|---:|---|"
for i in $(seq 1 "$n"); do
  log=$dir/run-$i.log
  SHOAL_DEMO_CHECK_LOG=$log bash deploy/local/demo-check.sh >/dev/null 2>"$log.err"
  rc=$?
  outcome=$(grep -E "^outcome " "$log" | tail -n 1)
  calls=$(sed -nE 's/.*\(([0-9]+) LLM calls.*/\1/p' <<<"$outcome")
  tokens=$(sed -nE 's/.*LLM calls, ([0-9]+) tokens in, ([0-9]+) out.*/\1 \/ \2/p' <<<"$outcome")
  wall=$(sed -nE 's/.*(finished the task in |did not succeed [(])([0-9.]+)s.*/\2 s/p' "$log" | tail -n 1)
  if [ "$rc" = 0 ]; then
    result=pass; passed=$((passed + 1)); why=""
  else
    result=FAIL; why=$(grep -h "demo-check: FAILED" "$log.err" | sed 's/demo-check: FAILED: //' | tail -n 1)
    [ -n "$why" ] || why=$(python3 deploy/local/check-fib-output.py "$log" 2>&1 | tail -n 1)
  fi
  echo "| $i | $result | ${calls:-—} | ${tokens:-—} | ${wall:-—} | ${why} |"
done
echo
echo "**$passed of $n passed.**"
[ "$started_llm" = 1 ] && bash deploy/local/llm.sh stop
[ "$started_services" = 1 ] && bash deploy/local/services.sh down >/dev/null
[ "$passed" -ge $(( (n * 4 + 4) / 5 )) ]
