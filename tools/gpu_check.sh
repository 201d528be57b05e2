python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
case ":${PYTHONPATH:-}:" in
  *:/tmp/site:*) ;;
  *) echo "!! installing .whl/*.whl failed: deepspeed and friends may be missing"; export PYTHONPATH=/tmp/site:$PWD ;;
esac
# GPU check for issue 7 (and issue 3's device decoding): one H100/H200, run from the repository root with
# .whl/ carried (deepspeed, omegaconf, webdataset and their dependencies the GPU image lacks; torch,
# timm and transformers come with the image). Do not carry build/photo_sets unless it fits: tracked
# files + .whl + carried paths must stay under the device tool's 64 MiB. Run it as
#     BUDGET_S=480 bash tools/gpu_check.sh          (device timeout_s=540, then give the machine back)
# Results: every result is a JSON line in $OUT/bench.jsonl; each stage's full output is a log in
# $OUT/logs.tgz (packed after every stage: the device tool brings back at most 8 files of 16 MiB).
# Afterwards, here: tools/memory_table.py --check bench.jsonl (predicted against measured peaks).
#
# Order (after the 2026-11-27 H200 session, BENCHMARKS.md): the device-decode check first (seconds: a
# truncated JPEG must be refused before nvJPEG), then what issue 7 still lacks. MAE ViT-H/14 and ViT-L/16
# in the default mode (train.compile=auto compiles on a GPU) beside HF ViTMAE at micro-batch 256 (H/14
# also beside HF compiled), then ViT-g/14 beside HF; H/14 at micro-batch 448 (MFU grows with the batch); the memory prediction's ZeRO-1
# and ZeRO-3 largest micro-batches for H/14 under a 79 GiB cap (an 80 GB card, also on an H200); compile
# with activation checkpointing (whether train.compile=auto should include it); then a profile of the
# compiled step and the rest if time is left. torch's fused AdamW throughout (faster than DeepSpeed's
# FusedAdam, notes row 3), so nothing waits for an extension build.
#
# Each stage runs under `timeout`, and a stage that would overrun the budget (BUDGET_S, default 480 s
# after the install) is cut short or skipped, so one failure cannot eat the session.
set -u
OUT=${OUT:-$PWD/runs/gpu_check}
LOGS=${LOGS:-/tmp/gpu_check_logs}
mkdir -p "$OUT" "$LOGS"
J="$OUT/bench.jsonl"
: >"$J"
exec > >(tee -a "$LOGS/console.log") 2>&1  # the console too (the device tool returns only its tail)
pack() { tar czf "$OUT/logs.tgz.part" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/logs.tgz.part" "$OUT/logs.tgz"; }
trap 'sleep 1; pack' EXIT  # (a second for tee to write the console's last lines)
unset DS_ACCELERATOR  # this machine's CPU-only setting must not travel
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export DS_SKIP_CUDA_CHECK=1  # the image's nvcc may differ from torch's CUDA in the minor version
T0=$SECONDS
BUDGET=${BUDGET_S:-480}

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

OPT=torch_fused

# First, seconds long: data.decode=device's nvJPEG pixels against libjpeg, and a truncated JPEG refused
# in the worker before it reaches nvJPEG (which decodes one without error: seen on the H200, 2026-11-27).
echo "== device decode check"
timeout --kill-after=5 30 python3 tools/check_device_decode.py --device cuda >"$LOGS/decode_check.log" 2>&1
tail -n 4 "$LOGS/decode_check.log"

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
  timeout --kill-after=10 "$limit" python3 tools/benchmark.py --jsonl "$J" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  grep -E "img/s|ratio:|ms per step|operators per step|^benchmark:|Error|error:" "$LOGS/$name.log" | grep -v Warning | tail -n 8
  if ((rc != 0)); then
    echo "   exit $rc; last lines:"
    tail -n 15 "$LOGS/$name.log"
  fi
  echo "== $name: exit $rc at $((SECONDS - T0)) s"
  pack
  return $rc
}

LARGE=(model.size=large model.patch_size=16 train.micro_batch=256)
HUGE=(model.size=huge model.patch_size=14 train.micro_batch=256)
GIANT=(model.size=giant model.patch_size=14 train.micro_batch=128)
EAGER=(train.compile=false)
common() { COMMON=(train.precision=bf16 "optim.impl=$OPT" ds_config=ds_configs/zero2.json model.img_size=224); }
common

# Flash attention is not forced (a refusal would lose the stage); each JSON line says in "flash_attn"
# whether SDPA's flash kernel accepts this GPU, precision and both head sizes. The first steps of a
# compiled stage compile (about a minute for H/14 on the H200): --warmup covers them.
# 1. Issue 7's figures in the default mode (compiled) beside HF (eager, its own default).
stage H14 150 --impl "$IMPL" --steps 30 --warmup 10 "${COMMON[@]}" "${HUGE[@]}"
# ... and HF compiled too (--hf-compile), for the like-for-like ratio (2026-11-27 had HF eager only)
[[ $IMPL == both ]] && stage H14_hf_compiled 120 --impl hf --hf-compile --steps 30 --warmup 10 "${COMMON[@]}" "${HUGE[@]}"
stage L16 120 --impl "$IMPL" --steps 60 --warmup 10 "${COMMON[@]}" "${LARGE[@]}"
stage g14 170 --impl "$IMPL" --steps 20 --warmup 10 "${COMMON[@]}" "${GIANT[@]}"
# 2. MFU against the micro-batch (g/14 rose from 32 % at 128 to 39 % at 309 eager on the H200); 448 is
# about 60 GiB allocated, inside an 80 GB H100 as well.
stage H14_mb448 150 --impl largemim --steps 15 --warmup 10 "${COMMON[@]}" "${HUGE[@]}" train.micro_batch=448
# 3. The memory table: H/14's predicted largest micro-batches per 80 GB card under ZeRO-1 and ZeRO-3
# (BENCHMARKS.md: 447 and 442; g/14's ZeRO-2 points, 309 and 1110, fitted on 2026-11-27), eager, as
# modelled. An out-of-memory error there says the table is wrong.
stage H14_zero1_mb447_cap79 60 --impl largemim --steps 3 --warmup 2 --mem-cap-gib 79 "${COMMON[@]}" "${EAGER[@]}" \
  "${HUGE[@]}" ds_config=ds_configs/zero1.json train.micro_batch=447
stage H14_zero3_mb442_cap79 90 --impl largemim --steps 3 --warmup 2 --mem-cap-gib 79 "${COMMON[@]}" "${EAGER[@]}" \
  "${HUGE[@]}" ds_config=ds_configs/zero3.json train.micro_batch=442
# 4. Compile with activation checkpointing, beside the eager checkpointed step (2026-11-27: 1527 img/s).
stage L16_ckpt_compiled 120 --impl largemim --steps 30 --warmup 10 "${COMMON[@]}" "${LARGE[@]}" \
  model.grad_ckpt_every=1 train.compile=true
# 5. The stop-check poll, and issue 3's loader on photo sets carried in build/photo_sets
# (tools/make_photo_sets.py --imagenet 200 --web 80, if it fits the 64 MiB carry).
if ((BUDGET - (SECONDS - T0) > 40)); then  # the trainer's per-step stop check must not wait for the GPU
  echo "== stop-check poll"
  timeout --kill-after=5 30 python3 tools/check_stop_poll.py >"$LOGS/stop_poll.log" 2>&1
  tail -n 3 "$LOGS/stop_poll.log"
fi
if [[ -f build/photo_sets/web_size/manifest.json ]] && ((BUDGET - (SECONDS - T0) > 70)); then
  echo "== loader: data.decode=device on the GPU, started at $((SECONDS - T0)) s"
  timeout --kill-after=5 60 python3 tools/bench_loader.py --repeats 2 --device cuda >"$LOGS/loader.log" 2>&1
  tail -n 5 "$LOGS/loader.log"
fi
pack
# 6. If time is left: where the compiled step's time goes (3 profiled steps, the top kernels; no Chrome
# traces, which would not come back), then the eager H/14 step at the same batch for the compile ratio.
stage H14_profile 150 --impl largemim --steps 5 --warmup 10 --profile 3 "${COMMON[@]}" "${HUGE[@]}"
stage H14_eager 60 --impl largemim --steps 20 --warmup 5 "${COMMON[@]}" "${HUGE[@]}" "${EAGER[@]}"
stage L16_zero3 60 --impl largemim --steps 20 --warmup 5 "${COMMON[@]}" "${LARGE[@]}" "${EAGER[@]}" \
  ds_config=ds_configs/zero3.json

echo "== done after $((SECONDS - T0)) s; $(wc -l <"$J") JSON lines in $J"
echo "== predicted against measured memory: run tools/memory_table.py --check bench.jsonl on the CPU machine"
python3 - "$J" <<'EOF'
import json, sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'impl':>9} {'model':>10} {'ZeRO':>4} {'ckpt':>4} {'batch':>5} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'GiB':>6} flash  optimizer, mode")
for r in rows:
    if r["kind"] == "throughput":
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['impl']:>9} {r['size'] + '/' + str(r['patch']):>10} {str(r['zero_stage']):>4} {r['grad_ckpt_every']:>4} "
              f"{r['micro_batch']:>5} {r['images_per_s']:>9.1f} {r['tflops']:>8.1f} {mfu:>6} {str(r['peak_mem_gib']):>6} "
              f"{str(r['flash_attn']):>5}  {r['optimizer']}, {r['precision_mode']}")
    elif r["kind"] == "ratio":
        print(f"{'ratio':>9} {r['size'] + '/' + str(r['patch']):>10}  largemim/HF images/s = {r['largemim_over_hf_images_per_s']}")
    else:
        print(r)
EOF
