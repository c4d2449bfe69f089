#!/usr/bin/env bash
# The JAX benchmarks and the GPU/CPU agreement check in one command, for a machine with a GPU
# and no network (its python3 has JAX with CUDA; what else is needed travels as wheels).
#
# Here, first (network, GalSim, Snakemake):   bash benchmarks/gpu_prepare.sh
# There, from the repository root:            bash benchmarks/gpu.sh
# carrying .whl, benchmarks/out/gpu_reference and benchmarks/out/gpu_inputs (all git-ignored,
# about 45 MiB together), with OUT set to the folder whose files come back.
#
# Runs, each under `timeout`: the agreement check against the CPU reference made here;
# B1 intersections; deconvolution (ModOpt's comparison skipped where ModOpt is missing);
# catalog speed; the end-to-end search on the tiny survey's carried inputs; the agreement
# check against that machine's own CPU backend (the same JAX version). Writes into $OUT
# (default benchmarks/out/gpu): gpu.log (everything printed) and one JSON per step, 7 files.
# About 6 minutes on an H200.
#
#   SKYSTACK_GPU_SMOKE=1 bash benchmarks/gpu.sh   # here: .venv's python, tiny sizes, no wheels
#   (INSTALL_WHEELS=1 PYTHON=<a CPython 3.12 with JAX> with it: the wheels too, as there)
#
# Sizes and limits can be changed from the environment: B1_ARGS, DECONV_ARGS, CATALOG_ARGS,
# E2E_ARGS (arguments of each benchmark), PYTHON, STEP_TIMEOUT_S (seconds per step, 150) and
# TOTAL_S (seconds for the whole run, 480: a step that would start later is skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
REF=benchmarks/out/gpu_reference
INPUTS=benchmarks/out/gpu_inputs
export PYTHONUNBUFFERED=1

if [[ -n ${SKYSTACK_GPU_SMOKE:-} ]]; then
  PY=${PYTHON:-.venv/bin/python}
  STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-120}
  TOTAL_S=${TOTAL_S:-300}
  B1_ARGS=${B1_ARGS:---exposures 10 --orbits 500 --repeat 1 --reference-orbits 2 --reference-exposures 1}
  DECONV_ARGS=${DECONV_ARGS:---n-stamps 64 --n-psfs 8 --n-galaxies 16 --iterations 2 --repeats 1 --modopt-stamps 8 --agree-iterations 5 --batch-size 32}
  CATALOG_ARGS=${CATALOG_ARGS:---n-sources 16 --batch-size 16}
  E2E_ARGS=${E2E_ARGS:---repeat 1}
else
  PY=${PYTHON:-python3}
  STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-150}
  # the whole run, so that it ends (summary printed) inside the device call's limit
  TOTAL_S=${TOTAL_S:-480}
  # B1 at its default survey (20,032 images), 5x its orbits and a larger batch budget, so that
  # the GPU has enough work per call; the per-pair reference on one exposure
  B1_ARGS=${B1_ARGS:---orbits 100000 --max-batch-mb 2048 --repeat 3 --reference-orbits 4 --reference-exposures 1}
  # the default stack (10,000 stamps), tiled from the carried profiles; a smaller ModOpt subsample
  DECONV_ARGS=${DECONV_ARGS:---n-stamps 10000 --n-psfs 100 --n-galaxies 200 --iterations 10 --repeats 3 --modopt-stamps 100 --agree-iterations 60}
  CATALOG_ARGS=${CATALOG_ARGS:---n-sources 256 --epochs 7}
  E2E_ARGS=${E2E_ARGS:---repeat 3}
fi

declare -a SUMMARY=()

step() {  # step NAME TIMEOUT_S COMMAND...: run it within what is left of TOTAL_S; note rc and seconds
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_S - SECONDS))
  if ((left < 30)); then
    echo "=== $name skipped: ${left} s left of the run's ${TOTAL_S} s"
    SUMMARY+=("$(printf '%-28s skipped (time)' "$name")")
    return 0
  fi
  ((limit > left)) && limit=$left
  echo
  echo "=== $name ($(date -u +%H:%M:%S), at most ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  [[ $rc == 124 || $rc == 137 ]] && echo "=== $name: stopped at its ${limit} s limit"
  SUMMARY+=("$(printf '%-28s rc=%-4s %4d s' "$name" "$rc" $((SECONDS - t0)))")
  return 0
}

main() {
  echo "skystack GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), OUT=$OUT"
  if [[ -d .whl && ( -z ${SKYSTACK_GPU_SMOKE:-} || -n ${INSTALL_WHEELS:-} ) ]]; then
    # wheels carried from benchmarks/gpu_prepare.sh; nothing is fetched here
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed"; return 1; }
    export PYTHONPATH=/tmp/site:$PWD/src
  else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  fi
  # compiled kernels kept for this run only (a fresh machine has none)
  export SKYSTACK_JAX_CACHE=${SKYSTACK_JAX_CACHE:-/tmp/skystack_jax_cache}

  nvidia-smi -L 2>&1 || echo "nvidia-smi: not available (no GPU here)"
  "$PY" -c "import jax; print('JAX', jax.__version__, 'devices:', jax.devices(), 'default backend:', jax.default_backend())"
  if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    echo "NOTE: JAX sees no GPU: every figure below is the CPU's"
  fi
  local missing
  missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('astropy', 'jplephem', 'skyfield_data', 'sep', 'modopt', 'skyfield', 'jsonschema')
               if u.find_spec(m) is None))")
  [[ -n $missing ]] && echo "NOTE: missing Python packages: $missing (was benchmarks/gpu_prepare.sh run and .whl carried?)"
  [[ -d $REF && -d $INPUTS ]] || echo "NOTE: $REF or $INPUTS missing: run benchmarks/gpu_prepare.sh here and carry them"

  local agree="$PY -m benchmarks.device_agreement"
  step "agreement vs host CPU" "$STEP_TIMEOUT_S" $agree --compare "$REF" --json "$OUT/agreement_vs_host_cpu.json"
  step "B1 intersections" "$STEP_TIMEOUT_S" $agree --replay intersections --json "$OUT/intersections.json" -- $B1_ARGS
  step "deconvolve" "$STEP_TIMEOUT_S" $agree --replay deconvolve --carried "$INPUTS" --json "$OUT/deconvolve.json" \
    -- $DECONV_ARGS
  step "catalog speed" "$STEP_TIMEOUT_S" $agree --replay catalog_speed --carried "$INPUTS" \
    --json "$OUT/catalog_speed.json" -- $CATALOG_ARGS
  if [[ -f $INPUTS/end_to_end_tiny/results/tiny/search/plan.json ]]; then
    step "end-to-end search (tiny)" "$STEP_TIMEOUT_S" $agree --replay end_to_end --carried "$INPUTS" \
      --json "$OUT/end_to_end.json" -- --workdir "$INPUTS/end_to_end_tiny" $E2E_ARGS
  else
    echo "=== end-to-end search skipped: its inputs need Snakemake, which is not here, and none were carried" \
      "($INPUTS/end_to_end_tiny from benchmarks/gpu_prepare.sh)"
    SUMMARY+=("$(printf '%-28s skipped' "end-to-end search (tiny)")")
  fi
  # the same JAX there on its CPU backend, from the same inputs: a GPU-only difference
  rm -rf /tmp/skystack_device_cpu_ref
  step "device CPU reference" "$STEP_TIMEOUT_S" env JAX_PLATFORMS=cpu $agree --save /tmp/skystack_device_cpu_ref \
    --inputs "$REF"
  step "agreement vs device CPU" "$STEP_TIMEOUT_S" $agree --compare /tmp/skystack_device_cpu_ref \
    --json "$OUT/agreement_vs_device_cpu.json"

  echo
  echo "=== summary"
  printf '%s\n' "${SUMMARY[@]}"
  "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def show(name, keys):
    p = out / f"{name}.json"
    if not p.exists():
        print(f"{name}: no result")
        return
    r = json.loads(p.read_text())
    print(f"{name}: " + ", ".join(f"{k}={r[k]}" for k in keys if k in r))
show("agreement_vs_host_cpu", ["backend", "reference_backend", "pass"])
show("agreement_vs_device_cpu", ["backend", "reference_backend", "pass"])
for name in ("agreement_vs_host_cpu", "agreement_vs_device_cpu"):
    p = out / f"{name}.json"
    if p.exists():
        r = json.loads(p.read_text())
        print(f"  {name}: " + "; ".join(f"{k} {'pass' if v.get('pass') else 'FAIL'}" for k, v in r.items()
                                          if isinstance(v, dict) and "pass" in v))
show("intersections", ["summary"])
show("deconvolve", ["device", "skystack_s_per_iter_10k", "modopt_s_per_iter_10k", "speedup", "nmse_within_1pct"])
show("catalog_speed", ["device", "sources_per_s", "compile_and_first_batch_s", "converged_fraction"])
show("end_to_end", ["summary"])
EOF
}

main "$@" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
