"""``speechlab convert``: checkpoints between speechlab and Hugging Face formats (import-only from fairseq/unilm).

After writing, the result is reloaded and run on a fixed test signal next to the source, and the per-layer maximum
absolute difference of the hidden states is printed (``transformers`` is used too when it is installed: it loads
the written Hugging Face directory, and a Hugging Face source, as an independent reference). The command fails
(exit 1) when any difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from speechlab.checkpoints.safe_load import CheckpointError


def test_signal(seconds: float = 2.0, sample_rate: int = 16000) -> torch.Tensor:
    """The fixed test signal: (samples,) float32, a 0.1-amplitude chirp plus seeded noise (same on every run)."""
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    chirp = torch.sin(2 * torch.pi * (100.0 + 900.0 * t / seconds) * t)
    noise = torch.randn(t.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (0.1 * chirp + 0.02 * noise).to(torch.float32)


def hidden_states(model: nn.Module, audio: torch.Tensor) -> torch.Tensor:
    """(L+1, frames, dim) hidden states of a speechlab model for one waveform."""
    from speechlab.api import FeatureExtractor

    return FeatureExtractor(model, chunk_seconds=None).extract(audio).hidden_states[:, 0]


def transformers_hidden_states(
    directory: str | Path, audio: torch.Tensor, normalize: bool
) -> torch.Tensor | None:
    """(L+1, frames, dim) from ``transformers.AutoModel`` on a Hugging Face directory, or None without transformers."""
    try:
        from transformers import AutoModel
    except ImportError:
        return None
    model = AutoModel.from_pretrained(str(directory)).eval()
    if (
        normalize
    ):  # the HF processor's job (do_normalize); speechlab models do it inside, so feed the same input
        from speechlab.models.ssl_encoder import normalize_waveform

        audio = normalize_waveform(audio[None])[0]
    with torch.no_grad():
        out = model(audio[None], output_hidden_states=True)
    return torch.stack([h[0] for h in out.hidden_states])


def default_family(model: nn.Module, source: Path) -> str:
    """Family for a converted model: the source's own (speechlab dir / HF model_type), else from the architecture."""
    from speechlab.checkpoints.pretrained_dir import CONFIG_NAME
    from speechlab.checkpoints.safe_load import read_json
    from speechlab.models.ssl_encoder import SSLEncoder

    config_path = source / CONFIG_NAME
    if source.is_dir() and config_path.is_file():
        data = read_json(config_path)
        if data.get("family"):
            return str(data["family"])
        if data.get("model_type") in ("wavlm", "hubert", "wav2vec2", "unispeech"):
            return str(data["model_type"])
    if isinstance(model, SSLEncoder):
        return "wavlm" if model.config.relative_position_bias else "hubert"
    from speechlab.export import model_family

    try:  # a CTC model (e.g. from a run's .ckpt), UniSpeech, codec
        return model_family(model)
    except ValueError:
        return type(model).__name__.lower()


def _report(title: str, reference: torch.Tensor, other: torch.Tensor) -> float:
    if reference.shape != other.shape:
        print(f"{title}: shape mismatch {tuple(other.shape)} vs {tuple(reference.shape)}")
        return float("inf")
    diffs = (reference - other).abs().amax(dim=(1, 2))
    print(
        f"{title}: max abs difference per hidden state (0 = Transformer input, {len(diffs) - 1} = last layer)"
    )
    for layer, diff in enumerate(diffs.tolist()):
        print(f"  layer {layer:3d}  {diff:.3e}")
    return float(diffs.max())


def run(args: argparse.Namespace) -> int:
    from speechlab.api import find_encoder, load
    from speechlab.checkpoints.pretrained_dir import is_pretrained_dir, save_pretrained

    source, output = Path(args.source), Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"speechlab convert: {output} exists and is not empty; pass --overwrite", file=sys.stderr)
        return 2
    try:
        model = load(args.source)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"speechlab convert: {err}", file=sys.stderr)
        return 1
    encoder = find_encoder(model)
    if args.to == "speechlab":
        family = args.family or default_family(model, source)
        save_pretrained(model, output, family=family)
        print(f"wrote speechlab pretrained directory {output} (family {family})")
    else:
        from speechlab.checkpoints.hf_ssl import export_hf_wavlm
        from speechlab.models.ssl_encoder import SSLEncoder

        if not isinstance(model, SSLEncoder):
            print(
                f"speechlab convert: export to Hugging Face supports WavLM / HuBERT / wav2vec2 backbones, not "
                f"{type(model).__name__}; convert to the speechlab format instead (--to speechlab)",
                file=sys.stderr,
            )
            return 2
        export_hf_wavlm(model, output)
        print(f"wrote Hugging Face directory {output}")

    signal = test_signal()
    reference = hidden_states(model, signal)
    worst = _report(f"speechlab reload of {output} vs source", reference, hidden_states(load(output), signal))
    normalize = encoder.config.normalize_waveform
    if args.to == "hf":
        hf = transformers_hidden_states(output, signal, normalize)
        if hf is not None:
            worst = max(worst, _report(f"transformers on {output} vs source", reference, hf))
    if source.is_dir() and not is_pretrained_dir(source):
        hf = transformers_hidden_states(source, signal, normalize)
        if hf is not None:
            worst = max(worst, _report(f"transformers on source {source} vs speechlab import", reference, hf))
    status = "OK" if worst <= args.tolerance else "FAILED"
    print(f"{status}: largest difference {worst:.3e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="checkpoint to read: speechlab pretrained dir, Hugging Face dir or hub id (wavlm, hubert, wav2vec2, "
        "unispeech), or a fairseq/unilm .pt file (import only)",
    )
    parser.add_argument("output", help="directory to write")
    parser.add_argument(
        "--to",
        choices=("speechlab", "hf"),
        default="speechlab",
        help="output format: speechlab pretrained dir (default) or Hugging Face (WavLMModel / HubertModel dir)",
    )
    parser.add_argument(
        "--family",
        help="family name stored in a speechlab config.json (default: from the source, e.g. wavlm)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed max-abs difference of any layer on the test signal (exit 1 above it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab convert``."""
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between speechlab and Hugging Face formats (import fairseq/unilm .pt)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechlab convert", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
