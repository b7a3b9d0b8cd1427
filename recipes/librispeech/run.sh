#!/usr/bin/env bash
# WavLM on LibriSpeech 960 h: HuBERT-style iterative pseudo-labels + utterance-mixing pretraining, then CTC
# fine-tuning on 10 h / 100 h. GPU recipe (configs: 8 GPUs for pretraining, 2 for fine-tuning).
#
#   bash recipes/librispeech/run.sh --librispeech /data/LibriSpeech --noise /data/dns_noise \
#        [--librilight /data/librispeech_finetuning] [--stage N] [--stop-stage M]
#
# Stages (each skippable; training stages resume from their last.ckpt when re-run):
#   0  manifests: train-clean-100/360, train-other-500, dev/test-clean/other, train-960 (+ train-10h)  -> data/
#   1  noise manifest from any folder of audio (DNS-Challenge / MUSAN noise ...)                        -> data/noise.jsonl
#   2  k-means iteration 1: 100 clusters on 39-d MFCC (fit on 10 % of train-960)                       -> exp/units_mfcc/
#   3  pretraining iteration 1 (WavLM Base on MFCC units, 250k updates)                                 -> exp/wavlm_base_iter1/
#   4  k-means iteration 2: 500 clusters on layer 6 of the iteration-1 model                            -> exp/units_base_l6/
#   5  WavLM Base pretraining (iteration 2, 400k updates)                                               -> exp/wavlm_base/
#   6  WavLM Base+ schedule (1M updates) on the same units (optional; real Base+ used 94k h)            -> exp/wavlm_base_plus/
#   7  k-means on layer 9 of WavLM Base + WavLM Large pretraining (optional)                            -> exp/wavlm_large/
#   8  CTC fine-tuning of WavLM Base on 100 h (and 10 h when --librilight is given)                     -> exp/ctc_100h/, exp/ctc_10h/
#   9  test-clean / test-other WER of the fine-tuned models (greedy decoding, no LM)
set -euo pipefail

stage=0
stop_stage=9
librispeech=""
librilight=""
noise=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --stop-stage) stop_stage="$2"; shift 2 ;;
    --librispeech) librispeech="$2"; shift 2 ;;
    --librilight) librilight="$2"; shift 2 ;;
    --noise) noise="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/../.."   # repository root: configs use paths relative to it
data=recipes/librispeech/data
exp=recipes/librispeech/exp
conf=recipes/librispeech/conf
run() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }
log() { echo -e "\n=== stage $1: $2 ($(date +%H:%M:%S)) ==="; }
need() { [[ -n "$2" ]] || { echo "stage needs $1 (see --help)" >&2; exit 2; }; }
evalsets=(dev-clean dev-other test-clean test-other)

if run 0; then
  log 0 "LibriSpeech manifests"
  need --librispeech "$librispeech"
  extra=()
  [[ -n "$librilight" ]] && extra=(--split "train-10h=$librilight")
  python recipes/librispeech/prepare.py --root "$librispeech" --out "$data" --num-workers 16 "${extra[@]}" \
    --merge train-960=train-clean-100,train-clean-360,train-other-500
fi

if run 1; then
  log 1 "noise manifest"
  need --noise "$noise"
  python recipes/librispeech/prepare_noise.py --root "$noise" --out "$data/noise.jsonl" --max-hours 2 \
    --max-clip-seconds 30 --num-workers 16
fi

label_evalsets() {  # $1 = units dir, extra args = feature options
  local units=$1; shift
  for s in "${evalsets[@]}"; do
    speechlab kmeans --manifest "$data/$s.jsonl" --output-dir "$units" \
      --centroids "$units/centroids.safetensors" --num-workers 8 "$@"
  done
}

if run 2; then
  log 2 "k-means iteration 1: 100 clusters on MFCC"
  speechlab kmeans --manifest "$data/train-960.jsonl" --output-dir "$exp/units_mfcc" --num-clusters 100 \
    --fit-fraction 0.1 --num-workers 8
  label_evalsets "$exp/units_mfcc"
fi

if run 3; then
  log 3 "pretraining iteration 1 (MFCC units)"
  speechlab fit --config "$conf/wavlm_base_iter1.yaml" --ckpt_path last
fi

if run 4; then
  log 4 "k-means iteration 2: 500 clusters on layer 6 of the iteration-1 model"
  ckpt="$exp/wavlm_base_iter1/checkpoints/last.ckpt"
  speechlab kmeans --manifest "$data/train-960.jsonl" --output-dir "$exp/units_base_l6" --num-clusters 500 \
    --checkpoint "$ckpt" --layer 6 --fit-fraction 0.1 --max-fit-frames 2000000 --num-workers 8
  label_evalsets "$exp/units_base_l6" --checkpoint "$ckpt" --layer 6
fi

if run 5; then
  log 5 "WavLM Base pretraining (iteration 2)"
  speechlab fit --config "$conf/wavlm_base.yaml" --ckpt_path last
fi

if run 6; then
  log 6 "WavLM Base+ schedule (optional)"
  speechlab fit --config "$conf/wavlm_base_plus.yaml" --ckpt_path last
fi

if run 7; then
  log 7 "k-means on layer 9 of WavLM Base, then WavLM Large (optional)"
  ckpt="$exp/wavlm_base/checkpoints/last.ckpt"
  speechlab kmeans --manifest "$data/train-960.jsonl" --output-dir "$exp/units_base_l9" --num-clusters 500 \
    --checkpoint "$ckpt" --layer 9 --fit-fraction 0.1 --max-fit-frames 2000000 --num-workers 8
  label_evalsets "$exp/units_base_l9" --checkpoint "$ckpt" --layer 9
  speechlab fit --config "$conf/wavlm_large.yaml" --ckpt_path last
fi

if run 8; then
  log 8 "CTC fine-tuning"
  speechlab fit --config "$conf/ctc_100h.yaml" --ckpt_path last
  if [[ -f "$data/train-10h.jsonl" ]]; then
    speechlab fit --config "$conf/ctc_10h.yaml" --ckpt_path last
  fi
fi

if run 9; then
  log 9 "test-clean / test-other WER (greedy, no LM)"
  for ft in ctc_100h ctc_10h; do
    ckpt="$exp/$ft/checkpoints/last.ckpt"
    [[ -f "$ckpt" ]] || continue
    for s in test-clean test-other; do
      echo "--- $ft on $s"
      speechlab test --config "$conf/$ft.yaml" --ckpt_path "$ckpt" --data.init_args.test_manifest "$data/$s.jsonl"
    done
  done
fi
