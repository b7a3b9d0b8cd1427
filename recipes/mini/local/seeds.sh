#!/usr/bin/env bash
# Stage 10 of recipes/mini/run.sh: the main job's CTC comparison for seeds 0, 1, 2, mean +- sd of the test PERs.
#
#   bash recipes/mini/local/seeds.sh [EXP]     # EXP = recipes/mini/exp (needs stage 0's manifests and stage 3's units)
#
# Per seed: the anchor (12 CPU-minutes, one thread, in the background), CTC from scratch (ctc_phoneme_fbank.yaml),
# WavLM-style pretraining (wavlm_pretrain_fbank.yaml, mixing seeded too) and the fine-tuning from it
# (wavlm_ctc_phoneme_fbank.yaml), each tested at its best val checkpoint. Seed 0 is the main job's runs (reused when
# they are complete; every fit resumes from its last.ckpt). Writes EXP/seeds/results.md.
set -euo pipefail
exp=${1:-recipes/mini/exp}
conf=recipes/mini/conf
out=$exp/seeds
mkdir -p "$out"
start=$SECONDS

root() { if [[ $1 == 0 ]]; then echo "$exp/$2"; else echo "$out/seed$1/$2"; fi; }
anchor() {
  for seed in 0 1 2; do
    local dir=$out/seed$seed/anchor
    [[ $seed == 0 && -f $exp/anchor/result.json ]] && continue
    [[ -f $dir/result.json ]] && continue
    mkdir -p "$dir"
    python recipes/mini/local/anchor_bilstm.py --cpu-minutes "${ANCHOR_CPU_MINUTES:-12}" --seed "$seed" --output "$dir/result.json" \
      > "$dir/train.log" 2>&1
  done
}
OMP_NUM_THREADS=1 anchor &
anchor_pid=$!
trap 'kill $anchor_pid 2>/dev/null; true' EXIT

export OMP_NUM_THREADS=1
for seed in 0 1 2; do
  scratch=$(root "$seed" ctc_phoneme_fbank)
  pretrain=$(root "$seed" wavlm_fbank)
  finetune=$(root "$seed" wavlm_ctc_phoneme_fbank)
  echo "=== seed $seed ($(date +%H:%M:%S)) ==="
  common=(--seed_everything "$seed")
  speechlab fit --config $conf/ctc_phoneme_fbank.yaml "${common[@]}" --trainer.default_root_dir "$scratch" --ckpt_path last
  speechlab test --config $conf/ctc_phoneme_fbank.yaml "${common[@]}" --trainer.default_root_dir "$scratch" --ckpt_path best
  speechlab fit --config $conf/wavlm_pretrain_fbank.yaml "${common[@]}" --model.init_args.mixing_seed "$seed" \
    --trainer.default_root_dir "$pretrain" --ckpt_path last
  ft=(--trainer.default_root_dir "$finetune" --model.init_args.init_from "$pretrain/checkpoints/last.ckpt")
  speechlab fit --config $conf/wavlm_ctc_phoneme_fbank.yaml "${common[@]}" "${ft[@]}" --ckpt_path last
  speechlab test --config $conf/wavlm_ctc_phoneme_fbank.yaml "${common[@]}" "${ft[@]}" --ckpt_path best
done
echo "waiting for the anchor runs ($out/seed*/anchor/train.log)"
wait "$anchor_pid"
trap - EXIT
python recipes/mini/local/results.py --exp "$exp" --seeds --wall-seconds $((SECONDS - start)) | tee "$out/results.md"
