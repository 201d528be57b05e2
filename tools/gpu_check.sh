python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
case ":${PYTHONPATH:-}:" in
  *:/tmp/site:*) ;;
  *) echo "!! installing .whl/*.whl failed: deepspeed and friends may be missing"; export PYTHONPATH=/tmp/site:$PWD ;;
esac
# GPU check for issues 7 and 3: about 6 minutes on one H100/H200, run from the repository root with
# .whl/ carried (deepspeed, timm, omegaconf, transformers and whatever of their dependencies the GPU
# machine lacks). Every result is a JSON line in $OUT/bench.jsonl; each stage's full output is in
# $OUT/<stage>.log and only its summary lines are printed here.
#
#   0. data.decode=device: nvJPEG's pixels against libjpeg's (tools/check_device_decode.py).
#   1. MAE ViT-L/16, 224 px, bf16 (DeepSpeed's bf16 mode with largemim's multi-tensor gradient checks,
#      the default), 100 timed steps on synthetic images, fused optimizer (DeepSpeed's FusedAdam if it
#      JIT-compiles here, else torch's fused AdamW), then HF ViTMAE at the same batch, with operator
#      counts; 2. the same with DeepSpeed's own per-tensor checks (train.foreach_grad_checks=false).
#   3. ViT-H/14 (the issue's target) beside HF; 4. L/16 and H/14 with train.autocast=true; the
#      data.decode=device loader timing if build/photo_sets was carried; 5. train.compile=true;
#      6. ViT-g/14 beside HF. Then, if time is left: a profile of L/16 in both precision modes
#      (tools/benchmark.py --profile), L/16 without the bf16 overflow test, at micro-batch 768 (the
#      memory prediction's range), with activation checkpointing on every block, and under ZeRO-3;
#      last, tools/memory_table.py --check on this session's peaks. Stages 1-3 fit BUDGET_S=420, and 4
#      too when DeepSpeed's FusedAdam builds quickly (its build may take up to 95 s before stage 1).
#
# Each stage runs under `timeout`, and a stage that would overrun the budget (BUDGET_S, default 420 s
# after the install) is cut short or skipped, so one failure cannot eat the session.
set -u
OUT=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$OUT"
J="$OUT/bench.jsonl"
: >"$J"
unset DS_ACCELERATOR  # this machine's CPU-only setting must not travel
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
T0=$SECONDS
BUDGET=${BUDGET_S:-420}

nvidia-smi
nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm,power.limit --format=csv
python3 - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "flash sdp", torch.backends.cuda.flash_sdp_enabled())
for mod in ("deepspeed", "timm", "omegaconf", "transformers"):
    try:
        print(mod, importlib.import_module(mod).__version__)
    except Exception as e:  # a missing wheel in .whl/: said here, not in the middle of a stage
        print(mod, "NOT IMPORTABLE:", type(e).__name__, e)
EOF

IMPL=both
if ! python3 -c "import transformers" 2>/dev/null; then
  IMPL=largemim
  echo "!! transformers is not importable: the HF comparison is skipped (add its wheels to .whl/)"
fi

# DeepSpeed's FusedAdam compiles on first use (nvcc + ninja); build for this GPU only, and fall back to
# torch's fused AdamW if it cannot within 90 s.
TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1)
export TORCH_CUDA_ARCH_LIST MAX_JOBS=16
OPT=torch_fused
if timeout --kill-after=5 90 python3 - >"$OUT/fusedadam.log" 2>&1 <<'EOF'
import torch
from deepspeed.ops.adam import FusedAdam

p = torch.nn.Parameter(torch.zeros(1024, device="cuda"))
opt = FusedAdam([p], lr=1e-3, adam_w_mode=True)
p.grad = torch.ones_like(p)
opt.step()
torch.cuda.synchronize()
assert p.abs().sum() > 0
print("FusedAdam ok")
EOF
then
  OPT=deepspeed
fi
echo "== optimizer: optim.impl=$OPT ($(tail -n1 "$OUT/fusedadam.log")), after $((SECONDS - T0)) s"

stage() {  # stage NAME LIMIT_S benchmark-args...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  if ((left < 40)); then
    echo "== $name: skipped, $left s of the budget left"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name: limit $limit s, started at $((SECONDS - T0)) s"
  timeout --kill-after=10 "$limit" python3 tools/benchmark.py --jsonl "$J" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -E "img/s|ratio:|ms per step|operators per step|^benchmark:|Error|error:" "$OUT/$name.log" | grep -v Warning | tail -n 8
  if ((rc != 0)); then
    echo "   exit $rc; last lines:"
    tail -n 15 "$OUT/$name.log"
  fi
  echo "== $name: exit $rc at $((SECONDS - T0)) s"
  return $rc
}

# Issue 3 part 8: data.decode=device's nvJPEG pixels against libjpeg on the CPU (a few seconds).
echo "== device decode check"
timeout --kill-after=5 60 python3 tools/check_device_decode.py --device cuda >"$OUT/decode_check.log" 2>&1
tail -n 4 "$OUT/decode_check.log"

LARGE=(model.size=large model.patch_size=16 train.micro_batch=256)
common() { COMMON=(train.precision=bf16 "optim.impl=$OPT" ds_config=ds_configs/zero2.json model.img_size=224); }
common

# Flash attention is not forced (a refusal would lose the stage); each JSON line says in "flash_attn"
# whether SDPA's flash kernel accepts this GPU, precision and both head sizes.
# Order (2026-11-26, session 4): what issue 7 needs measured next comes first. L/16 and g/14 in DeepSpeed's
# bf16 mode are already in BENCHMARKS.md; the baseline is repeated (shorter) for same-session ratios.
stage L16 90 --impl "$IMPL" --steps 100 --warmup 20 "${COMMON[@]}" "${LARGE[@]}" --count-ops 1
rc=$?
if ((rc != 0 && rc != 124 && rc != 137)) && [[ $OPT == deepspeed ]]; then  # failed, not timed out
  echo "!! L16 failed with DeepSpeed's FusedAdam: again with torch's fused AdamW"
  OPT=torch_fused
  common
  stage L16_torchadam 90 --impl "$IMPL" --steps 100 --warmup 10 "${COMMON[@]}" "${LARGE[@]}"
fi
# The same with DeepSpeed's own per-tensor gradient checks (the 2026-11-26 baseline): what
# train.foreach_grad_checks (on above, by default) gains, in one session (BENCHMARKS.md, notes row 13).
stage L16_dsloops 60 --impl largemim --steps 60 --warmup 10 "${COMMON[@]}" "${LARGE[@]}" --count-ops 1 \
  train.foreach_grad_checks=false
# The issue's target model in the default mode (bf16 weights, multi-tensor gradient checks) beside HF.
stage H14 100 --impl "$IMPL" --steps 30 --warmup 5 "${COMMON[@]}" model.size=huge model.patch_size=14 \
  train.micro_batch=128
# DeepSpeed's torch_autocast mode (1.32x the bf16 mode before foreach_grad_checks), at the L/16 and H/14
# batches: which precision mode should be the default.
stage L16_autocast 60 --impl largemim --steps 60 --warmup 10 "${COMMON[@]}" "${LARGE[@]}" train.autocast=true
stage H14_autocast 50 --impl largemim --steps 20 --warmup 5 "${COMMON[@]}" model.size=huge model.patch_size=14 \
  train.micro_batch=128 train.autocast=true
# Issue 3 part 8: data.decode=device (nvJPEG) against the CPU pipelines, on photo sets carried in
# build/photo_sets (tools/make_photo_sets.py --imagenet 200 --web 80 keeps them under the 64 MiB carry with .whl/).
if [[ -f build/photo_sets/web_size/manifest.json ]] && ((BUDGET - (SECONDS - T0) > 40)); then
  echo "== loader: data.decode=device on the GPU, started at $((SECONDS - T0)) s"
  timeout --kill-after=5 60 python3 tools/bench_loader.py --repeats 2 --device cuda >"$OUT/loader.log" 2>&1
  tail -n 5 "$OUT/loader.log"
fi
# torch.compile of the objective (inductor) in the default mode; then ViT-g/14 beside HF.
stage L16_compile 150 --impl largemim --steps 60 --warmup 15 "${COMMON[@]}" "${LARGE[@]}" train.compile=true
stage g14 120 --impl "$IMPL" --steps 30 --warmup 5 "${COMMON[@]}" model.size=giant model.patch_size=14 \
  train.micro_batch=128
# Where the rest of the time goes against a plain loop (BENCHMARKS.md): 3 profiled steps of each precision
# mode, the top kernels and whether the host or the GPU is the limit; traces in $OUT.
stage L16_profile 70 --impl "$IMPL" --steps 5 --warmup 5 --profile 3 --trace-dir "$OUT/traces" "${COMMON[@]}" "${LARGE[@]}"
stage L16_autocast_profile 50 --impl largemim --steps 5 --warmup 5 --profile 3 "${COMMON[@]}" "${LARGE[@]}" \
  train.autocast=true
# DeepSpeed's inf/NaN test of every gradient (bf16 mode), off: since train.foreach_grad_checks it costs
# a few kernels and one sync (BENCHMARKS.md, notes row 10).
stage L16_nocheck 40 --impl largemim --steps 40 --warmup 10 "${COMMON[@]}" "${LARGE[@]}" train.check_grad_overflow=false
# The memory prediction (tools/memory_table.py) at three times the micro-batch it was checked at.
stage L16_mb768 60 --impl largemim --steps 10 --warmup 3 "${COMMON[@]}" model.size=large model.patch_size=16 \
  train.micro_batch=768
stage L16_ckpt 60 --impl "$IMPL" --steps 30 --warmup 5 "${COMMON[@]}" "${LARGE[@]}" model.grad_ckpt_every=1
stage L16_zero3 60 --impl largemim --steps 30 --warmup 5 "${COMMON[@]}" "${LARGE[@]}" ds_config=ds_configs/zero3.json

echo "== done after $((SECONDS - T0)) s; $(wc -l <"$J") JSON lines in $J"
# Predicted against measured peak memory for every row above (counted on this machine's CPU; ~1 min).
timeout --kill-after=5 120 python3 tools/memory_table.py --check "$J" --models large/16 --gpus 1 \
  >"$OUT/memory_check.log" 2>&1 && grep -E "^\|" "$OUT/memory_check.log" | head -n 20
python3 - "$J" <<'EOF'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'impl':>9} {'model':>10} {'ZeRO':>4} {'ckpt':>4} {'batch':>5} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6} flash  optimizer")
for r in rows:
    if r["kind"] == "throughput":
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['impl']:>9} {r['size'] + '/' + str(r['patch']):>10} {str(r['zero_stage']):>4} {r['grad_ckpt_every']:>4} "
              f"{r['micro_batch']:>5} {r['images_per_s']:>9.1f} {r['tflops']:>8.1f} {mfu:>6} {str(r['peak_mem_gib']):>6} "
              f"{str(r['flash_attn']):>5}  {r['optimizer']}")
    elif r["kind"] == "ratio":
        print(f"{'ratio':>9} {r['size'] + '/' + str(r['patch']):>10}  largemim/HF images/s = {r['largemim_over_hf_images_per_s']}")
    else:
        print(r)
EOF
