#!/usr/bin/env bash
# The beyond-the-paper comparison on offline MNIST-SVHN-Text (issue 20.4; FID of issue 19): every objective at the cpu
# preset (10 epochs of 20,000 pairs, batch 128 = 1,570 steps, latent 20, beta 2.5), evaluated with latent
# classification, coherence, log-likelihoods (100 test tuples) and FID (50 images per set). One run after another on
# one core; a finished run (results.json present) is skipped, an interrupted one resumed.
# Usage: benchmarks/run_comparison.sh [names...]   (default: all; seed with SEED=1 ...)
set -u
cd "$(dirname "$0")/.."
SEED=${SEED:-0}
ROOT=${ROOT:-results/compare/mnist_svhn_text}
COMMON=(--dataset mnist_svhn_text --preset cpu --seed "$SEED" --metrics latent,coherence,loglik,fid --fid_samples 50
        --loglik_max_test 100 --device cpu --data_dir "${DATA_DIR:-data}")
declare -A RUNS=(
  [mopoe]="--objective mopoe"
  [mmvae]="--objective mmvae"
  [mvae_warmup]="--objective mvae --beta_warmup 500"
  [mmjsd]="--objective mmjsd"
  [mmvaeplus]="--objective mmvaeplus --private_dim 20 --objective_options K=1,estimator='elbo',family='laplace'"
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
