#!/usr/bin/env bash
# The beyond-the-paper comparison on offline MNIST-SVHN-Text (issue 20.4; FID of issue 19): every objective at the cpu
# preset (10 epochs of 20,000 pairs, batch 128 = 1,570 steps, latent 20, beta 2.5), evaluated with latent
# classification, coherence, log-likelihoods (100 test tuples) and FID (50 images per set). One run after another on
# one core; a finished run (results.json present) is skipped, an interrupted one resumed.
# Usage: benchmarks/run_comparison.sh [names...]   (default: all; seed with SEED=1 ..., dataset with DATASET=polymnist;
# BETA=0.25 ...: a beta curve's point, into <name>_beta<BETA>_seed<k>; METRICS=... overrides the metrics)
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
# the beta curves need latent classification and coherence (and, for MNIST-SVHN-Text's Figure 1, log p(X)) only
BETA_METRICS=latent,coherence; [ "$DATASET" = polymnist ] || BETA_METRICS=latent,coherence,loglik
METRICS=${METRICS:-$([ -n "${BETA:-}" ] && echo $BETA_METRICS || echo latent,coherence,loglik,fid,clustering)}
COMMON=(--dataset "$DATASET" --seed "$SEED" --metrics "$METRICS" --fid_samples 50 --loglik_max_test 100
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
  [mmvm]="--objective mmvm --objective_options alpha_steps=0,alpha_end=0.0"
  [cmvae]="--objective cmvae $PLUS --objective_options num_clusters=40,K=1,estimator='elbo',family='laplace'"
  [code_vae]="--objective code_vae"
)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(mopoe mmvae mmjsd mvae_warmup mmvaeplus mopoe_private4 mopoe_aux_private4 mmvm
                                                cmvae code_vae)
TAG=${BETA:+_beta$BETA}; [ -n "${BETA:-}" ] && COMMON+=(--beta "$BETA")   # BETA=0.25 ...: the beta curves
for n in "${names[@]}"; do
  out="$ROOT/${n}${TAG}_seed$SEED"
  [ -f "$out/results.json" ] && { echo "done: $out"; continue; }
  resume=false; [ -f "$out/checkpoint.pt" ] && resume=true
  echo "== $n seed $SEED -> $out (resume $resume) $(date -u +%H:%M:%S)"
  OMP_NUM_THREADS=1 mopoe-train "${COMMON[@]}" ${RUNS[$n]} --out_dir "$out" --resume $resume || echo "FAILED: $n"
done
