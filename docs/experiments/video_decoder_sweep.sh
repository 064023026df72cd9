#!/usr/bin/env bash
# Issue #24 experiment: video-decoder recipes side by side on one GPU (video_decoder_sweep.py), as sent to the
# lent H200 with .gpuexp/ (world/ and judge.pt: see the .py) and .whl/ (diffusers, importlib_metadata) carried.
# SWEEP=1: the nine recipes (ALLOW=420); SWEEP=2: two of them with a 4,000-step cosine (ALLOW=235);
# SWEEP=3: the next call (not yet run): velocity prediction at zero terminal SNR with reversed pairs (the recipe
# since 2026-12-05: it drew the caption's axis in 63 of 64 clips after 4,000 steps on the 2-core machine, the sign
# at chance) from the image decoder over a 10,000-step cosine, beside the two-phase way (noise prediction on SD's
# schedule first, then velocity at zero SNR from its weights), each as far as ALLOW lets it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L; python3 -c "import diffusers, torch; print(diffusers.__version__, torch.__version__)" || exit 1
mkdir -p /tmp/res /tmp/gifs
ALLOW=${ALLOW:-420}
EV='"evals":[500,1000,2000,3000,4000,5000,6000,8000,10000]'
if [ "${SWEEP:-1}" = 1 ]; then cfgs=(
 '{"name":"A_all5e-4","lr":5e-4,"train":"all",'$EV'}'
 '{"name":"B_all2e-4","lr":2e-4,"train":"all",'$EV'}'
 '{"name":"C_all1e-4","lr":1e-4,"train":"all",'$EV'}'
 '{"name":"D_mot5e-4","lr":5e-4,"train":"motion",'$EV'}'
 '{"name":"E_mot2e-3","lr":2e-3,"train":"motion",'$EV'}'
 '{"name":"F_all5e-4_single","lr":5e-4,"train":"all","single":true,'$EV'}'
 '{"name":"G_all5e-4_b64","lr":5e-4,"train":"all","batch":64,'$EV'}'
 '{"name":"H_split1e-3_1e-4","lr":1e-3,"lr_rest":1e-4,"train":"split",'$EV'}'
 '{"name":"I_all5e-4_12k","lr":5e-4,"train":"all","total":12000,'$EV'}'
); elif [ "${SWEEP}" = 3 ]; then
  E1='{"name":"EPS","lr":5e-4,"single":true,"total":4000,"evals":[2000,4000],"ckpt":"/tmp/res/EPS.pt"}'
  V2='{"name":"EPS_then_V","lr":2e-4,"single":true,"pred":"v_prediction","zsnr":true,"reverse":true,"init":"/tmp/res/EPS.pt","total":4000,"evals":[1000,2000,3000,4000]}'
  (python3 docs/experiments/video_decoder_sweep.py "$E1" /tmp/res $((ALLOW * 2 / 5)) > /tmp/res/EPS.log 2>&1
   python3 docs/experiments/video_decoder_sweep.py "$V2" /tmp/res $((ALLOW * 3 / 5 - 20)) > /tmp/res/EPS_then_V.log 2>&1) &
  cfgs=('{"name":"V_zsnr_rev","lr":5e-4,"single":true,"pred":"v_prediction","zsnr":true,"reverse":true,"total":10000,"ema":true,"evals":[1000,2000,4000,6000,8000,10000]}')
else cfgs=(
 '{"name":"A4k_all5e-4","lr":5e-4,"train":"all","total":4000,"evals":[1000,2000,3000,4000]}'
 '{"name":"F4k_single5e-4","lr":5e-4,"train":"all","single":true,"total":4000,"evals":[1000,2000,3000,4000]}'
); fi
for c in "${cfgs[@]}"; do
  n=$(python3 -c "import json,sys;print(json.loads(sys.argv[1])['name'])" "$c")
  python3 docs/experiments/video_decoder_sweep.py "$c" /tmp/res "$ALLOW" > /tmp/res/$n.log 2>&1 &
done
sleep 45; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cat /tmp/res/*.jsonl > $OUT/results.jsonl
for f in /tmp/res/*.log; do echo "== $f"; grep -v "Loading\|it/s" $f | tail -n 8; done > $OUT/logs.txt
tar czf $OUT/gifs.tgz -C /tmp gifs
grep '"eval' $OUT/results.jsonl | python3 -c "
import sys, json
for l in sys.stdin:
    d = json.loads(l); print(d['name'], d['event'], d['step'], d['g'], d['top1'], d['dir'], d['t'])"
