#!/usr/bin/env bash
# UniSpeech on Common Voice: English labeled pretraining (+ unlabeled target speech), then 1 h CTC fine-tuning.
#
#   bash recipes/commonvoice/run.sh --cv-root /data/cv-corpus-XX --targets "cy tr" [--stage N] [--stop-stage M]
#
# --cv-root holds one folder per locale (en/, cy/, ...) of a standard release (clips/*.mp3, *.tsv).
# Stages (each skippable; fit stages resume from last.ckpt):
#   0  manifests: en train/dev/test; per target language: full train (unlabeled pool), a 1 h train subset, dev, test
#   1  UniSpeech pretraining (conf/unispeech_pretrain.yaml)                       -> exp/unispeech_pretrain/
#   2  CTC fine-tuning on each target's 1 h subset (conf/finetune.yaml)          -> exp/finetune_<lang>/
#   3  test each fine-tuned model (PER with phonemes, WER/CER with characters)
# Phonemes need `pip install phonemizer` and espeak-ng; without them prepare.py falls back to characters and this
# script switches the tokenizer to char (the numbers are then CER/WER, not PER).
set -euo pipefail

stage=0; stop_stage=100; cv_root=""; targets="cy"; extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --stop-stage) stop_stage="$2"; shift 2 ;;
    --cv-root) cv_root="$2"; shift 2 ;;
    --targets) targets="$2"; shift 2 ;;
    --to-flac) extra+=(--to-flac); shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/../.."
exp=recipes/commonvoice/exp
data=$exp/data
run() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }
log() { echo -e "\n=== stage $1: $2 ($(date +%H:%M:%S)) ==="; }
tokenizer() { python -c "import phonemizer" 2>/dev/null && echo phoneme || echo char; }

if run 0; then
  log 0 "manifests"
  [[ -n "$cv_root" ]] || { echo "--cv-root is required for stage 0" >&2; exit 2; }
  python recipes/commonvoice/prepare.py "$cv_root/en" --out "$data/en" --language en --skip-bad-audio "${extra[@]}"
  pool=("$data/en/train.jsonl")
  for lang in $targets; do
    python recipes/commonvoice/prepare.py "$cv_root/$lang" --out "$data/$lang" --language "$lang" \
      --skip-bad-audio "${extra[@]}"
    python recipes/commonvoice/prepare.py "$cv_root/$lang" --out "$data/$lang/1h" --language "$lang" \
      --splits train --train-hours 1 --seed 0 --skip-bad-audio "${extra[@]}"
    pool+=("$data/$lang/train.jsonl")
  done
  cat "${pool[@]}" > "$data/pretrain_train.jsonl"
fi

if run 1; then
  log 1 "UniSpeech pretraining"
  speechlab fit --config recipes/commonvoice/conf/unispeech_pretrain.yaml \
    --data.init_args.tokenizer "$(tokenizer)" --ckpt_path last
fi

if run 2; then
  for lang in $targets; do
    log 2 "CTC fine-tuning on $lang (1 h)"
    speechlab fit --config recipes/commonvoice/conf/finetune.yaml \
      --trainer.default_root_dir "$exp/finetune_$lang" \
      --data.init_args.train_manifest "$data/$lang/1h/train.jsonl" \
      --data.init_args.val_manifest "$data/$lang/dev.jsonl" \
      --data.init_args.test_manifest "$data/$lang/test.jsonl" \
      --data.init_args.tokenizer "$(tokenizer)" --ckpt_path last
  done
fi

if run 3; then
  for lang in $targets; do
    log 3 "test $lang"
    speechlab test --config recipes/commonvoice/conf/finetune.yaml \
      --trainer.default_root_dir "$exp/finetune_$lang" \
      --data.init_args.train_manifest "$data/$lang/1h/train.jsonl" \
      --data.init_args.test_manifest "$data/$lang/test.jsonl" \
      --data.init_args.tokenizer "$(tokenizer)" \
      --ckpt_path "$exp/finetune_$lang/checkpoints/last.ckpt"
  done
fi
