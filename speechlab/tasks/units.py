"""Unit discovery for masked prediction: frame features of every utterance -> k-means -> one unit id per frame.

The targets of HuBERT / WavLM pretraining (:mod:`speechlab.tasks.wavlm_pretrain`), made offline as in HuBERT (Hsu et
al. 2021, §III-D and §IV-B):

- iteration 1: 39-d MFCC + deltas (:func:`speechlab.audio.mfcc_features`) at 100 Hz, 100 clusters;
- iteration 2: one hidden layer (``hidden_states[layer]``, 0 = Transformer input) of a trained ``SSLEncoder``, at
  50 Hz, 500 clusters; each utterance runs alone, unpadded, since a Base model's GroupNorm makes the features of a
  padded batch differ (docs/pitfalls.md, 1).

Alignment with the encoder's 50 Hz frames: encoder frame ``t`` sees samples ``[320 t, 320 t + 400)``, MFCC frame
``k`` sees ``[160 k, 160 k + 400)`` (Kaldi ``snip_edges``), so MFCC frame ``2 t`` has exactly the same 25 ms window
as encoder frame ``t``. We keep every second MFCC frame (as HuBERT does with its 100 Hz labels, feat2tar ratio 2)
and crop (or repeat the last frame) to ``conv_output_lengths(num_samples)`` — the same count as
``SSLEncoder.frame_lengths`` — so ``len(units) == frames`` for every utterance.

The clustering itself is :class:`speechlab.nn.kmeans.KMeans`; ``speechlab kmeans`` (:mod:`speechlab.commands.kmeans`)
runs the whole pipeline on manifests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from speechlab.audio import load_audio, mfcc_features
from speechlab.nn.feature_encoder import conv_output_lengths

__all__ = [
    "DEFAULT_CONV_LAYERS",
    "SAMPLE_RATE",
    "align_frames",
    "encoder_frame_count",
    "hidden_layer_features",
    "iterate_features",
    "load_item_audio",
    "mfcc_frame_features",
]

SAMPLE_RATE = 16000
# conv stack of every wav2vec 2.0 / HuBERT / WavLM preset: 320-sample hop, 400-sample receptive field
DEFAULT_CONV_LAYERS: tuple[tuple[int, int, int], ...] = (
    ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
)


def encoder_frame_count(
    num_samples: int | Tensor, conv_layers: Sequence[tuple[int, int, int]] | None = None
) -> Tensor:
    """Frames of the SSL encoder for ``num_samples`` (int or (batch,) tensor) -> (batch,) int64."""
    lengths = torch.as_tensor(num_samples, dtype=torch.long).reshape(-1)
    return conv_output_lengths(lengths, conv_layers or DEFAULT_CONV_LAYERS)


def align_frames(features: Tensor, num_frames: int, stride: int = 1) -> Tensor:
    """Take every ``stride``-th row of (frames, D) features and crop / repeat the last row to ``num_frames``."""
    features = features[::stride]
    if num_frames <= 0:
        return features[:0]
    if features.shape[0] == 0:
        raise ValueError(f"cannot align an empty feature sequence to {num_frames} frames")
    if features.shape[0] >= num_frames:
        return features[:num_frames]
    pad = features[-1:].expand(num_frames - features.shape[0], -1)
    return torch.cat([features, pad], dim=0)


def mfcc_frame_features(audio: Tensor, conv_layers: Sequence[tuple[int, int, int]] | None = None) -> Tensor:
    """MFCC features aligned to the encoder's 50 Hz frames. audio: (samples,) -> (frames, 39)."""
    num_frames = int(encoder_frame_count(audio.numel(), conv_layers)[0])
    return align_frames(mfcc_features(audio), num_frames, stride=2)


@torch.no_grad()
def hidden_layer_features(encoder: nn.Module, audio: Tensor, layer: int) -> Tensor:
    """``hidden_states[layer]`` of an ``SSLEncoder`` for one unpadded utterance. audio: (samples,) -> (frames, D)."""
    device = next(encoder.parameters()).device
    wav = audio.to(device).reshape(1, -1)
    out = encoder(wav, torch.tensor([wav.shape[1]], device=device), output_hidden_states=True)
    states = out.hidden_states
    if not -len(states) <= layer < len(states):
        raise ValueError(
            f"layer {layer} does not exist: the encoder returns {len(states)} hidden states (0..L)"
        )
    return states[layer][0].float()


def load_item_audio(item: dict, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """The audio of one manifest item exactly as the data loader reads it (segment when ``offset`` is set)."""
    offset = float(item.get("offset") or 0.0)
    duration = float(item["duration"]) if "offset" in item else None
    return load_audio(item["audio"], sample_rate=sample_rate, offset=offset, duration=duration)


class _AudioItems(torch.utils.data.Dataset):
    """Item audio, or its features when ``worker_fn`` is given (CPU features computed in the workers)."""

    def __init__(self, items: Sequence[dict], worker_fn: Callable[[Tensor], Tensor] | None = None) -> None:
        self.items = items
        self.worker_fn = worker_fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        audio = load_item_audio(self.items[index])
        return index, self.worker_fn(audio) if self.worker_fn is not None else audio


def iterate_features(
    items: Sequence[dict],
    feature_fn: Callable[[Tensor], Tensor],
    num_workers: int = 0,
    desc: str = "features",
    progress: bool = True,
    in_workers: bool = False,
):
    """Yield ``(index, features (frames, D))`` for each item, audio decoded in ``num_workers`` processes.

    ``in_workers=True`` runs ``feature_fn`` inside the workers too (a picklable CPU function such as
    :func:`mfcc_frame_features`): MFCC extraction then scales with the workers. GPU features stay in the main process.
    """
    dataset = _AudioItems(items, feature_fn if in_workers else None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)
    for index, value in tqdm(loader, total=len(items), desc=desc, disable=not progress, unit="utt"):
        yield int(index), value if in_workers else feature_fn(value)
