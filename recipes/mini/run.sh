#!/usr/bin/env bash
# The mini recipe: every speechlab family on the bundled data/, on a CPU.
#
#   bash recipes/mini/run.sh                       # all stages
#   bash recipes/mini/run.sh --stage 1 --stop-stage 2
#
# Stages (each one skippable, and re-running one resumes or overwrites only its own outputs):
#   0  prepare manifests from data/ (train/val/test splits)             -> exp/data/*.jsonl
#   1  phoneme CTC from scratch on espeak English                        -> exp/ctc_phoneme/
#   2  evaluate it on the test split (greedy decoding, PER via jiwer)
#   3  WavLM iteration 1: MFCC k-means units, masked-unit pretraining     -> exp/wavlm/
#      on noisy / overlapped mixtures of the bundled speech and noise
#   4  WavLM iteration 2: k-means on the pretrained model's layer 2      -> exp/wavlm/units_l2/
#   5  phoneme CTC fine-tuned from the pretrained WavLM (same budget as 1), and its test PER
#   6  UniSpeech: multitask pretraining (English phone CTC with the swap + contrastive on all languages),
#      then CTC fine-tuning on Swahili and its test PER                  -> exp/unispeech/, exp/unispeech_ft_sw/
#   7  neural codec (tiny): train on the bundled speech, evaluate on held-out LJ Speech clips -> exp/codec/
#   8  the UniSpeech low-resource table: rows (a)-(d) x sw/tr/cy      -> exp/unispeech_experiment/results.md
#   9  print the results table                                           -> exp/results.md
#  11  phoneme CTC from scratch with fbank + Conformer, test PER of the best val checkpoint -> exp/ctc_phoneme_fbank/
set -euo pipefail

stage=0
stop_stage=100
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --stop-stage) stop_stage="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/../.."   # repository root: configs use paths relative to it
exp=recipes/mini/exp
run() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }
log() { echo -e "\n=== stage $1: $2 ($(date +%H:%M:%S)) ==="; }

if run 0; then
  log 0 "prepare manifests"
  python recipes/mini/prepare.py --out "$exp/data"
fi

if run 1; then
  log 1 "phoneme CTC from scratch (resumes from last.ckpt if interrupted)"
  speechlab fit --config recipes/mini/conf/ctc_phoneme.yaml --ckpt_path last
fi

if run 2; then
  log 2 "evaluate phoneme CTC on the test split"
  speechlab test --config recipes/mini/conf/ctc_phoneme.yaml --ckpt_path "$exp/ctc_phoneme/checkpoints/last.ckpt"
fi

wavlm=$exp/wavlm
if run 3; then
  log 3 "WavLM iteration 1: MFCC k-means units, then masked speech denoising pretraining"
  speechlab kmeans --manifest "$exp/data/pretrain_train.jsonl" --output-dir "$wavlm/units_mfcc" --num-clusters 100
  speechlab kmeans --manifest "$exp/data/pretrain_val.jsonl" --output-dir "$wavlm/units_mfcc" \
    --centroids "$wavlm/units_mfcc/centroids.safetensors"
  speechlab fit --config recipes/mini/conf/wavlm_pretrain.yaml --ckpt_path last
fi

if run 4; then
  log 4 "WavLM iteration 2: k-means on layer 2 of the pretrained model"
  ckpt=$wavlm/iter1/checkpoints/last.ckpt
  speechlab kmeans --manifest "$exp/data/pretrain_train.jsonl" --output-dir "$wavlm/units_l2" --num-clusters 100 \
    --checkpoint "$ckpt" --layer 2
  speechlab kmeans --manifest "$exp/data/pretrain_val.jsonl" --output-dir "$wavlm/units_l2" \
    --centroids "$wavlm/units_l2/centroids.safetensors" --checkpoint "$ckpt" --layer 2
fi

if run 5; then
  log 5 "phoneme CTC fine-tuned from the pretrained WavLM"
  speechlab fit --config recipes/mini/conf/wavlm_ctc_phoneme.yaml --ckpt_path last
  speechlab test --config recipes/mini/conf/wavlm_ctc_phoneme.yaml \
    --ckpt_path "$exp/wavlm_ctc_phoneme/checkpoints/last.ckpt"
fi

if run 6; then
  log 6 "UniSpeech multitask pretraining, then low-resource (Swahili) CTC fine-tuning"
  speechlab fit --config recipes/mini/conf/unispeech.yaml --ckpt_path last
  speechlab fit --config recipes/mini/conf/unispeech_ft_sw.yaml --ckpt_path last
  speechlab test --config recipes/mini/conf/unispeech_ft_sw.yaml \
    --ckpt_path "$exp/unispeech_ft_sw/checkpoints/last.ckpt"
fi

if run 7; then
  log 7 "neural codec: train (reconstruction, then GAN), evaluate at 1 and 4 quantizer levels"
  speechlab fit --config recipes/mini/conf/codec.yaml --ckpt_path last
  speechlab codec-eval --manifest "$exp/data/lj_test.jsonl" --max-seconds 4 --n-q 1,4 \
    --codec preset:codec_tiny --codec "$exp/codec/pretrained" | tee "$exp/codec/eval.md"
fi

if run 8; then
  log 8 "UniSpeech low-resource experiment table (same budget per row)"
  python recipes/mini/local/unispeech_experiment.py --out "$exp/unispeech_experiment" \
    --seeds 0 --pretrain-steps 300 --finetune-steps 200 --batch-size 6
fi

if run 9; then
  log 9 "results"
  python recipes/mini/local/results.py --exp "$exp" | tee "$exp/results.md"
fi

if run 10; then
  log 10 "use the phoneme CTC model: export it (speechlab and Hugging Face formats, each with a round-trip report), transcribe the test split"
  speechlab export "$exp/ctc_phoneme" --out "$exp/ctc_phoneme/export" --overwrite
  speechlab export "$exp/ctc_phoneme" --out "$exp/ctc_phoneme/export_hf" --format hf --overwrite
  speechlab transcribe --model "$exp/ctc_phoneme" "$exp/data/en_test.jsonl" --format jsonl --no-progress \
    --output "$exp/ctc_phoneme/test_transcripts.jsonl"
fi

if run 11; then
  log 11 "phoneme CTC from scratch, fbank + Conformer; test PER of the checkpoint with the best val PER"
  speechlab fit --config recipes/mini/conf/ctc_phoneme_fbank.yaml --ckpt_path last
  best=$(python -c "from speechlab.checkpoints.run_dir import run_checkpoint as c; print(c('$exp/ctc_phoneme_fbank', 'best'))")
  speechlab test --config recipes/mini/conf/ctc_phoneme_fbank.yaml --ckpt_path "$best"
fi
