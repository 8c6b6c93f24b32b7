#!/usr/bin/env bash
# device_run.sh: earkit's GPU check on a machine with no package registry, in one command.
#
#     bash bench/device_run.sh                      # the device tool: carry [".whl"], timeout_s 540
#     OUT=/tmp/out BUDGET=300 bash bench/device_run.sh --stages a,b    # a shorter rerun; the rest goes to gpu_check
#     bash bench/device_run.sh --smoke              # the same steps on a CPU (Triton interpreter): a test of this script
#
# Run it from anywhere, in a checkout (or a copy of one) with the wheels of bench/device_wheels.sh in
# .whl/ (made on a machine that reaches PyPI; without them gpu_check runs and says which rows are missing).
#   1. machine facts: nvidia-smi, python, torch, triton
#   2. installs, offline, into a private folder (never the checkout, never site-packages): the wheels,
#      then earkit itself (pip install --no-deps --no-index --no-build-isolation: CMake builds the C++
#      twin); if that build fails, the package is assembled from the source folders, since the GPU path
#      needs no C++ twin
#   3. python -m earkit.bench.gpu_check with what is left of BUDGET (default 450 s for all of it), from a
#      folder outside the checkout, so the source folders never shadow the installed package
# Files in $OUT (a temporary folder when OUT is unset; the device tool brings back at most 8):
#   gpu_check.md (the report, rewritten as rows come in), gpu_check.jsonl (every row as measured),
#   gpu_check.log (all output), machine.txt (nvidia-smi -q, pip list, the earkit build log).
# Exit status: gpu_check's (0 all checks passed, 1 not, 2 no CUDA), or 3 when earkit does not import.
set -uo pipefail

START=$(date +%s)
BUDGET=${BUDGET:-450}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/earkit-gpu-out.XXXXXX")}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/earkit-device.XXXXXX")
SITE=$WORK/site
PY=${PYTHON:-python3}
SMOKE=0
for arg in "$@"; do [ "$arg" = --smoke ] && SMOKE=1; done

export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Left over from a test shell, these would send the GPU run through the interpreter.
[ "$SMOKE" = 1 ] || unset TRITON_INTERPRET EARKIT_BACKEND

elapsed() { echo $(( $(date +%s) - START )); }
step() { echo; echo "=== [$(elapsed) s] $*"; }

machine() {
  step "machine (repo $ROOT, out $OUT, budget $BUDGET s)"
  git -C "$ROOT" log -1 --format='commit %H %cd %s' 2>/dev/null || echo "(no git history in this copy)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
      --format=csv 2>&1 | head -3
    nvidia-smi -q > "$WORK/nvidia-smi.txt" 2>&1
  else
    echo "no nvidia-smi"
  fi
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'CUDA', torch.version.cuda, '| triton', triton.__version__, '| cuda available', torch.cuda.is_available())" 2>&1
}

install() {
  step "install into $SITE (offline)"
  mkdir -p "$SITE"
  local wheels=("$ROOT"/.whl/*.whl)
  if [ -e "${wheels[0]}" ]; then
    ls -l "$ROOT"/.whl
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" > "$WORK/wheels.log" 2>&1; then
      tail -5 "$WORK/wheels.log"
      echo "the wheels did not install: the rows that need them will say so"
    fi
  else
    echo "no wheels in $ROOT/.whl (run bench/device_wheels.sh where PyPI is reachable, and carry .whl):"
    echo "AdamW8bit falls back to torch AdamW; the Liger and cut-cross-entropy rows are not run"
  fi
  local started
  started=$(date +%s)
  if timeout 180 "$PY" -m pip install --no-deps --no-index --no-build-isolation --no-compile --no-cache-dir \
      --target "$SITE" -C "build-dir=$WORK/build" "$ROOT" > "$WORK/earkit-build.log" 2>&1; then
    echo "earkit built and installed, C++ twin included, in $(( $(date +%s) - started )) s"
  else
    echo "earkit's build failed after $(( $(date +%s) - started )) s (last lines below; all in machine.txt);"
    echo "assembling the package from the source folders instead (the GPU path needs no C++ twin)"
    tail -15 "$WORK/earkit-build.log"
    rm -rf "$SITE/earkit"
    mkdir -p "$SITE/earkit"
    cp "$ROOT"/earkit/*.py "$SITE/earkit/"
    for folder in kernels engine ecgvf bench; do cp -r "$ROOT/$folder" "$SITE/earkit/$folder"; done
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  (cd "$WORK" && "$PY" - <<'EOF'
import importlib

import earkit
from earkit.kernels import native

print("earkit", earkit.__version__, "from", earkit.__file__, "| C++ twin:", "built" if native.available() else "absent")
for name in ("bitsandbytes", "liger_kernel", "cut_cross_entropy", "transformers"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except Exception as error:
        print(f"  {name}: does not import ({type(error).__name__}: {str(error)[:160]})")
EOF
  )
}

main() {
  machine
  install || true
  if ! (cd "$WORK" && "$PY" -c "import earkit.bench.gpu_check" 2>/dev/null); then
    echo "earkit does not import from $SITE: no check to run"
    return 3
  fi
  # What the install left, less a margin for the last report and the stops.
  local budget=$(( BUDGET - $(elapsed) - 15 ))
  step "gpu_check --budget $budget $*"
  (cd "$WORK" && timeout -k 10 $(( budget + 60 )) "$PY" -m earkit.bench.gpu_check --budget "$budget" \
    --out "$OUT/gpu_check.md" "$@")
  local status=$?
  step "finished with exit status $status; files in $OUT:"
  ls -l "$OUT"
  return $status
}

main "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
{
  echo "# nvidia-smi -q"; cat "$WORK/nvidia-smi.txt" 2>/dev/null
  echo; echo "# pip list"; "$PY" -m pip list 2>/dev/null
  echo; echo "# earkit build log"; cat "$WORK/earkit-build.log" 2>/dev/null
} > "$OUT/machine.txt"
rm -rf "$WORK"
exit "$status"
