"""One module per ``speechlab`` tool command: ``add_parser(subparsers)`` and the function it runs.

The argparse definition and the orchestration (read inputs, call the libraries, write outputs, print a summary)
live here and nothing else does; :mod:`speechlab.cli` imports only the module of the command it runs (this package
``__init__`` imports nothing, so ``speechlab --help`` stays fast). The option groups several commands share (the
model source, device and threads, audio input, long-input windows, progress) are :mod:`speechlab.commands.common`.
"""

from __future__ import annotations

# Tool commands: command -> (module whose ``add_parser(subparsers)`` registers it, one-line summary). The summaries
# let ``speechlab --help`` list every command without importing the modules; each module registers its command with
# the same summary (:func:`speechlab.commands.common.add_command`).
TOOLS: dict[str, tuple[str, str]] = {
    "extract": ("speechlab.commands.extract", "extract layer-wise SSL features for a manifest or a folder"),
    "convert": ("speechlab.commands.convert", "convert checkpoints between speechlab and Hugging Face formats (import fairseq/unilm .pt); = export with positional paths"),
    "export": ("speechlab.commands.export", "export a run / checkpoint as a speechlab or Hugging Face model directory (with a round-trip check)"),
    "transcribe": ("speechlab.commands.transcribe", "transcribe audio files / folders / manifests with a CTC model (greedy or beam search + n-gram LM)"),
    "plot": ("speechlab.commands.plot", "plot a run's training curves to PNG"),
    "kmeans": ("speechlab.commands.kmeans", "k-means unit targets (HuBERT/WavLM pseudo-labels) for manifests"),
    "encode": ("speechlab.commands.encode", "audio (manifest or folder) -> codec token files + a manifest"),
    "decode": ("speechlab.commands.decode", "codec token files -> wav files"),
    "codec-eval": ("speechlab.commands.codec_eval", "compare codecs on one manifest (mel/STFT distance, SI-SDR, STOI, PESQ, usage, RTF)"),
    "check-manifest": ("speechlab.commands.check_manifest", "validate manifests: schema, files, headers, durations (and optionally decode every file)"),
}  # fmt: skip
