"""``speechlab transcribe --model SRC INPUT...``: inputs are audio files, folders (searched recursively) and JSON
Lines manifests; output is ``id<TAB>text`` lines or JSONL (``--format jsonl``: id, text, units, start seconds per
unit, score). When manifest lines carry references (``text``, or ``phonemes`` for a phoneme model) the error rates
are printed (WER and CER, or PER) via jiwer.

Decoding is greedy, or a beam search (torchaudio's ``ctc_decoder``) with an optional KenLM n-gram language model and
a lexicon; long inputs run in windows. The library: :class:`speechlab.inference.transcriber.Transcriber`.
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from speechlab.audio import load_audio
from speechlab.commands import common
from speechlab.inference.transcriber import SAMPLE_RATE, Transcriber, collect_inputs, error_rates


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab transcribe``."""
    parser = common.add_command(subparsers, "transcribe", run, doc=__doc__)
    parser.add_argument(
        "--model",
        required=True,
        help="a CTC model: run folder, Lightning .ckpt, speechlab 'ctc' directory or Hugging Face *ForCTC directory",
    )
    parser.add_argument("inputs", nargs="+", help="audio files, folders (recursive) and .jsonl manifests")
    common.add_ckpt_argument(parser)
    parser.add_argument("--output", help="write here instead of stdout")
    parser.add_argument(
        "--format", choices=("text", "jsonl"), default="text", help="id<TAB>text lines or JSONL"
    )
    parser.add_argument("--decoder", choices=("greedy", "beam"), default="greedy")
    parser.add_argument("--beam-size", type=int, default=50)
    parser.add_argument("--lm", help="KenLM n-gram language model (ARPA or binary); needs --lexicon")
    parser.add_argument("--lexicon", help="lexicon: one 'word unit unit ...' line per word (beam search)")
    parser.add_argument("--lm-weight", type=float, default=2.0)
    parser.add_argument("--word-score", type=float, default=0.0)
    common.add_device_arguments(parser)
    common.add_window_arguments(parser, batch_seconds=120.0)
    parser.add_argument("--files-per-batch", type=int, default=32, help="files read into memory at a time")
    common.add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    _, model = common.load_source(args.model, args.ckpt, args.device)
    transcriber = Transcriber(
        model,
        decoder=args.decoder,
        beam_size=args.beam_size,
        lm=args.lm,
        lexicon=args.lexicon,
        lm_weight=args.lm_weight,
        word_score=args.word_score,
        batch_seconds=args.batch_seconds,
        chunk_seconds=args.chunk_seconds or None,
        context_seconds=args.context_seconds,
    )
    field_name = transcriber.tokenizer.field
    items = collect_inputs(args.inputs, field_name)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    refs, hyps = [], []
    try:
        progress = tqdm(
            total=len(items), desc="transcribe", unit="utt", disable=args.no_progress, file=sys.stderr
        )
        for start in range(0, len(items), args.files_per_batch):
            chunk = items[start : start + args.files_per_batch]
            waves = [load_audio(it.audio, SAMPLE_RATE, it.offset, it.duration) for it in chunk]
            for item, result in zip(chunk, transcriber(waves), strict=True):
                if args.format == "jsonl":
                    record = {"id": item.id, **result.to_dict()}
                    if item.reference is not None:
                        record["reference"] = item.reference
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                else:
                    out.write(f"{item.id}\t{result.text}\n")
                if item.reference is not None:
                    refs.append(item.reference)
                    hyps.append(result.text)
            progress.update(len(chunk))
        progress.close()
    finally:
        if out is not sys.stdout:
            out.close()
    if refs:
        rates = error_rates(refs, hyps, phonemes=field_name == "phonemes")
        shown = ", ".join(f"{k.upper()} {100 * v:.2f}%" for k, v in rates.items())
        print(f"{shown} over {len(refs)} utterances with a reference ({field_name})", file=sys.stderr)
    return 0
