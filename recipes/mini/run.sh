#!/usr/bin/env bash
# The mini recipe: every speechlab family learns on the bundled data/, on a 2-core CPU.
#
#   bash recipes/mini/run.sh                        # the main job: stages 0-8, one seed each (~20 min)
#   bash recipes/mini/run.sh --stage 2 --stop-stage 4
#   bash recipes/mini/run.sh --stage 10 --stop-stage 10   # a separate stage (its own time, see below)
#
# Main job (stages 0-8; every fit resumes from its last.ckpt when a stage is re-run):
#   0  manifests from data/ (train/val/test splits)                            -> exp/data/*.jsonl
#   1  the anchor: fbank + BiLSTM CTC written without speechlab's models, 12 CPU-minutes on one thread, in the
#      background beside stages 2-5                                            -> exp/anchor/
#   2  phoneme CTC from scratch (fbank + Conformer), test PER of the best val checkpoint -> exp/ctc_phoneme_fbank/
#   3  WavLM-style pretraining of the same encoder: MFCC k-means units, masked prediction on noisy / overlapped
#      mixtures of the bundled speech                                          -> exp/wavlm_fbank/
#   4  phoneme CTC fine-tuned from it (the steps and settings of stage 2), test PER -> exp/wavlm_ctc_phoneme_fbank/
#   5  UniSpeech multitask pretraining (swap 0.5), Swahili CTC fine-tuning, test PER -> exp/unispeech*/
#   6  neural codec: train, evaluate on held-out LJ Speech at 1 and 4 levels   -> exp/codec/
#   7  use the stage-2 model: export it (with its round-trip report), transcribe the test split
#   8  results from the logs and curves as PNG                                 -> exp/results.md, exp/plots/
# Environment: ANCHOR_CPU_MINUTES (default 12) is the anchor's budget, here and in stage 10; CORPORA (default
# ../shared/corpora beside the checkout) is where stage 9 finds speech that data/ does not hold.
# Separate stages (not in the main job; each prints its own wall time):
#   9  the CTC models of stages 2 and 4 (and of stage 10's seeds, where run) on the espeak English of $CORPORA
#      that data/ does not hold                                               -> exp/unseen.md
#  10  stages 2-4 for seeds 0, 1, 2: mean +- sd of the test PERs               -> exp/seeds/results.md
#  11  the UniSpeech low-resource table: rows (a)-(d) x sw/tr/cy x 3 seeds     -> exp/unispeech_table/results.md
#  12  the raw-waveform WavLM (wavlm_tiny, the paper's architecture at tiny width): CTC from scratch, MFCC and
#      layer-2 k-means pretraining, fine-tuning; ~1 h on 2 cores           -> exp/ctc_phoneme/, exp/wavlm/, ...
set -euo pipefail

stage=0
stop_stage=8
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --stop-stage) stop_stage="$2"; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/../.."   # repository root: configs use paths relative to it
exp=recipes/mini/exp
conf=recipes/mini/conf
mkdir -p "$exp"
run() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }
started=0
log() {
  finish_stage
  echo -e "\n=== stage $1: $2 ($(date +%H:%M:%S)) ==="
  current=$1; started=$SECONDS
}
# every stage's wall time, for the results table (exp/timings.tsv: stage, seconds)
finish_stage() {
  if [[ -n ${current:-} ]]; then echo -e "$current\t$((SECONDS - started))" >> "$exp/timings.tsv"; current=; fi
}

anchor_pid=
anchor_started=0
anchor_running() { [[ -n $anchor_pid ]] && kill -0 "$anchor_pid" 2>/dev/null; }
# One thread per process while the anchor holds the other core, both cores otherwise.
threads() { if anchor_running; then echo 1; else echo 2; fi; }
wait_anchor() {
  [[ -n $anchor_pid ]] || return 0
  echo "waiting for the anchor (stage 1, log $exp/anchor/train.log)"
  if ! wait "$anchor_pid"; then echo "stage 1 (anchor) failed; see $exp/anchor/train.log" >&2; exit 1; fi
  anchor_pid=
  echo -e "1\t$((SECONDS - anchor_started))" >> "$exp/timings.tsv"
  tail -n 1 "$exp/anchor/train.log"
}
trap '[[ -n $anchor_pid ]] && kill "$anchor_pid" 2>/dev/null; true' EXIT
fit() { OMP_NUM_THREADS=$(threads) speechlab fit --config "$@" --ckpt_path last; }
test_best() { OMP_NUM_THREADS=$(threads) speechlab test --config "$@" --ckpt_path best; }

if run 0; then
  log 0 "prepare manifests"
  rm -f "$exp/timings.tsv"
  python recipes/mini/prepare.py --out "$exp/data"
fi

if run 1; then
  log 1 "the anchor (fbank + BiLSTM, plain torch), in the background on one thread"
  mkdir -p "$exp/anchor"
  OMP_NUM_THREADS=1 python recipes/mini/local/anchor_bilstm.py --cpu-minutes "${ANCHOR_CPU_MINUTES:-12}" \
    --output "$exp/anchor/result.json" > "$exp/anchor/train.log" 2>&1 &
  anchor_pid=$!
  anchor_started=$SECONDS
  current=   # its wall time is recorded when it is waited for
  echo "log: $exp/anchor/train.log"
fi

if run 2; then
  log 2 "phoneme CTC from scratch, fbank + Conformer; test PER of the best val checkpoint"
  fit $conf/ctc_phoneme_fbank.yaml
  test_best $conf/ctc_phoneme_fbank.yaml
fi

if run 3; then
  log 3 "WavLM-style pretraining: MFCC k-means units, then masked prediction on noisy / overlapped mixtures"
  units=$exp/wavlm/units_mfcc
  speechlab kmeans --manifest "$exp/data/pretrain_train.jsonl" --output-dir "$units" --num-clusters 100
  speechlab kmeans --manifest "$exp/data/pretrain_val.jsonl" --output-dir "$units" \
    --centroids "$units/centroids.safetensors"
  fit $conf/wavlm_pretrain_fbank.yaml
fi

if run 4; then
  log 4 "phoneme CTC fine-tuned from the pretrained encoder (stage 2's steps and settings)"
  fit $conf/wavlm_ctc_phoneme_fbank.yaml
  test_best $conf/wavlm_ctc_phoneme_fbank.yaml
fi

if run 5; then
  log 5 "UniSpeech multitask pretraining, then low-resource (Swahili) CTC fine-tuning"
  fit $conf/unispeech.yaml
  fit $conf/unispeech_ft_sw.yaml
  test_best $conf/unispeech_ft_sw.yaml
fi

if run 6; then
  log 6 "neural codec: train, evaluate the untrained preset and the trained model at 1 and 4 levels"
  fit $conf/codec.yaml
  OMP_NUM_THREADS=$(threads) speechlab codec-eval --manifest "$exp/data/lj_test.jsonl" --max-seconds 4 --n-q 1,4 \
    --codec preset:codec_mini --codec "$exp/codec/pretrained" --output "$exp/codec/eval.md"
  OMP_NUM_THREADS=$(threads) python recipes/mini/local/codec_levels.py "$exp/codec/pretrained" \
    --manifest "$exp/data/lj_test.jsonl" > "$exp/codec/levels.txt"
fi

if run 7; then
  # (the fbank Conformer has no Hugging Face class; stage 12's wavlm_tiny model exports with --format hf too)
  log 7 "use the stage-2 model: export it (with a round-trip report), transcribe the test split"
  model=$exp/ctc_phoneme_fbank
  speechlab export "$model" --out "$model/export" --overwrite
  speechlab transcribe --model "$model" "$exp/data/en_test.jsonl" --format jsonl --no-progress \
    --output "$model/test_transcripts.jsonl"
fi

if run 8; then
  finish_stage
  wait_anchor
  log 8 "results table and curves"
  for run_dir in ctc_phoneme_fbank wavlm_fbank wavlm_ctc_phoneme_fbank unispeech unispeech_ft_sw codec; do
    [[ -d $exp/$run_dir/logs ]] && speechlab plot "$exp/$run_dir" --out "$exp/plots/${run_dir}.png"
  done
  finish_stage
  run 0 && echo -e "total\t$SECONDS" >> "$exp/timings.tsv"   # the whole job, when it ran from stage 0
  python recipes/mini/local/results.py --exp "$exp" | tee "$exp/results.md"
fi
wait_anchor

if run 9; then
  log 9 "the CTC models on unseen English speech (espeak English of ${CORPORA:-../shared/corpora} not in data/)"
  corpora=${CORPORA:-../shared/corpora}
  [[ -f $corpora/espeak/manifest.jsonl ]] || { echo "stage 9 needs $corpora/espeak (set CORPORA)" >&2; exit 2; }
  python recipes/mini/local/unseen.py --corpus "$corpora/espeak" --bundled data/espeak --language en \
    --output "$exp/data/en_unseen.jsonl"
  for base in "$exp" "$exp"/seeds/seed1 "$exp"/seeds/seed2; do
    for run_dir in ctc_phoneme_fbank wavlm_ctc_phoneme_fbank; do
      [[ -d $base/$run_dir/checkpoints ]] || continue
      OMP_NUM_THREADS=2 speechlab transcribe --model "$base/$run_dir" --ckpt best "$exp/data/en_unseen.jsonl" \
        --format jsonl --no-progress --output "$base/$run_dir/unseen_transcripts.jsonl"
    done
  done
  finish_stage
  python recipes/mini/local/results.py --exp "$exp" --unseen | tee "$exp/unseen.md"
fi

if run 10; then
  log 10 "stages 2-4 for seeds 0, 1, 2 (mean +- sd)"
  bash recipes/mini/local/seeds.sh "$exp"
fi

if run 11; then
  log 11 "the UniSpeech low-resource table (rows a-d x sw/tr/cy x 3 seeds)"
  bash recipes/mini/local/unispeech_table.sh "$exp"
fi

if run 12; then
  log 12 "raw-waveform WavLM (wavlm_tiny): CTC from scratch, pretraining iterations 1 and 2, fine-tuning"
  fit $conf/ctc_phoneme.yaml
  test_best $conf/ctc_phoneme.yaml
  speechlab kmeans --manifest "$exp/data/pretrain_train.jsonl" --output-dir "$exp/wavlm/units_mfcc" --num-clusters 100
  speechlab kmeans --manifest "$exp/data/pretrain_val.jsonl" --output-dir "$exp/wavlm/units_mfcc" \
    --centroids "$exp/wavlm/units_mfcc/centroids.safetensors"
  fit $conf/wavlm_pretrain.yaml
  ckpt=$exp/wavlm/iter1/checkpoints/last.ckpt
  speechlab kmeans --manifest "$exp/data/pretrain_train.jsonl" --output-dir "$exp/wavlm/units_l2" --num-clusters 100 \
    --checkpoint "$ckpt" --layer 2
  speechlab kmeans --manifest "$exp/data/pretrain_val.jsonl" --output-dir "$exp/wavlm/units_l2" \
    --centroids "$exp/wavlm/units_l2/centroids.safetensors" --checkpoint "$ckpt" --layer 2
  fit $conf/wavlm_ctc_phoneme.yaml
  test_best $conf/wavlm_ctc_phoneme.yaml
  speechlab export "$exp/ctc_phoneme" --out "$exp/ctc_phoneme/export_hf" --format hf --overwrite
fi
finish_stage
