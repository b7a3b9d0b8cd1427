"""codec-eval: the table reports PESQ (wide-band) and STOI beside mel/STFT distance and SI-SDR, and they are sane."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speechlab.audio import load_audio
from speechlab.data.manifest import read_manifest
from speechlab.inference.codec_metrics import evaluate_codec, format_table

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1] / "data" / "ljspeech_en" / "manifest.jsonl"


class StubCodec(torch.nn.Module):
    """A 'codec' whose reconstruction is ``transform(audio)``: identity, or noise, for metric sanity checks."""

    sample_rate = 16000
    frame_rate = 50.0
    num_quantizers = 2
    codebook_size = 4

    def __init__(self, transform) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # evaluate_codec reads the device off a parameter
        self.transform = transform
        self.audio = None

    def encode(self, audio: torch.Tensor, n_q: int | None = None):
        self.audio = audio
        frames = -(-audio.shape[1] // 320)
        return torch.zeros(audio.shape[0], n_q or 2, frames, dtype=torch.long), torch.tensor([frames])

    def decode(self, codes: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        return self.transform(self.audio)


def speech_clips(num: int = 2) -> list[torch.Tensor]:
    return [load_audio(item["audio"], 16000, duration=3.0) for item in read_manifest(DATA)[:num]]


def test_identity_reconstruction_scores_perfect_pesq_and_stoi_and_noise_scores_low():
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    clips = speech_clips()
    identity = evaluate_codec(StubCodec(lambda audio: audio), clips, 16000)
    generator = torch.Generator().manual_seed(0)
    noise = evaluate_codec(
        StubCodec(lambda audio: 0.1 * torch.randn(audio.shape, generator=generator)), clips, 16000
    )
    assert identity["stoi"] > 0.99 and identity["pesq"] > 4.4  # wide-band PESQ tops out at 4.64
    assert noise["stoi"] < 0.5 and noise["pesq"] < 1.5  # STOI of unrelated noise is ~0.35, not 0
    assert identity["mel_distance"] < 1e-3 and identity["si_sdr"] > 50 and noise["si_sdr"] < 0
    table = format_table([{"codec": "identity", **identity}, {"codec": "noise", **noise}])
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    for column in (
        "codec",
        "n_q",
        "mel_distance",
        "stft_distance",
        "si_sdr",
        "stoi",
        "pesq",
        "codebook_usage",
        "usage_min",
        "perplexity_l0",
    ):
        assert column in header
    assert len(table.splitlines()) == 4  # header, rule, one row per (codec, n_q)
