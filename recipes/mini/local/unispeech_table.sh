#!/usr/bin/env bash
# The UniSpeech low-resource table (rows a-d x sw/tr/cy x 3 seeds, mean ± sd) -> EXP/unispeech_table/results.md.
# usage: bash recipes/mini/local/unispeech_table.sh [EXP (default recipes/mini/exp)] [extra unispeech_table.py args]
# Two speechlab processes at a time, one thread each; finished runs are skipped when rerun; prints its wall time.
set -euo pipefail
exp=${1:-recipes/mini/exp}
shift || true
OMP_NUM_THREADS=1 exec python "$(dirname "$0")/unispeech_table.py" --out "$exp/unispeech_table" --jobs 2 "$@"
