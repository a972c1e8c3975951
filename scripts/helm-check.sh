#!/usr/bin/env bash
# The Helm chart's check (`make test-helm`, run by CI after the test suite):
#   1. Helm v4.3.2, built once with `go install` into
#      ${XDG_CACHE_HOME:-~/.cache}/outboxd/helm-v4.3.2 (the Go module proxy is
#      the only network it needs, and only then);
#   2. `helm lint --strict` and `helm template` of deploy/helm/outboxd with
#      each of its values files (the defaults and ci/*-values.yaml), and of
#      the sidecar example deploy/helm/examples/order-service;
#   3. renders the chart must refuse (a grace period not above
#      relay.shutdown_grace, a Secret key outboxd does not read);
#   4. every rendered manifest, and deploy/kubernetes/order-service-with-outboxd.yaml,
#      decoded strictly into the Kubernetes API types and cross-checked
#      (deploy/helm/validate), with each outboxd.yaml loaded by the relay
#      itself (`outboxd migrate --print`: it validates the config and
#      connects to nothing).
# Needs Go and the outboxd binary (OUTBOXD_BIN, default target/debug/outboxd;
# `make test-helm` builds it). A few seconds once Helm is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

HELM_VERSION=v4.3.2
cache="${XDG_CACHE_HOME:-$HOME/.cache}/outboxd"
helm_dir="$cache/helm-$HELM_VERSION"
helm="$helm_dir/helm"
outboxd="${OUTBOXD_BIN:-$root/target/debug/outboxd}"
chart=deploy/helm/outboxd
example=deploy/helm/examples/order-service
raw=deploy/kubernetes/order-service-with-outboxd.yaml

die() { echo "helm-check: $*" >&2; exit 1; }

# The machine's Go (its usual place, in case PATH lacks it).
command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && PATH="$PATH:/usr/local/go/bin"; } || true
command -v go >/dev/null || die "needs Go (go install builds Helm; the validator is a Go program)"
[ -x "$outboxd" ] || die "no outboxd binary at $outboxd: run \`make build\` (or set OUTBOXD_BIN)"
# Never a toolchain download: the machine's Go builds everything.
export GOTOOLCHAIN=local

if [ ! -x "$helm" ]; then
  echo "helm-check: installing Helm $HELM_VERSION into $helm_dir (go install, once)"
  started=$SECONDS
  partial="$helm_dir.partial.$$"
  rm -rf "$partial"
  mkdir -p "$partial"
  GOBIN="$partial" go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  rm -rf "$helm_dir"
  mv "$partial" "$helm_dir"
  echo "helm-check: Helm built in $((SECONDS - started)) s"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/outboxd-helm-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# Helm's own state in the scratch directory: no repositories, no network.
export HELM_CACHE_HOME="$work/helm/cache" HELM_CONFIG_HOME="$work/helm/config" HELM_DATA_HOME="$work/helm/data"
mkdir -p "$work/rendered"

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }

# The chart with its defaults and each values file.
renders=("default:")
for values in "$chart"/ci/*-values.yaml; do
  name="$(basename "$values" -values.yaml)"
  renders+=("$name:$values")
done
for render in "${renders[@]}"; do
  name="${render%%:*}" values="${render#*:}"
  args=()
  [ -n "$values" ] && args=(--values "$values")
  if "$helm" lint --strict --quiet "$chart" "${args[@]}" >"$work/lint.out" 2>&1; then
    pass "helm lint --strict $chart ${values:-(defaults)}"
  else
    cat "$work/lint.out"; fail "helm lint $chart ${values:-(defaults)}"
  fi
  if "$helm" template orders "$chart" "${args[@]}" >"$work/rendered/$name.yaml" 2>"$work/template.err"; then
    pass "helm template $chart ${values:-(defaults)}"
  else
    cat "$work/template.err"; fail "helm template $chart ${values:-(defaults)}"
    rm -f "$work/rendered/$name.yaml"
  fi
done

# The sidecar example: a service chart with outboxd as its dependency, laid
# out as `helm dependency update` would (the chart itself in charts/).
cp -R "$example" "$work/order-service"
rm -rf "$work/order-service/charts"
mkdir -p "$work/order-service/charts"
cp -R "$chart" "$work/order-service/charts/outboxd"
if "$helm" lint --strict --quiet "$work/order-service" >"$work/lint.out" 2>&1; then
  pass "helm lint --strict $example"
else
  cat "$work/lint.out"; fail "helm lint $example"
fi
if "$helm" template order-service "$work/order-service" >"$work/rendered/sidecar-example.yaml" 2>"$work/template.err"; then
  pass "helm template $example"
else
  cat "$work/template.err"; fail "helm template $example"
  rm -f "$work/rendered/sidecar-example.yaml"
fi

# What the chart must refuse to render, and the words it refuses with.
refuse() {
  local expect="$1"; shift
  if "$helm" template orders "$chart" "$@" >/dev/null 2>"$work/refused.err"; then
    fail "helm template $chart $* rendered; it must refuse ($expect)"
  elif grep -q "$expect" "$work/refused.err"; then
    pass "helm template $chart $* refused: $expect"
  else
    cat "$work/refused.err"; fail "helm template $chart $* refused without saying '$expect'"
  fi
}
refuse "must be above config.relay.shutdown_grace" --set terminationGracePeriodSeconds=30
refuse "not an environment variable outboxd reads" --set secret.env.postgres_url=x
refuse "sidecar.podSelector" --set mode=sidecar

# Every rendered manifest and the raw Kubernetes example against the API
# types, and their outboxd configs against the relay's loader.
validator="$work/validate"
(cd deploy/helm/validate && go build -buildvcs=false -o "$validator" .)
files=("$work"/rendered/*.yaml "$raw")
if "$validator" -outboxd "$outboxd" "${files[@]}"; then
  passed=$((passed + ${#files[@]}))
else
  failed=$((failed + 1))
fi

echo "helm-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
