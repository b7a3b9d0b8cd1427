"""``speechlab export``: a finished run (or any checkpoint) -> a model directory people use.

``speechlab export RUN_OR_CKPT --out DIR [--format speechlab|hf] [--ckpt best|last]``

* the source is a run folder (``trainer.default_root_dir``: ``--ckpt best`` = the best checkpoint by the task's
  monitored metric, ``last`` = ``checkpoints/last.ckpt``, default: best if the run has one, else last), a Lightning
  ``.ckpt``, or anything else ``speechlab.load`` reads;
* ``--format speechlab`` (default) writes our pretrained directory, every family (CTC with its tokenizer);
* ``--format hf`` writes a transformers directory: CTC models as ``WavLMForCTC`` / ``HubertForCTC`` with
  vocabulary, tokenizer and feature-extractor configs (``transformers.pipeline("automatic-speech-recognition",
  model=DIR)`` transcribes with it), SSL encoders as ``WavLMModel`` / ``HubertModel``.

After writing, the result is reloaded and run on a fixed test signal next to the source, and a round-trip report
is printed: the largest absolute difference of the outputs (CTC logits, hidden states, codec reconstructions),
with ``transformers`` itself as the reference for Hugging Face exports, plus the greedy transcripts of both sides
for CTC models. The command fails (exit 1) when a difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["export", "model_family", "add_parser", "main"]


def model_family(model: nn.Module) -> str:
    """The pretrained-directory family of a loaded model (``ctc``, ``wavlm``, ``hubert``, ``unispeech``, ``codec``)."""
    from speechlab.models.codec import Codec
    from speechlab.models.ctc import CTCModel
    from speechlab.models.ssl_encoder import SSLEncoder
    from speechlab.models.unispeech import UniSpeech

    if isinstance(model, CTCModel):
        return "ctc"
    if isinstance(model, SSLEncoder):
        return "wavlm" if model.config.relative_position_bias else "hubert"
    if isinstance(model, UniSpeech):
        return "unispeech"
    if isinstance(model, Codec):
        return "codec"
    raise ValueError(
        f"speechlab export: a {type(model).__name__} has no speechlab pretrained format (a transformers codec is "
        "already a Hugging Face directory: use it as it is)"
    )


def resolve_source(source: str, ckpt: str | None) -> str:
    """A run folder -> its ``best`` / ``last`` checkpoint; anything else unchanged (``--ckpt`` then must be unset)."""
    from speechlab.checkpoints.run_dir import is_run_dir, run_checkpoint

    path = Path(source)
    if is_run_dir(path):
        return str(run_checkpoint(path, ckpt or "auto"))
    if ckpt is not None:
        raise ValueError(f"--ckpt {ckpt} needs a run folder (with checkpoints/), but {source} is not one")
    return source


def export(model: nn.Module, out: str | Path, fmt: str = "speechlab") -> Path:
    """Write ``model`` to ``out`` as a speechlab pretrained directory or a Hugging Face directory."""
    from speechlab.checkpoints.pretrained_dir import save_pretrained

    family = model_family(model)
    if fmt == "speechlab":
        return save_pretrained(model, out, family=family)
    if fmt != "hf":
        raise ValueError(f"format must be 'speechlab' or 'hf', got {fmt!r}")
    if family == "ctc":
        from speechlab.checkpoints.hf_ctc import export_hf_ctc
        from speechlab.models.fbank_conformer import FbankConformerEncoder

        if isinstance(model.encoder, FbankConformerEncoder):
            raise ValueError(
                "speechlab export --format hf: a CTC model with the fbank Conformer encoder has no Hugging Face "
                "export (transformers has no such model class); use --format speechlab"
            )

        return export_hf_ctc(model, out)
    if family in ("wavlm", "hubert"):
        from speechlab.checkpoints.hf_ssl import export_hf_wavlm

        return export_hf_wavlm(model, out)
    raise ValueError(
        f"speechlab export --format hf: a {family} model has no Hugging Face export (transformers' classes for it "
        "use other parameter layouts); use --format speechlab"
    )


# ----------------------------------------------------------------------------------------------- round trip


def _outputs(model: nn.Module, audio: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(what, tensor) compared between source and export: CTC logits, hidden states, codec reconstruction."""
    from speechlab.convert import hidden_states

    family = model_family(model)
    with torch.inference_mode():
        if family == "ctc":
            logits, _ = model(audio[None])
            return "CTC logits", logits[0]
        if family == "codec":
            codes, frames = model.encode(audio[None])
            return "codec reconstruction", model.decode(codes, frames)[0]
    return "hidden states", hidden_states(model, audio)


def _greedy_text(model: nn.Module, logits: torch.Tensor) -> str:
    from speechlab.models.ctc import ctc_greedy_decode

    ids = ctc_greedy_decode(logits[None], torch.tensor([logits.shape[0]]), model.tokenizer.blank_id)[0]
    return model.tokenizer.decode(ids)


def round_trip_report(model: nn.Module, out: Path, fmt: str) -> float:
    """Print the differences between ``model`` and what was written to ``out``; returns the largest."""
    from speechlab.api import load
    from speechlab.convert import test_signal, transformers_hidden_states

    audio = test_signal()
    what, reference = _outputs(model, audio)
    reloaded = load(out)
    _, again = _outputs(reloaded, audio)
    worst = _diff(f"speechlab.load({out}) vs source: {what}", reference, again)
    family = model_family(model)
    if fmt == "hf" and family == "ctc":
        from transformers import AutoModelForCTC

        hf = AutoModelForCTC.from_pretrained(str(out)).eval()
        signal = audio
        if model.encoder.config.normalize_waveform:  # the HF feature extractor's job; ours does it inside
            from speechlab.models.ssl_encoder import normalize_waveform

            signal = normalize_waveform(audio[None])[0]
        with torch.inference_mode():
            theirs = hf(signal[None]).logits[0]
        worst = max(
            worst, _diff(f"transformers {type(hf).__name__} vs speechlab: CTC logits", reference, theirs)
        )
        ours_text, their_text = _greedy_text(model, reference), _greedy_text(model, theirs)
        print(f"  greedy transcript, speechlab:    {ours_text!r}")
        print(f"  greedy transcript, transformers: {their_text!r}")
        if ours_text != their_text:
            print("  transcripts differ")
            worst = float("inf")
    elif fmt == "hf":
        theirs = transformers_hidden_states(out, audio, model.config.normalize_waveform)
        if theirs is not None:
            worst = max(worst, _diff("transformers vs speechlab: hidden states", reference, theirs))
    return worst


def _diff(title: str, reference: torch.Tensor, other: torch.Tensor) -> float:
    if reference.shape != other.shape:
        print(f"{title}: shape mismatch {tuple(other.shape)} vs {tuple(reference.shape)}")
        return float("inf")
    diff = float((reference.float() - other.float()).abs().max())
    print(f"{title}: max abs difference {diff:.3e}")
    return diff


# ----------------------------------------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    from speechlab.api import load

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"speechlab export: {out} exists and is not empty; pass --overwrite", file=sys.stderr)
        return 2
    source = resolve_source(args.source, args.ckpt)
    model = load(source)
    path = export(model, out, args.format)
    print(f"read {source}; wrote a {'Hugging Face' if args.format == 'hf' else 'speechlab'} directory {path}")
    worst = round_trip_report(model, path, args.format)
    status = "OK" if worst <= args.tolerance else "FAILED"
    print(f"{status}: largest difference {worst:.3e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="a run folder (trainer.default_root_dir), a Lightning .ckpt, or any source speechlab.load reads",
    )
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument(
        "--format",
        choices=("speechlab", "hf"),
        default="speechlab",
        help="speechlab pretrained directory (default) or Hugging Face (CTC: WavLMForCTC / HubertForCTC + "
        "tokenizer + feature extractor; encoders: WavLMModel / HubertModel)",
    )
    parser.add_argument(
        "--ckpt",
        choices=("best", "last"),
        default=None,
        help="for a run folder: its best checkpoint (by the task's monitored metric) or last.ckpt "
        "(default: best if the run has one, else last)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed max-abs difference in the round-trip report (exit 1 above it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab export``."""
    parser = subparsers.add_parser(
        "export",
        help="export a run / checkpoint as a speechlab or Hugging Face model directory (with a round-trip check)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechlab export", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
