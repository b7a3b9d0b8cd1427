"""HFCodec: transformers EnCodec / DAC behind speechlab's encode/decode give the same codes and audio."""

from __future__ import annotations

import pytest
import torch
from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel

from speechlab.checkpoints.hf_codec import HFCodec, is_hf_codec_dir


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_encodec(tmp_path):
    torch.manual_seed(0)
    config = EncodecConfig(
        num_filters=4,
        hidden_size=16,
        codebook_size=32,
        num_lstm_layers=1,
        sampling_rate=16000,
        target_bandwidths=[0.5, 1.0, 2.0],
    )
    model = EncodecModel(config).eval()
    model.save_pretrained(tmp_path / "encodec")
    return model, tmp_path / "encodec"


def small_dac(tmp_path):
    torch.manual_seed(0)
    config = DacConfig(
        encoder_hidden_size=4,
        downsampling_ratios=[2, 4, 5, 8],
        decoder_hidden_size=16,
        n_codebooks=4,
        codebook_size=32,
        codebook_dim=4,
        sampling_rate=16000,
    )
    model = DacModel(config).eval()
    model.save_pretrained(tmp_path / "dac")
    return model, tmp_path / "dac"


def test_encodec_wrapper_gives_the_same_codes_and_audio_as_transformers(tmp_path):
    model, directory = small_encodec(tmp_path)
    assert is_hf_codec_dir(directory)
    codec = HFCodec.from_pretrained(directory)
    assert codec.sample_rate == 16000 and codec.hop_length == 320 and codec.frame_rate == 50
    audio = torch.randn(2, 8000) * 0.1
    allowed = codec.allowed_n_q()  # 0.5 / 1 / 2 kbps at 50 Hz x 5 bits
    assert allowed == [2, 4, 8]
    for n_q, bandwidth in zip(allowed, (0.5, 1.0, 2.0), strict=True):
        codes, frames = codec.encode(audio, n_q=n_q)
        with torch.no_grad():
            ref = model.encode(audio[:, None], bandwidth=bandwidth).audio_codes[0]
            ref_audio = model.decode(ref[None], [None]).audio_values[:, 0]
        assert codes.shape == (2, n_q, 25) and frames.tolist() == [25, 25]
        assert torch.equal(codes, ref)
        assert (codec.decode(codes) - ref_audio).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="target bandwidths"):
        codec.encode(audio, n_q=3)


def test_dac_wrapper_gives_the_same_codes_and_audio_as_transformers(tmp_path):
    model, directory = small_dac(tmp_path)
    codec = HFCodec.from_pretrained(directory)
    assert codec.num_quantizers == 4 and codec.allowed_n_q() == [1, 2, 3, 4]
    audio = torch.randn(2, 6400) * 0.1
    for n_q in (1, 4):
        codes, frames = codec.encode(audio, n_q=n_q)
        with torch.no_grad():
            ref = model.encode(audio[:, None], n_quantizers=n_q).audio_codes[:, :n_q]
            ref_audio = model.decode(audio_codes=ref).audio_values
        assert torch.equal(codes, ref) and frames.tolist() == [20, 20]
        assert (codec.decode(codes) - ref_audio).abs().max() <= 1e-6


def test_chunked_encodec_configs_are_refused():
    config = EncodecConfig(
        num_filters=4,
        hidden_size=16,
        codebook_size=32,
        num_lstm_layers=1,
        chunk_length_s=1.0,
        overlap=0.01,
        normalize=True,
    )
    with pytest.raises(ValueError, match="chunked"):
        HFCodec(EncodecModel(config))
