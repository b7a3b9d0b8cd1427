"""Codec model: padding invariance, streaming == whole file, every n_q decodes, presets, save/load, losses."""

from __future__ import annotations

import pytest
import torch

from speechlab.checkpoints.pretrained_dir import load_pretrained_codec, save_pretrained
from speechlab.models.codec import (
    Codec,
    CodecConfig,
    codec_16khz,
    codec_16khz_causal,
    codec_16khz_low_rate,
    codec_tiny,
)
from speechlab.nn.discriminators import CombinedDiscriminator, discriminator_loss, feature_matching_loss
from speechlab.nn.spectral import MultiResolutionSTFTLoss, MultiScaleMelLoss, si_sdr


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: two threads spin-wait on each other (40x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_tiny(causal: bool = False, seed: int = 0) -> Codec:
    """A tiny codec whose codebooks went through k-means init (so codes are not all the same)."""
    torch.manual_seed(seed)
    codec = Codec(CodecConfig(**{**codec_tiny().__dict__, "causal": causal}))
    codec.train()(torch.randn(4, 4000) * 0.1)
    return codec.eval()


def test_presets_have_the_documented_frame_rates_and_bitrates():
    assert codec_16khz().frame_rate == 50.0 and codec_16khz().hop_length == 320
    assert codec_16khz().bitrate() == 4000.0
    assert 12.5 <= codec_16khz_low_rate().frame_rate <= 25
    assert codec_16khz_causal().causal
    with pytest.raises(ValueError, match="n_q"):
        Codec(codec_tiny()).quantizer.encode(torch.randn(1, 32, 3), n_q=9)


@pytest.mark.parametrize("causal", [False, True])
def test_codes_of_an_utterance_are_identical_alone_and_padded_in_a_batch(causal):
    codec = trained_tiny(causal)
    torch.manual_seed(1)
    short, long = torch.randn(1, 5123) * 0.1, torch.randn(1, 9000) * 0.1
    batch = torch.zeros(2, 9000)
    batch[0, :5123], batch[1] = short[0], long[0]
    codes_alone, frames_alone = codec.encode(short)
    codes_batch, frames_batch = codec.encode(batch, torch.tensor([5123, 9000]))
    assert frames_batch.tolist() == [17, 29] and frames_alone.tolist() == [17]
    assert torch.equal(codes_alone[0], codes_batch[0, :, :17])
    long_alone, _ = codec.encode(long)
    assert torch.equal(long_alone[0], codes_batch[1])
    # decoding is padding-invariant too, and padded tails are silent
    audio_batch = codec.decode(codes_batch, frames_batch)
    audio_alone = codec.decode(codes_alone, frames_alone)
    assert torch.allclose(audio_batch[0, : 17 * 320], audio_alone[0], atol=1e-5)
    assert audio_batch[0, 17 * 320 :].abs().sum() == 0


def test_causal_streaming_equals_whole_file_codes_exactly_and_audio_within_1e5():
    codec = trained_tiny(causal=True)
    torch.manual_seed(2)
    signal = torch.randn(2, 16000 + 123) * 0.1
    whole, frames = codec.encode(signal)
    state = codec.new_stream_state()
    chunks, start = [], 0
    for size in (100, 1000, 3333, 640, 5000, 2000):  # arbitrary sizes, not multiples of the hop
        chunks.append(codec.encode_chunk(signal[:, start : start + size], state))
        start += size
    chunks.append(codec.encode_chunk(signal[:, start:], state))
    chunks.append(codec.flush(state))
    streamed = torch.cat(chunks, dim=-1)
    assert torch.equal(streamed, whole)

    full_audio = codec.decode(whole)
    dec_state = codec.new_stream_state()
    pieces = [
        codec.decode_chunk(whole[..., a:b], dec_state)
        for a, b in ((0, 1), (1, 7), (7, 8), (8, whole.shape[-1]))
    ]
    assert (torch.cat(pieces, dim=-1) - full_audio).abs().max() < 1e-5


def test_causal_transformer_sliding_window_bounds_the_stream_cache():
    config = CodecConfig(**{**codec_tiny().__dict__, "causal": True, "transformer_context": 4})
    torch.manual_seed(0)
    codec = Codec(config).eval()
    signal = torch.randn(1, 320 * 12) * 0.1
    whole, _ = codec.encode(signal)
    state = codec.new_stream_state()
    streamed = torch.cat(
        [codec.encode_chunk(signal[:, i : i + 640], state) for i in range(0, 320 * 12, 640)], -1
    )
    assert torch.equal(streamed, whole)
    assert state.encoder["transformer.0.k"].shape[2] == 3


def test_streaming_a_non_causal_codec_is_refused():
    with pytest.raises(RuntimeError, match="causal"):
        Codec(codec_tiny()).new_stream_state()


def test_every_prefix_of_levels_decodes_to_audio():
    codec = trained_tiny()
    signal = torch.randn(1, 3200) * 0.1
    codes, frames = codec.encode(signal)
    for n_q in range(1, codec.num_quantizers + 1):
        prefix, _ = codec.encode(signal, n_q=n_q)
        assert torch.equal(prefix, codes[:, :n_q])
        audio = codec.decode(prefix, frames)
        assert audio.shape == (1, 3200) and torch.isfinite(audio).all()
    with pytest.raises(ValueError, match="codes must be in"):
        codec.decode(torch.full((1, 2, 3), codec.codebook_size))


def test_forward_returns_reconstruction_losses_and_codebook_statistics():
    torch.manual_seed(0)
    codec = Codec(codec_tiny()).train()
    audio = torch.randn(2, 3000) * 0.1
    out = codec(audio, torch.tensor([3000, 2000]))
    assert out.audio.shape == audio.shape
    assert out.codes.shape == (2, 4, 10) and out.frame_lengths.tolist() == [10, 7]
    assert out.rvq.commitment_loss.requires_grad
    assert out.rvq.usage.shape == (4,)


def test_weight_norm_folding_keeps_outputs_and_save_load_round_trips(tmp_path):
    codec = trained_tiny()
    signal = torch.randn(2, 4000) * 0.1
    codes, frames = codec.encode(signal)
    audio = codec.decode(codes, frames)
    save_pretrained(codec, tmp_path / "codec", family="codec")
    loaded = load_pretrained_codec(tmp_path / "codec")
    assert not any("parametrizations" in k for k in loaded.state_dict())
    codes2, _ = loaded.encode(signal)
    assert torch.equal(codes, codes2)
    assert (loaded.decode(codes2, frames) - audio).abs().max() < 1e-5
    assert loaded.codebook_hash() == codec.codebook_hash()


def test_mel_loss_is_zero_for_identical_audio_fp32_under_autocast_and_ignores_padding():
    torch.manual_seed(0)
    mel = MultiScaleMelLoss(16000)
    a = torch.randn(2, 8000) * 0.1
    assert mel(a, a) == 0
    b = a + 0.01 * torch.randn_like(a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mel(a, b)
    assert loss.dtype == torch.float32 and loss > 0
    lengths = torch.tensor([8000, 4000])
    c = b.clone()
    c[1, 6000:] = 5.0  # garbage well past the valid part (beyond the largest window)
    assert torch.allclose(mel(a, b, lengths), mel(a, c, lengths), atol=1e-6)
    stft = MultiResolutionSTFTLoss()
    assert stft(a, a) < 1e-5 < stft(a, b)


def test_si_sdr_is_scale_invariant_and_drops_with_noise():
    torch.manual_seed(0)
    ref = torch.randn(1, 4000)
    assert si_sdr(0.5 * ref, ref) > 60
    assert si_sdr(ref + 0.1 * torch.randn_like(ref), ref) > si_sdr(ref + torch.randn_like(ref), ref)


def test_discriminators_return_logits_and_features_and_losses_have_expected_signs():
    torch.manual_seed(0)
    disc = CombinedDiscriminator(
        stft_n_ffts=(256, 128), stft_filters=4, periods=(2, 3), period_channels=(4, 8)
    )
    audio = torch.randn(2, 4000)
    logits, feats = disc(audio)
    assert len(logits) == 4 and len(feats) == 4 and all(len(f) > 0 for f in feats)
    ones, minus = [torch.ones(2, 3)], [-torch.ones(2, 3)]
    assert discriminator_loss(ones, minus, "hinge") == 0 and discriminator_loss(minus, ones, "hinge") > 0
    assert discriminator_loss(ones, [torch.zeros(2, 3)], "ls") == 0
    assert feature_matching_loss(feats, feats) == 0


def test_codec_eval_reports_one_row_per_codec_and_n_q():
    from speechlab.inference.codec_metrics import evaluate_codec, format_table

    codec = trained_tiny()
    torch.manual_seed(3)
    clips = [torch.randn(3000) * 0.1, torch.randn(4100) * 0.1]
    rows = [{"codec": "tiny", **evaluate_codec(codec, clips, 16000, n_q)} for n_q in (1, 4)]
    assert rows[0]["kbps"] == 0.3 and rows[1]["kbps"] == 1.2
    assert rows[1]["mel_distance"] <= rows[0]["mel_distance"] + 1.0
    assert 0 < rows[0]["codebook_usage"] <= 1 and rows[0]["rtf"] > 0
    table = format_table(rows).splitlines()
    assert len(table) == 4 and "mel_distance" in table[0] and "si_sdr" in table[0]


def speech_batch(num: int = 8, seconds: float = 0.4) -> torch.Tensor:
    """``num`` LJ Speech crops from 1 s in (speech, not leading silence): ``(num, samples)``."""
    from pathlib import Path

    from speechlab.audio import load_audio
    from speechlab.data.manifest import read_manifest

    manifest = Path(__file__).resolve().parents[1] / "data" / "ljspeech_en" / "manifest.jsonl"
    items = read_manifest(manifest)[:num]
    return torch.stack([load_audio(it["audio"], 16000, offset=1.0, duration=seconds) for it in items])


def test_fresh_encoder_latent_carries_the_signal_not_a_per_channel_constant():
    # PyTorch's default conv init made it a constant (|mean| 0.041 against a time-std of 0.0075): k-means then
    # spread the codes over a speck that the first optimiser steps moved off, and the codes collapsed
    torch.manual_seed(0)
    latent, _ = Codec(codec_tiny()).encode_latent(speech_batch(4))
    assert latent.std(dim=2).mean() > 2 * latent.mean(dim=2).abs().mean()


def test_codebooks_stay_spread_over_the_first_training_steps_on_speech():
    """20 reconstruction steps (lr 2e-3, as the mini recipe) on 6 speech crops: the old init left level 0 on
    ~4.5 effective codes of 64 (usage 0.14); a spread codebook keeps ~13 (usage 0.44) on these 120 frames."""
    audio = speech_batch(6)
    torch.manual_seed(0)
    codec = Codec(codec_tiny()).train()
    mel = MultiScaleMelLoss(16000)
    optimizer = torch.optim.AdamW(codec.parameters(), lr=2e-3, betas=(0.8, 0.99), weight_decay=0.0)
    for _ in range(20):
        out = codec(audio)
        loss = 15 * mel(out.audio, audio) + 0.25 * out.rvq.commitment_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    codes, _ = codec.eval().encode(audio)
    level0 = torch.bincount(codes[:, 0].flatten(), minlength=codec.codebook_size).float()
    prob = level0 / level0.sum()
    perplexity = float(torch.exp(-(prob * prob.clamp_min(1e-12).log()).sum()))
    assert perplexity >= 8.0
    assert (level0 > 0).float().mean() >= 0.3
