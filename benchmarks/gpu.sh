#!/usr/bin/env bash
# The one prepared GPU run (issue "Real time on the GPU"): one H100 (or H200), about 4 minutes (DEADLINE, default 440 s), all under $OUT.
#
#   run: bash benchmarks/gpu.sh            (device tool: carry [".whl"], timeout_s 480; H200 2026-11-26: 234 s)
#        bash benchmarks/gpu.sh levers     (the 4-step levers only, ~150 s: compiled and compiled-parallel with
#        cuDNN-first attention, then the transformer blocks under torch.compile; tiny decoder and VAE)
#   needs in .whl/: diffusers-0.42.1, importlib_metadata-10.2.0, lazy_importer-0.1.0, diffrp_nvdiffrast-0.3.3.1
#
# Order (most important first; each stage under `timeout`, each bench rewrites its JSON + Markdown per case):
#   0. wheels; nvdiffrast's JIT build starts in the background (MAX_JOBS=6, leaving the CPU to the benchmark)
#   1. sd21 512: reference float16 (the baseline), compiled (one CUDA graph), compiled-parallel (ControlNet on a
#      second stream inside the graph): 4 then 20 DDPM steps
#   2. pytest -m gpu tests/gpu (kernel parity, nvdiffrast vs torch raster, renderer on CUDA, compiled parity)
#   3. sd21 512, compiled: 1/2/4 steps, tiny decoder and VAE, 100k-triangle meshes (nvdiffrast if it built)
#   4. tiny preset: compiled vs reference, frame PSNR against the float32 reference
# Files in $OUT (8 at most come back): gpu.log, bench_sd21.{json,md}, bench_sd21_extra.{json,md},
# bench_tiny.{json,md}. The Markdown tables are printed again at the end, the main one last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=${DEADLINE:-440}  # seconds for the whole script; stages shrink their timeouts to fit
stamp() { echo "=== [$(( $(date +%s) - START ))s] $*"; }
stage() {  # stage NAME BUDGET_SECONDS COMMAND...: run under min(BUDGET, time left - 20 s)
  local name=$1 budget=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - START) - 20 ))
  if (( left < 30 )); then stamp "SKIPPED $name: out of time"; return 0; fi
  (( budget > left )) && budget=$left
  stamp "$name (timeout ${budget}s)"
  timeout --kill-after=15 "$budget" "$@"
  stamp "$name: exit $?"
}

stamp "install wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, torch.cuda.get_device_name())" || exit 1

BENCH="python3 -m engine.cli bench --device cuda --sampler ddpm --repeat 5 --stream-frames 30"
if [[ ${1:-} == levers ]]; then
  stage "L1. sd21 4 steps: compiled, compiled-parallel; attention auto (cuDNN first)" 90 \
    $BENCH --avatar sd21 --backends compiled,compiled-parallel --steps 4 --decoders tiny,vae --attention auto \
    --no-fidelity --out "$OUT/bench_sd21_levers_auto"
  stage "L2. sd21 4 steps: compiled-parallel, transformer blocks under torch.compile" 150 \
    $BENCH --avatar sd21 --backends compiled-parallel --steps 4 --decoders tiny,vae --compile \
    --no-fidelity --out "$OUT/bench_sd21_levers_compile"
  for f in "$OUT"/bench_*.md; do [[ -f $f ]] && { echo; echo "----- $f"; cat "$f"; }; done
  stamp "done"
  exit 0
fi

stamp "nvdiffrast JIT build in the background"
( MAX_JOBS=6 TORCH_CUDA_ARCH_LIST=9.0 timeout 420 python3 -c "from engine.raster.nvdiffrast_raster import \
get_context; get_context('cuda'); print('nvdiffrast ready')" > /tmp/nvdiffrast_build.log 2>&1 ) &
BUILD=$!

stage "1. sd21 512: reference fp16 vs compiled fp16, 4 and 20 steps" 230 \
  $BENCH --avatar sd21 --backends reference,compiled,compiled-parallel --dtypes float16 --steps 4,20 \
  --raster torch --out "$OUT/bench_sd21"

stage "2. pytest -m gpu tests/gpu (renderer on CUDA, compiled parity, raster, kernels)" 120 \
  python3 -m pytest -q -ra -s -m gpu tests/gpu -p no:cacheprovider

tail -3 /tmp/nvdiffrast_build.log
RASTER=torch
grep -q "nvdiffrast ready" /tmp/nvdiffrast_build.log && RASTER=nvdiffrast
stage "3. sd21 512 compiled: 1/2/4 steps, tiny decoder and VAE, 100k meshes, raster $RASTER" 150 \
  $BENCH --avatar sd21 --backends compiled --steps 1,2,4 --decoders tiny,vae --meshes 100k \
  --raster "$RASTER" --stream-frames 20 --out "$OUT/bench_sd21_extra"

stage "4. tiny preset: compiled vs reference, PSNR vs float32" 60 \
  $BENCH --avatar tiny --backends reference,compiled --dtypes float16 --steps 4,20 --raster "$RASTER" \
  --out "$OUT/bench_tiny"

stamp "summary"
for f in bench_tiny bench_sd21_extra bench_sd21; do
  [[ -f "$OUT/$f.md" ]] && { echo; echo "----- $f.md"; cat "$OUT/$f.md"; }
done
python3 - "$OUT" <<'EOF' || true
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")):
    cases = json.loads(p.read_text())["cases"]
    bad = [f"{c['backend']} {c['steps']}: {c['error']}" for c in cases if "error" in c]
    print(f"{p.name}: {len(cases)} cases, {len(bad)} failed", *bad, sep="\n  ")
EOF
stamp "done"
