#!/usr/bin/env bash
# FID for the committed comparisons of the paper's three models (issue 19): the runs keep no checkpoint in the
# repository, so re-evaluating them needs retraining with the same options plus FID (50 images per set); on a CPU the
# retrained models are the committed ones bit for bit (the script's caller compares metrics.jsonl).
#   benchmarks/run_polymnist_fid.sh mopoe mvae mmvae                  # PolyMNIST: the 1,000-step complete-data runs of
#       results/incomplete (8,000 tuples, 8 epochs of batch 64, latent 64, beta 1) -> results/compare/polymnist
#   DATASET=mnist_svhn_text benchmarks/run_polymnist_fid.sh mopoe mvae mmvae   # the paper's comparison of
#       results/reproduce (cpu preset, 20 epochs = 3,140 steps of 128, beta 2.5) -> results/reproduce
set -u
cd "$(dirname "$0")/.."
DATASET=${DATASET:-polymnist}
if [ "$DATASET" = polymnist ]; then
  ROOT=${ROOT:-results/compare/polymnist}
  OPTS=(--epochs 8 --num_train 8000 --num_test 1000 --eval_max_test 1000 --loglik_max_test 100)
else
  ROOT=${ROOT:-results/reproduce}
  OPTS=(--preset cpu --epochs 20 --loglik_max_test 200)
fi
for obj in "$@"; do
  out="$ROOT/${obj}_seed0"; [ "$DATASET" = polymnist ] || out="$ROOT/${DATASET}_${obj}_seed0"
  [ -f "$out/results.json" ] && { echo "done: $out"; continue; }
  resume=false; [ -f "$out/checkpoint.pt" ] && resume=true
  echo "== $DATASET $obj -> $out $(date -u +%H:%M:%S)"
  OMP_NUM_THREADS=1 mopoe-train --dataset "$DATASET" --objective "$obj" "${OPTS[@]}" --seed 0 --device cpu \
    --data_dir "${DATA_DIR:-data}" --metrics latent,coherence,loglik,fid --fid_samples 50 --out_dir "$out" \
    --resume $resume || echo "FAILED: $obj"
done
