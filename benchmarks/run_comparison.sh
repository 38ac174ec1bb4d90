#!/usr/bin/env bash
# The beyond-the-paper comparison on offline MNIST-SVHN-Text (issue 20.4; FID of issue 19): every objective at the cpu
# preset (10 epochs of 20,000 pairs, batch 128 = 1,570 steps, latent 20, beta 2.5), evaluated with latent
# classification, coherence, log-likelihoods (100 test tuples) and FID (50 images per set). One run after another on
# one core; a finished run (results.json present) is skipped, an interrupted one resumed.
# Usage: benchmarks/run_comparison.sh [names...]   (default: all; seed with SEED=1 ..., dataset with DATASET=polymnist)
# DATASET=polymnist: the PolyMNIST comparison at 3,000 steps (8,000 tuples, 24 epochs of batch 64, latent 64 – MMVAE+
# z 32 + w 32 –, beta 1: the complete-data schedule of results/incomplete), FID on 50 images per set, into
# results/compare_3000/polymnist (`papermill nbs/reproduce.ipynb out.ipynb -p dataset polymnist -p epochs 24
# -p compare_dir results/compare_3000 -p tag _3000` renders them with the paper's models at that schedule).
set -u
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
DATASET=${DATASET:-mnist_svhn_text}
DEFAULT_ROOT=results/compare/$DATASET
[ "$DATASET" = polymnist ] && DEFAULT_ROOT=results/compare_3000/polymnist   # apart from the 1,000-step runs
ROOT=${ROOT:-$DEFAULT_ROOT}
COMMON=(--dataset "$DATASET" --seed "$SEED" --metrics latent,coherence,loglik,fid --fid_samples 50 --loglik_max_test 100
        --device cpu --data_dir "${DATA_DIR:-data}")
if [ "$DATASET" = polymnist ]; then
  COMMON+=(--epochs "${EPOCHS:-24}" --num_train 8000 --num_test 1000 --eval_max_test 1000); PLUS="--latent_dim 32 --private_dim 32"
  WARMUP=1000
else
  COMMON+=(--preset cpu); PLUS="--private_dim 20"; WARMUP=500
fi
declare -A RUNS=(
  [mopoe]="--objective mopoe"
  [mmvae]="--objective mmvae"
  [mvae_warmup]="--objective mvae --beta_warmup $WARMUP"
  [mmjsd]="--objective mmjsd"
  [mmvaeplus]="--objective mmvaeplus $PLUS --objective_options K=1,estimator='elbo',family='laplace'"
  [mopoe_private4]="--objective mopoe --private_dim 4"
  [mopoe_aux_private4]="--objective mopoe_aux --private_dim 4"
)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(mopoe mmvae mmjsd mvae_warmup mmvaeplus mopoe_private4 mopoe_aux_private4)
for n in "${names[@]}"; do
  out="$ROOT/${n}_seed$SEED"
  [ -f "$out/results.json" ] && { echo "done: $out"; continue; }
  resume=false; [ -f "$out/checkpoint.pt" ] && resume=true
  echo "== $n seed $SEED -> $out (resume $resume) $(date -u +%H:%M:%S)"
  OMP_NUM_THREADS=1 mopoe-train "${COMMON[@]}" ${RUNS[$n]} --out_dir "$out" --resume $resume || echo "FAILED: $n"
done
