#!/usr/bin/env bash
# Prepares a run of benchmarks/gpu.sh on a machine with a GPU and no network: run it here,
# from anywhere, with network to the package registry.
#
#   bash benchmarks/gpu_prepare.sh            # wheels, CPU reference, carried inputs
#   SKIP_WHEELS=1 bash benchmarks/gpu_prepare.sh
#
# Writes, all git-ignored:
#   .whl/                          x86-64 CPython 3.12 wheels of what the benchmarks need and the
#                                  GPU machine lacks (its python3 has JAX with CUDA, numpy, scipy,
#                                  pandas, pyarrow, matplotlib, pyyaml), at the versions of .venv
#   benchmarks/out/gpu_reference/  device_agreement's inputs and CPU results (--save)
#   benchmarks/out/gpu_inputs/     simulated field and stamp profiles (drawn with GalSim) and the
#                                  tiny survey's search inputs (built with Snakemake), which
#                                  gpu.sh replays there (device_agreement --replay)
# and prints the size that travels with the working tree (the device limit is 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHL=.whl
REF=benchmarks/out/gpu_reference
INPUTS=benchmarks/out/gpu_inputs
export JAX_PLATFORMS=cpu  # the reference is the CPU backend's

# Missing on the GPU machine (astropy and what it needs; DE421 in skyfield-data and its
# reader; sep, imported by skystack.catalog; ModOpt for deconvolve's comparison; skyfield
# for B1's per-pair reference; jsonschema for the config of the end-to-end search).
PACKAGES=(astropy pyerfa astropy-iers-data jplephem skyfield-data sep modopt importlib-metadata lazy-importer
          skyfield sgp4 jsonschema jsonschema-specifications referencing rpds-py)
# What the GPU machine's python3 already has, of what the wheels above ask for (from its
# package list in this workplace's notes on that machine).
THERE=(numpy scipy pandas pyarrow matplotlib pyyaml packaging certifi attrs typing-extensions tqdm zipp
       setuptools)
# The platforms pip may match (it matches manylinux_2_N exactly).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
grep -qxF benchmarks/out/ .gitignore || { echo "benchmarks/out/ is not in .gitignore" >&2; exit 1; }

if [[ -z ${SKIP_WHEELS:-} ]]; then
  # A fresh folder: two versions of one package stop the whole install there.
  rm -rf "$WHL.new" && mkdir -p "$WHL.new"
  platform_args=()
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platform_args[@]}" -d "$WHL.new" "$name==$version"
  done
  rm -rf "$WHL" && mv "$WHL.new" "$WHL"
  ls -la "$WHL"
  # Each wheel's requirements (for CPython 3.12) must travel too or be there already.
  "$PY" - "$WHL" "${PACKAGES[*]}" "${THERE[*]}" <<'EOF'
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

folder, carried, there = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
known = {canon(n) for n in carried + there}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
missing = set()
for whl in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if (req.marker is None or req.marker.evaluate(env)) and canon(req.name) not in known:
                missing.add(f"{req.name} (for {whl.name.split('-')[0]})")
if missing:
    sys.exit("wheels need packages neither carried nor there: " + ", ".join(sorted(missing)))
print("every requirement of the wheels is carried or there")
EOF
fi

rm -rf "$REF"  # no results of an earlier save left beside the new ones
"$PY" -m benchmarks.device_agreement --save "$REF" | tail -n 12
"$PY" -m benchmarks.device_agreement --carry-inputs "$INPUTS" | tail -n 5

mib() { du -sm "$@" | awk '{s += $1} END {print s}'; }
echo "carried: .whl $(mib "$WHL") MiB, $REF $(mib "$REF") MiB, $INPUTS $(mib "$INPUTS") MiB;" \
  "total $(mib "$WHL" "$REF" "$INPUTS") MiB (keep under ~50 MiB: the working tree travels too)"
