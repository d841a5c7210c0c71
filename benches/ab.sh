#!/usr/bin/env bash
# Same-run A/B of two revisions: `bash benches/ab.sh BASE_REV [HEAD_REV] [-- shoal-bench args]`.
#
# Both revisions are checked out as git worktrees under .local/ab/<rev> and
# built (release shoal-bench, shoal-llm-sim, shoal-sandbox-exec) each with its
# own target dir, .local/ab/target-<rev>: no fight over the main target dir's
# lock, and the main tree's build is never overwritten. Each side's
# shoal-bench finds its own shoal-llm-sim and shoal-sandbox-exec next to
# itself (current_exe), so each side runs its own build throughout.
#
# The benchmark then runs alternately against the same local services
# (RabbitMQ/Redis from .local/env), N rounds (default 5), and the order within a
# round flips every round (B A, A B, B A, ...) so neither side always runs
# first. On a shared, noisy machine this interleaving is what makes the ratio
# fair: slow periods hit both sides alike. Every run writes its own report
# (--out is set by this script; docs/BENCHMARKS.md is never written), the
# figures of each report's markdown tables are extracted, and a table prints
# per figure the median of each side, the ratio head/base and the spread.
#
# Options before `--`:
#   -n N, --rounds N   rounds (one run of each side per round); default 5, or $AB_ROUNDS
#   --no-build         use the existing builds (fails if a binary is missing)
#   --parse DIR        only summarise the reports already in DIR (from an earlier run)
# HEAD_REV defaults to HEAD. Arguments after `--` go to both shoal-bench runs
# (e.g. `-- --only agent`); both revisions' shoal-bench must accept them.
#
# Output: the summary on stdout, and everything (reports, per-run log with the
# load average, summary.md) in .local/ab/runs-<UTC time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit "${1:-2}"
}
die() {
  echo "ab.sh: $*" >&2
  exit 1
}

rounds=${AB_ROUNDS:-5}
build=1
parse_dir=
revs=()
bench_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; bench_args=("$@"); break ;;
    -n | --rounds) rounds=${2:?}; shift 2 ;;
    --no-build) build=0; shift ;;
    --parse) parse_dir=${2:?}; shift 2 ;;
    -h | --help) usage 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) revs+=("$1"); shift ;;
  esac
done

command -v python3 >/dev/null || die "python3 is needed to read the reports' tables"

# Summarise DIR/{base,head}-*.md: per figure, median of each side, head/base, spread.
summarise() {
  python3 - "$1" "$2" "$3" <<'PY'
import glob, os, re, statistics, sys

out_dir, base_name, head_name = sys.argv[1:4]
NUM = re.compile(r"^\**\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*(/s|[A-Za-z%×µ][A-Za-z/%]*)?")
SENTENCE = re.compile(r"^(?P<label>[A-Z][^:|*]{2,80}?):\s*\**(?P<num>[0-9][0-9,]*(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z/%]+)?\**\s*(\([^)]*\))?\s*$")
SKIP_COLUMNS = {"rounds", "samples"}

def figures(path):
    """{figure name: (value, unit)} from a shoal-bench markdown report."""
    found = {}
    section = ""
    prose = ""  # the last prose line: "(ms; ...)" before a table gives its bare numbers a unit
    lines = open(path, encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("## "):
            section = re.sub(r"\s*\(issue \d+\)", "", line[3:]).strip()
            # The demo trials are hand-made records carried into every report.
            if section.startswith("Local model demo"):
                break
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header = [c.strip() for c in line.strip("|").split("|")]
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                label = cells[0]
                for col, cell in zip(header[1:], cells[1:]):
                    if col.lower() in SKIP_COLUMNS:
                        continue
                    m = NUM.match(cell)
                    if not m:
                        continue
                    name = f"{section}: {label}" + (f" [{col}]" if len(header) > 2 else "")
                    unit = m.group(2) or ("ms" if re.search(r"\(ms\b", prose) else "")
                    found[name] = (float(m.group(1).replace(",", "")), unit)
                i += 1
            continue
        if section and line and not line.startswith(("-", "#", "|")):
            prose = line
            ratio = re.match(r"^\*\*Ratio: (.*?) (-?[0-9][0-9.]*)(%|×)", line)
            if ratio:
                found[f"{section}: Ratio: {ratio.group(1)} …"] = (float(ratio.group(2)), ratio.group(3))
            for sentence in re.split(r"(?<=\.)\s+", line.replace("**", "")):
                m = SENTENCE.match(sentence.rstrip("."))
                if m:
                    found[f"{section}: {m.group('label')}"] = (
                        float(m.group("num").replace(",", "")), m.group("unit") or "")
        i += 1
    return found

def side(prefix):
    runs = {}
    for p in glob.glob(os.path.join(out_dir, f"{prefix}-*.md")):
        runs[os.path.basename(p)[len(prefix) + 1:-3]] = figures(p)
    return runs

base_by_round, head_by_round = side("base"), side("head")
base, head = list(base_by_round.values()), list(head_by_round.values())
paired_rounds = sorted(set(base_by_round) & set(head_by_round))
if not base or not head:
    sys.exit(f"ab.sh: no reports in {out_dir} (base {len(base)}, head {len(head)})")

def better(name, unit):
    """+1 when higher is better, -1 when lower is better, 0 when unknown."""
    if "/s" in unit or unit == "%" or "per second" in name.lower():
        return 1
    if unit in ("ms", "s", "µs", "KiB", "MiB"):
        return -1
    return 0

def fmt(v):
    a = abs(v)
    if a >= 100: return f"{v:.0f}"
    if a >= 10: return f"{v:.1f}"
    if a >= 1: return f"{v:.2f}"
    return f"{v:.4f}".rstrip("0") if a else "0"

names = []
for run in head + base:
    for name in run:
        if name not in names:
            names.append(name)

rows = []
for name in names:
    b = [r[name][0] for r in base if name in r]
    h = [r[name][0] for r in head if name in r]
    if not b or not h:
        rows.append((name, "", "", "", "", "", "", "missing on one side"))
        continue
    unit = next(r[name][1] for r in base + head if name in r)
    mb, mh = statistics.median(b), statistics.median(h)
    ratio = mh / mb if mb else float("nan")
    # Verdict: the head median outside the whole range of the base runs (and
    # the base median outside the head range) in the worse or better direction.
    direction = better(name, unit)
    if direction == 0 or len(b) < 2 or len(h) < 2:
        verdict = ""
    elif min(b) <= mh <= max(b) or min(h) <= mb <= max(h):
        verdict = "within noise"
    else:
        verdict = "better" if (mh - mb) * direction > 0 else "WORSE"
    # Each round's head/base: the two runs of one round ran back to back.
    pairs = [head_by_round[r][name][0] / base_by_round[r][name][0] for r in paired_rounds
             if name in head_by_round[r] and name in base_by_round[r] and base_by_round[r][name][0]]
    if pairs and direction:
        worse = sum(1 for q in pairs if (q - 1) * direction < 0)
        paired = f"{statistics.median(pairs):.3f} ({min(pairs):.2f}–{max(pairs):.2f}); head worse in {worse}/{len(pairs)}"
    elif pairs:
        paired = f"{statistics.median(pairs):.3f} ({min(pairs):.2f}–{max(pairs):.2f})"
    else:
        paired = ""
    u = f" {unit}" if unit else ""
    spread = lambda xs: f"{fmt(min(xs))}–{fmt(max(xs))}" + (f" (±{(max(xs) - min(xs)) / 2 / statistics.median(xs) * 100:.0f}%)" if statistics.median(xs) else "")
    rows.append((name, fmt(mb) + u, fmt(mh) + u, f"{ratio:.3f}", paired, spread(b), spread(h), verdict))

lines = [
    f"base = {base_name}, head = {head_name}; {len(base)} runs of base, {len(head)} of head, interleaved.",
    "",
    "| figure | base median | head median | head/base (medians) | head/base per round: median (min–max) | base min–max (±half-range) | head min–max (±half-range) | verdict |",
    "|---|---:|---:|---:|---|---|---|---|",
]
lines += ["| " + " | ".join(r) + " |" for r in rows]
lines += [
    "",
    "verdict: WORSE/better when each side's median lies outside the other side's whole min–max range, "
    "in the bad/good direction of the unit (ms, s, KiB lower is better; /s and % higher); otherwise within noise.",
]
text = "\n".join(lines) + "\n"
open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8").write(text)
print(text, end="")
PY
}

if [ -n "$parse_dir" ]; then
  base_name=$(cat "$parse_dir/base.rev" 2>/dev/null || echo base)
  head_name=$(cat "$parse_dir/head.rev" 2>/dev/null || echo head)
  summarise "$parse_dir" "$base_name" "$head_name"
  exit 0
fi

[ ${#revs[@]} -ge 1 ] && [ ${#revs[@]} -le 2 ] || usage
case $rounds in '' | *[!0-9]* | 0) die "rounds must be a positive integer, not '$rounds'" ;; esac
for a in "${bench_args[@]}"; do
  case $a in --out | --out=*) die "--out is set per run by this script" ;; esac
done

git check-ignore -q .local/ab/probe || die ".local/ab is not ignored by git (.gitignore must cover /.local)"
mkdir -p .local/ab

resolve() { git rev-parse --short=7 --verify "$1^{commit}" 2>/dev/null || die "not a revision: $1"; }
base=$(resolve "${revs[0]}")
head=$(resolve "${revs[1]:-HEAD}")
[ "$base" != "$head" ] || die "base and head are the same commit ($base)"

bins=(shoal-bench shoal-llm-sim shoal-sandbox-exec)

# Worktree .local/ab/<rev> at <rev>, built into .local/ab/target-<rev>.
prepare() {
  local rev=$1 tree=$root/.local/ab/$1 target=$root/.local/ab/target-$1
  if [ -e "$tree" ]; then
    [ "$(git -C "$tree" rev-parse --short=7 HEAD)" = "$rev" ] || die "$tree exists but is not at $rev"
  else
    git worktree add --detach "$tree" "$rev" >&2
  fi
  if [ "$build" = 1 ]; then
    # Seed a new target dir from the other side's: the registry crates are the
    # same artifacts (cargo keys them by version and flags, not by worktree),
    # so only the workspace crates and changed dependencies compile again.
    if [ ! -d "$target/release" ] && [ -n "${2:-}" ] && [ -d "$root/.local/ab/target-$2/release" ]; then
      echo "ab.sh: seeding $target from target-$2" >&2
      mkdir -p "$target"
      cp -a "$root/.local/ab/target-$2/release" "$target/"
    fi
    echo "ab.sh: building $rev (target dir $target)" >&2
    (cd "$tree" && CARGO_TARGET_DIR=$target cargo build --release --locked \
      -p shoal-tests --bin shoal-bench --bin shoal-llm-sim \
      -p shoal-worker --bin shoal-sandbox-exec) >&2
  fi
  for b in "${bins[@]}"; do
    [ -x "$target/release/$b" ] || die "$target/release/$b missing (build failed?)"
  done
}
prepare "$base"
prepare "$head" "$base"

# Both sides must take the same arguments: every --flag given must be in both --help texts.
for rev in "$base" "$head"; do
  help=$("$root/.local/ab/target-$rev/release/shoal-bench" --help)
  for a in "${bench_args[@]}"; do
    case $a in
      --*) flag=${a%%=*}
        grep -q -- "$flag\b" <<<"$help" || die "shoal-bench at $rev does not accept $flag" ;;
    esac
  done
done

services=deploy/local/services.sh
bash "$services" status >/dev/null 2>&1 || bash "$services" up >&2
set -a
# shellcheck source=/dev/null
. "$(bash "$services" env)"
set +a
# The launcher must come from next to each side's shoal-bench, not from settings.
unset SHOAL__SANDBOX__LAUNCHER
# A thousand concurrent conversations hold a thousand connections.
ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true

out=$root/.local/ab/runs-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
echo "$base" >"$out/base.rev"
echo "$head" >"$out/head.rev"
{
  echo "base $base, head $head, rounds $rounds, args: ${bench_args[*]:-(none)}"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), started $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
} | tee "$out/runs.log" >&2

run() { # side rev round
  local side=$1 rev=$2 r=$3 t0 t1
  t0=$(date +%s%N)
  # cwd = the main tree: the submit section finds the services' pid files
  # under .local/ by a relative path (for their CPU use). The report goes to
  # --out, never to docs/BENCHMARKS.md.
  (cd "$root" &&
    "$root/.local/ab/target-$rev/release/shoal-bench" --out "$out/$side-$(printf %02d "$r").md" "${bench_args[@]}") \
    >"$out/$side-$(printf %02d "$r").log" 2>&1 ||
    die "run $r of $side ($rev) failed; see $out/$side-$(printf %02d "$r").log"
  t1=$(date +%s%N)
  printf 'round %2d %-4s %s  %6d ms  load before: %s\n' "$r" "$side" "$rev" \
    $(((t1 - t0) / 1000000)) "$4" | tee -a "$out/runs.log" >&2
}
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then order="head base"; else order="base head"; fi
  for side in $order; do
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    if [ "$side" = base ]; then run base "$base" "$r" "$load"; else run head "$head" "$r" "$load"; fi
  done
done
echo "finished $(date -u '+%Y-%m-%d %H:%M:%S UTC'); reports in $out" | tee -a "$out/runs.log" >&2

summarise "$out" "$base" "$head"
