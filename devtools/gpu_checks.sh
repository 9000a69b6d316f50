#!/usr/bin/env bash
# The GPU checks a CPU machine cannot run, on a bare GPU server without internet: run from the repository root.
# Wheels of the packages the server lacks sit in .whl/ (and webdataset 0.2.86 for open_clip's trainer in .whl0286/),
# fetched where pip works with: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl -r devtools/gpu_wheels.txt
# (the server's image already has torch, numpy, scipy, pandas, seaborn, scikit-learn, pytest, ...; scikit-image, whose
# wheel bundles the photographs the feed and textured parts cut their samples from, comes from .whl);
# logs go to $OUT (default runs/gpu_checks).
#   part=notebooks  every notebook with `#| cuda` cells, run with the cuda flag, plus the CUDA pytest tests
#   part=train      a cluster-masked ViT-B/16 training run (bf16, 8 loader workers) on synthetic shards, then its resume
#   part=bench      `cluster_glip bench` for ViT-B/16 at batch 256 in bf16, against open_clip's trainer
#   part=compiled   the same for four settings with the step compiled (--compile)
#   part=newer      the newer methods (#19) as step settings: CLIPA text lengths 32 / 16 / 8, SigLIP, PGS (ViT-B/16, batch 256, bf16)
#   part=feed       the input path (#18): a loader worker's CPU per sample with the crops resized in the worker or on
#                   the GPU, the GPU's share, nvJPEG decoding, on img2dataset-style photo shards; then a random-50 %
#                   compiled ViT-B/16 run fed by 4 workers, resized in the workers and on the GPU (samples/s in the logs)
#   part=textured   the textured_scenes study's GPU version (not a default part): its data, the budget rule measured
#                   here (120 s of training per point), then 10 strategies x 5 seeds of ViT-S-sized towers, bf16
set -uo pipefail
OUT=${OUT:-runs/gpu_checks}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/wds0286 .whl0286/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH JUPYTER_PATH=/tmp/site/share/jupyter
fi
export PYTHONUNBUFFERED=1
cg() { python3 -c 'import sys; from cluster_glip.cli import main; sys.argv[0] = "cluster_glip"; main()' "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, open_clip, webdataset; print("torch", torch.__version__, "open_clip", open_clip.__version__, "webdataset", webdataset.__version__)'
for part in ${PARTS:-notebooks train bench}; do case $part in
notebooks)
  for nb in $(grep -rlE '"#\| *cuda' nbs --include='*.ipynb'); do
    start=$SECONDS; nbdev_test --path "$nb" --flags cuda 2>&1 | tee -a "$OUT/notebooks.log"
    echo "$nb: exit ${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$OUT/notebooks.log"
  done
  python3 -m pytest tests -q -rs -k 'cuda or gpu' -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/notebooks.log" ;;
train)
  cg synth --out /tmp/synth --n_train 20000 --n_zeroshot 240 --n_retrieval 100 --n_sugarcrepe 20 | tail -2
  run() { cg train --config cluster_cc12m_vitb16 --set train_data='/tmp/synth/train/{00000..00019}.tar' \
      --set train_num_samples=null --set epochs=null --set batch_size=256 --set workers=12 --set warmup=10 --set log_every=10 \
      --set output_dir=/tmp/gpu_train --set checkpoint_every=40 --set keep_last=1 --set tune_steps=0 \
      --set progress_bar=false "$@"; }
  run --set steps=40 2>&1 | tail -3
  run --set steps=80 --set resume=latest 2>&1 | tail -3
  cp /tmp/gpu_train/metrics.jsonl "$OUT/train_metrics.jsonl" ;;
bench)
  cg bench --model ViT-B-16 --batch 256 --precision amp_bf16 --steps 10 --warmup 5 --repeats 5 --workers 12 --max_batch \
     --openclip_pythonpath /tmp/wds0286 --out "$OUT/bench_gpu_vitb16" 2>&1 | tee "$OUT/bench.log" ;;
compiled)
  cg bench --model ViT-B-16 --batch 256 --precision amp_bf16 --settings none,random-0.5,random-0.75,cluster-0.5 \
     --compare '' --no_feed --compile --steps 10 --warmup 5 --repeats 5 --out "$OUT/bench_gpu_vitb16_compiled" 2>&1 | tee "$OUT/bench_compiled.log" ;;
newer)
  cg bench --model ViT-B-16 --batch 256 --precision amp_bf16 --settings none,text-32,text-16,text-8,siglip,pgs-0.5,cluster-0.5 \
     --compare '' --no_feed --steps 10 --warmup 5 --repeats 5 --out "$OUT/bench_gpu_vitb16_newer" 2>&1 | tee "$OUT/bench_newer.log" ;;
feed)
  python3 nbs/benchmarks/loader_cpu.py --device cuda --repeats 3 --out "$OUT/loader_cpu_gpu.json" 2>&1 | tee "$OUT/feed.log"
  python3 -c 'from cluster_glip.feed import write_photo_shards; write_photo_shards("/tmp/photos", 12000, shard_size=500)'
  for where in loader device; do
    cg train --config flip_cc12m_vitb16 --set train_data='/tmp/photos/{00000..00023}.tar' --set train_num_samples=12000 \
      --set epochs=null --set steps=40 --set warmup=5 --set workers=4 --set precision=amp_bf16 --set compile=true \
      --set data.resize_on=$where --set data.resampled=true --set log_every=10 --set checkpoint_every=1000 \
      --set keep_last=1 --set progress_bar=false --set output_dir=/tmp/feed_$where ${FEED_SET:-} 2>&1 | tail -2
    cp /tmp/feed_$where/metrics.jsonl "$OUT/feed_train_$where.jsonl"
  done ;;
textured)
  cg textured --out data/textured 2>&1 | tail -2
  budget=$(cg budget --config textured_gpu --budget 120 2>&1 | tee "$OUT/textured_budget.log" | tail -1)
  cg sweep textured_scenes_gpu --root "$OUT" --gpus all $budget 2>&1 | tail -3 | tee "$OUT/textured_sweep.log" ;;
esac; done
