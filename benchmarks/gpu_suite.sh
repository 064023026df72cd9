#!/usr/bin/env bash
# The one-call GPU check (H100/H200, <= 7 minutes): the benchmarks, then the CUDA tests.
#
#   device run:  bash benchmarks/gpu_suite.sh        (carry [".whl"] when wheels were fetched with
#                                                     /work/shared/tools/device-wheels.sh)
#   anywhere:    OUT=/tmp/suite bash benchmarks/gpu_suite.sh
#
# Every step runs under `timeout`, capped by what is left of SUITE_LIMIT_S; a failed or timed-out
# step is recorded and the suite goes on. Output under $OUT, two files (a device call brings back
# at most 8): suite.log (every step's output) and results.tar.gz (every benchmark CSV and PNG,
# written under $OUT/results/ while running). The last thing printed is the step table and a
# digest of the benchmark rows.
# SKIP_STEPS=build,pytest (prefixes of step names) skips steps, e.g. for a dry run without a GPU.
# SUITE_ONLY=attention,pytest (words of step names) runs only the steps naming one of them (the wheel
# install and the environment step always run), so an issue's device minutes go to its own rows.
# Everything at once does not fit 7 minutes: give sections.
# Exit status: 0 when every step passed, 1 otherwise.
set -u

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
LOG=$OUT/suite.log
RES=$OUT/results
mkdir -p "$RES"
: >"$LOG"
PY=${PYTHON:-python3}
SUITE_LIMIT_S=${SUITE_LIMIT_S:-420}
SUITE_ONLY=${SUITE_ONLY:-}
SKIP_STEPS=${SKIP_STEPS:-}
T0=$(date +%s)
DEADLINE=$((T0 + SUITE_LIMIT_S))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MMFAST_TEST_CUDA=1          # tests/conftest.py: keep compiled Triton (no interpreter)

STEPS=()
RESULTS=()

# record NAME RC SECONDS LIMIT — add a row to the step table.
record() {
    local status
    case $2 in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT after ${4}s" ;;
        *) status="FAILED (rc=$2)" ;;
    esac
    STEPS+=("$1"); RESULTS+=("$(printf '%-28s %4ds' "$status" "$3")")
    echo "=== $1: $status in ${3}s" | tee -a "$LOG"
}

# unselected NAME — true when SKIP_STEPS or SUITE_ONLY leave step NAME out.
unselected() {
    local tok
    for tok in ${SKIP_STEPS//,/ }; do
        [[ $1 == "$tok"* ]] && return 0
    done
    [[ -z $SUITE_ONLY || $1 == "install wheels" || $1 == "environment" ]] && return 1
    for tok in ${SUITE_ONLY//,/ }; do
        [[ $1 == *"$tok"* ]] && return 1
    done
    return 0
}

# step NAME LIMIT_S CMD...  — run CMD under timeout (capped by the suite deadline), log, record.
step() {
    local name=$1 limit=$2
    shift 2
    if unselected "$name"; then skip "$name" "SKIP_STEPS/SUITE_ONLY"; return; fi
    local left=$((DEADLINE - $(date +%s) - 15))
    if ((left < 10)); then
        STEPS+=("$name"); RESULTS+=("NOT RUN (suite time limit)     0s")
        echo "=== $name: skipped, suite time limit reached" | tee -a "$LOG"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    record "$name" $? $(($(date +%s) - t)) "$limit"
}

# bg_step NAME LIMIT_S CMD... — the same, in the background beside the next steps (one at a
# time); bg_wait collects it. Its output joins suite.log when it ends.
BG_PID="" BG_NAME="" BG_T=0 BG_LIMIT=0 BG_DIR=$(mktemp -d)
bg_step() {
    BG_NAME=$1 BG_LIMIT=$2
    shift 2
    if unselected "$BG_NAME"; then skip "$BG_NAME" "SKIP_STEPS/SUITE_ONLY"; BG_NAME=""; return; fi
    local left=$((DEADLINE - $(date +%s) - 15))
    ((BG_LIMIT > left)) && BG_LIMIT=$((left > 1 ? left : 1))
    echo "=== $BG_NAME (background, limit ${BG_LIMIT}s): $*" | tee -a "$LOG"
    BG_T=$(date +%s)
    (timeout --kill-after=10 "$BG_LIMIT" "$@" >"$BG_DIR/log" 2>&1; echo $? >"$BG_DIR/rc") &
    BG_PID=$!
}
bg_wait() {
    [[ -n $BG_PID ]] || return 0
    wait "$BG_PID"
    { echo "--- output of $BG_NAME:"; cat "$BG_DIR/log"; } >>"$LOG"
    record "$BG_NAME" "$(cat "$BG_DIR/rc" 2>/dev/null || echo 1)" $(($(date +%s) - BG_T)) "$BG_LIMIT"
    BG_PID=""
}

# skip NAME WHY — record a step that does not apply here.
skip() {
    STEPS+=("$1"); RESULTS+=("$(printf '%-28s %4ds' "skipped ($2)" 0)")
    echo "=== $1: skipped ($2)" | tee -a "$LOG"
}

# bench WHAT LIMIT_S ARGS... — `mmfast bench WHAT --gpu ARGS...`, when its module exists. ARGS
# must send the CSV/PNG into $RES.
bench() {
    local what=$1 limit=$2
    shift 2
    local name="bench $what" prev=""
    for a in "$@"; do [[ $prev == --op || $prev == --loss || $prev == --sizes ]] && name+=" $a"; prev=$a; done
    if [[ -f mmfast/bench/$what.py ]]; then
        step "$name" "$limit" "$PY" -m mmfast.cli bench "$what" --gpu "$@"
    else
        skip "$name" "mmfast/bench/$what.py not written yet"
    fi
}

# 1. carried wheels (open_clip, ftfy, inf-cl, ...): the image has torch/triton but not these.
if compgen -G ".whl/*.whl" >/dev/null; then
    step "install wheels" 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
    skip "install wheels" "no .whl/ carried"
fi

# 2. what we run on.
step "environment" 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -m mmfast.cli info; $PY -c 'import torch; assert torch.cuda.is_available(), \"no CUDA\"'"

# 3. benchmarks first (the GPU alone; nothing else running). --budget-s keeps each inside its
#    slot (rows past it are written as skipped); the step limit leaves room for a last compile.
# >>> projection (#4): the issue's target shapes. FLCE: mmfast (default, 64 MiB chunks, bf16 dW)
#     vs eager, Liger, torch.compile (last); then the projector, and LayerNorm (bench norm). (The LayerNorm backward
#     tile sweep, benchmarks/sweep_norm_bwd.py, ran once: results/nvidia-h100-80gb-hbm3/run2.)
bench projection 60 --op flce --out "$RES/projection_flce.csv" --quick --budget-s 48 \
    --providers mmfast-triton,mmfast-triton-c64,mmfast-triton-bf16dw,torch-eager,liger,torch-compile
bench projection 35 --op projector --out "$RES/projection_projector.csv" --quick --budget-s 26 \
    --providers mmfast-triton,mmfast-triton-recompute,torch-eager,torch-compile
bench norm 30 --op layernorm --out "$RES/norm_layernorm.csv" --quick --budget-s 22 \
    --providers mmfast-triton,torch-eager,liger,torch-compile
# >>> attention (#22): the four shapes for every provider (fwd+bwd), then the prefix-LM row and decode
#     (contiguous cache and paged through block_table), fwd only. Three calls so that FlexAttention's
#     compiles (the last provider of each) cannot starve the prefix and decode rows. mmfast at its fixed
#     configs (MMFAST_ATTN_AUTOTUNE=0), as the tests run it. Rows carry gemm_tflops (the card's bf16 GEMM
#     rate), so the digest prints each row's TFLOP/s as a percent of it. Regenerate the preference table
#     afterwards: python benchmarks/make_preferences.py (reads benchmarks/results/**/*.csv).
if [[ -f mmfast/bench/attention.py ]]; then
    step "bench attention shapes" 110 env MMFAST_ATTN_AUTOTUNE=0 "$PY" -m mmfast.cli bench attention --gpu \
        --cases vit_b16,vit_l14_336,llava_2k,llama_4k --modes fwd+bwd --budget-s 95 --out "$RES/attention.csv" \
        --providers mmfast-triton,mmfast-auto,sdpa-cudnn,sdpa-flash,sdpa-efficient,flash-attn,flex
    step "bench attention prefix" 45 env MMFAST_ATTN_AUTOTUNE=0 "$PY" -m mmfast.cli bench attention --gpu \
        --cases prefix_lm --modes fwd+bwd --budget-s 35 --out "$RES/attention_prefix.csv" \
        --providers mmfast-triton,mmfast-auto,sdpa-efficient,sdpa,flex
    step "bench attention decode" 30 env MMFAST_ATTN_AUTOTUNE=0 "$PY" -m mmfast.cli bench attention --gpu \
        --cases decode,decode_paged --modes fwd --budget-s 22 --out "$RES/attention_decode.csv" \
        --providers mmfast-triton,mmfast-auto,sdpa,sdpa-flash,sdpa-cudnn,sdpa-efficient,flash-attn
    # the rule: mmfast-auto <= 1.03x the fastest backend on every row just measured (fails the step if not)
    step "attention auto rule" 20 "$PY" benchmarks/make_preferences.py --rule --results "$RES"
else
    skip "bench attention" "mmfast/bench/attention.py not written yet"
fi
# >>> CLIP training step (#6): ViT-B-16, batch 256, bf16, mmfast vs open_clip.
step "bench train_clip" 60 "$PY" benchmarks/bench_train_clip.py --gpu --model ViT-B-16 --batch 256 \
    --reps 5 --budget-s 50 --out "$RES/train_clip.csv"
# >>> LLaVA training step (#7): LLaVA-1.5-7B shapes (ViT-L/14-336, 576 image tokens, LLaMA-7B)
#     truncated to 2 layers, seq 2048, bf16, mmfast vs transformers SDPA.
step "bench train_llava" 55 "$PY" benchmarks/bench_train_llava.py --gpu --shape llava7b-trunc --layers 2 \
    --batch 1 --reps 5 --budget-s 40 --out "$RES/train_llava.csv"
# >>> LLaVA anchor (#23): LLaVA-7B dims, 4 LLM + 4 vision layers, batch 4, seq 2048 (576 image tokens), bf16,
#     AdamW: transformers SDPA, mmfast, Liger (last: it patches transformers process-wide).
step "bench train_llava anchor" 90 "$PY" benchmarks/bench_train_llava.py --gpu --shape anchor \
    --reps 5 --budget-s 75 --out "$RES/train_llava_anchor.csv"
# >>> Inference (#27): batched LLaVA generation, LLaVA-1.5-7B shapes truncated to 4 LLM layers (576 image tokens),
#     32 requests of 64-256 text tokens, 128 new tokens, bf16: transformers generate (dynamic cache; static cache,
#     compiled) vs mmfast's serving engine (paged / contiguous); then CLIP ViT-B/16 encode, 8192 images (batch
#     1024) and texts (batch 256), open_clip vs mmfast. Not yet run on a GPU.
step "bench generate" 150 "$PY" benchmarks/bench_generate.py --gpu --shape llava7b-trunc --layers 4 \
    --new-tokens 128 --reps 3 --budget-s 130 --out "$RES/generate.csv"
step "bench encode" 60 "$PY" benchmarks/bench_encode.py --gpu --model ViT-B-16 --reps 5 --budget-s 50 \
    --out "$RES/encode.csv"

# 4. the C++ extension (CPU kernels; the GPU steps do not use it): check that it builds and loads
#    against this machine's torch, in the background beside the tests, into /tmp (the tree's build
#    is left alone).
bg_step "build C++ extension" 200 bash -c "$PY setup.py -q build_ext --build-lib /tmp/mmfast_ext \
    --build-temp /tmp/mmfast_ext/tmp && $PY -c 'import glob, importlib.util as u, torch
s = u.spec_from_file_location(\"mmfast._C\", glob.glob(\"/tmp/mmfast_ext/mmfast/_C*.so\")[0])
s.loader.exec_module(u.module_from_spec(s)); print(\"mmfast._C loads\")'"

# 5. the tests that touch CUDA: MMFAST_TEST_CUDA_ONLY keeps those marked `gpu` or taking the
#    `device`/`triton_backend` fixtures (tests/conftest.py); CPU-only tests already ran in CI.
#    -v: one line per test as it ends, and MMFAST_TEST_FAILLOG writes each failure's traceback to
#    failures.log as it happens, so a run cut by the time limit still says what passed and why not.
step "pytest (CUDA tests)" 125 env MMFAST_TEST_CUDA_ONLY=1 MMFAST_TEST_FAILLOG="$OUT/failures.log" \
    "$PY" -m pytest -v -p no:cacheprovider -m "gpu or not slow" -n 12 --timeout 100 --maxfail=40 -rfE \
    tests/ops tests/nn tests/models/test_kv_cache.py tests/models/test_llava_generate.py

# 6. in what time is left: a profile of the two rows mmfast lost by the widest margin on the H100
#    (LayerNorm, the CLIP step; attention at its fixed configs, no autotuning, to fit the slot).
step "profile" 40 env MMFAST_ATTN_AUTOTUNE=0 "$PY" benchmarks/profile_gpu.py --out "$RES/profile.txt"

# 7. the contrastive loss (#21; SUITE_ONLY=contrastive runs these alone, about 6 minutes): every provider
#    side by side at N = 8k-64k (eager holds 40 GiB of logits at 64k), mmfast's gemm path alone at
#    128k and 256k (eager cannot), SigLIP at 32k. Rows carry gemm_tflops (cuBLAS on the logits' GEMM).
bench contrastive 250 --out "$RES/contrastive.csv" --sizes 8192,32768,65536 --budget-s 240 \
    --providers mmfast-gemm,mmfast-triton,torch-eager,open_clip,inf_cl,torch-compile
bench contrastive 45 --out "$RES/contrastive.csv" --sizes 131072,262144 --budget-s 40 --providers mmfast-gemm
bench contrastive 70 --out "$RES/contrastive-siglip.csv" --loss siglip --sizes 32768 --budget-s 60 \
    --providers mmfast-gemm,mmfast-triton,torch-eager,open_clip,torch-compile

bg_wait

# 8. summary: the step table, then one line per benchmark row.
{
    echo
    echo "================ GPU suite: $(($(date +%s) - T0))s ================"
    for i in "${!STEPS[@]}"; do printf '%-24s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"; done
    "$PY" - "$RES" <<'EOF'
import csv, glob, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.csv"))):
    print(f"\n{os.path.basename(path)}")
    with open(path) as f:
        for r in csv.DictReader(f):
            if "error" not in r:  # not a harness CSV (a sweep): its columns as they are
                print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))
                continue
            if r["error"]:
                res = r["error"][:60]
            else:
                tf = f"{float(r['tflops']):7.1f} TFLOP/s" if r["tflops"] else ""
                prm = dict(kv.split("=", 1) for kv in r["params"].split(";") if "=" in kv)
                gemm = prm.get("gemm_tflops")
                if gemm and r["tflops"]:
                    tf += f" ({100 * float(r['tflops']) / float(gemm):4.1f}% of bf16 GEMM)"
                res = f"{float(r['median_ms']):9.3f} ms {float(r['peak_mem_mib'] or 'nan'):9.0f} MiB {tf}"
            prm = dict(kv.split("=", 1) for kv in r["params"].split(";") if "=" in kv)
            where = prm["name"] if "name" in prm else f"{r['x_name']}={r['x']}"
            print(f"  {r['mode']:<8} {where:<14} {r['provider']:<16} {res}")
EOF
} 2>&1 | tee -a "$LOG"

tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$RES"

for r in "${RESULTS[@]}"; do
    [[ $r == ok* || $r == skipped* ]] || exit 1
done
exit 0
