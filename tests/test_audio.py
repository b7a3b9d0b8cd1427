"""speechlab.audio: decoding, segments, mix-down, resampling and clear errors for bad files."""

import os
import pickle

import numpy as np
import pytest
import torch

from speechlab.audio import AudioError, audio_info, load_audio
from speechlab.data.manifest import read_manifest


def _peak_hz(samples: torch.Tensor, sample_rate: int) -> float:
    spectrum = torch.fft.rfft(samples.double() * torch.hann_window(len(samples), dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * sample_rate / len(samples)


def test_bundled_flac_loads_as_mono_float32_with_manifest_length(ljspeech_manifest):
    item = read_manifest(ljspeech_manifest)[0]
    samples = load_audio(item["audio"])
    assert samples.dtype == torch.float32 and samples.ndim == 1
    assert samples.shape[0] == item["num_samples"]
    assert 0 < samples.abs().max() <= 1.0


def test_audio_info_reads_rate_frames_and_channels_from_the_header(tmp_corpus, make_sine):
    stereo = np.stack([make_sine(0.25, 8000), make_sine(0.25, 8000, 300.0)], axis=1)
    path = tmp_corpus.audio_file("st.wav", stereo, sample_rate=8000)
    assert audio_info(path) == (8000, 2000, 2)


def test_stereo_is_mixed_down_by_the_channel_mean(tmp_corpus, make_sine):
    left = make_sine(0.5, 16000, 440.0, 0.6)
    right = make_sine(0.5, 16000, 1000.0, 0.2)
    path = tmp_corpus.audio_file("stereo.wav", np.stack([left, right], axis=1), subtype="FLOAT")
    samples = load_audio(path)
    torch.testing.assert_close(samples, torch.from_numpy((left + right) / 2), atol=1e-6, rtol=0)


def test_multichannel_audio_is_mixed_down_to_one_channel(tmp_corpus):
    channels = np.random.default_rng(0).uniform(-0.5, 0.5, size=(4000, 6)).astype(np.float32)
    path = tmp_corpus.audio_file("six.wav", channels, subtype="FLOAT")
    torch.testing.assert_close(load_audio(path), torch.from_numpy(channels.mean(axis=1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("file_rate", [8000, 22050, 48000])
def test_other_rates_are_resampled_to_16k_keeping_length_and_frequency(tmp_corpus, make_sine, file_rate):
    path = tmp_corpus.audio_file(
        f"sine_{file_rate}.flac", make_sine(1.0, file_rate, 440.0), sample_rate=file_rate
    )
    samples = load_audio(path, sample_rate=16000)
    assert abs(samples.shape[0] - 16000) <= 1
    assert abs(_peak_hz(samples, 16000) - 440.0) <= 2.0
    reference = torch.from_numpy(make_sine(1.0, 16000, 440.0))[: samples.shape[0]]
    # away from the edges (filter transients) the resampled sine matches the 16 kHz sine closely
    assert (samples[800:-800] - reference[800:-800]).abs().max() < 0.02


def test_offset_and_duration_read_exactly_that_segment(tmp_corpus):
    ramp = np.linspace(-1, 1, 16000, dtype=np.float32)
    path = tmp_corpus.audio_file("ramp.wav", ramp, subtype="FLOAT")
    segment = load_audio(path, offset=0.25, duration=0.5)
    torch.testing.assert_close(segment, torch.from_numpy(ramp[4000:12000]))
    torch.testing.assert_close(load_audio(path, offset=0.75), torch.from_numpy(ramp[12000:]))


def test_segment_of_a_resampled_file_uses_seconds_not_samples(tmp_corpus, make_sine):
    path = tmp_corpus.audio_file("s48.flac", make_sine(1.0, 48000), sample_rate=48000)
    segment = load_audio(path, sample_rate=16000, offset=0.5, duration=0.25)
    assert segment.shape[0] == 4000


def test_duration_past_the_end_is_cut_at_the_end_of_the_file(tmp_corpus):
    path = tmp_corpus.audio_file("short.flac", seconds=0.5)
    assert load_audio(path, offset=0.25, duration=10.0).shape[0] == 4000


def test_offset_beyond_the_end_raises_audio_error(tmp_corpus):
    path = tmp_corpus.audio_file("short.flac", seconds=0.5)
    with pytest.raises(AudioError, match="beyond the end"):
        load_audio(path, offset=0.6)


def test_missing_file_raises_audio_error_naming_it(tmp_path):
    with pytest.raises(AudioError, match="does not exist") as err:
        load_audio(tmp_path / "nope.flac")
    assert err.value.path.endswith("nope.flac")


def test_zero_byte_file_raises_audio_error(tmp_path):
    path = tmp_path / "empty.flac"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="0 bytes"):
        load_audio(path)


def test_truncated_flac_raises_audio_error(tmp_corpus):
    path = tmp_corpus.audio_file(
        "full.flac", np.random.default_rng(0).normal(0, 0.1, 48000).astype(np.float32)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated|corrupt"):
        load_audio(path)


def test_non_audio_bytes_with_an_audio_extension_raise_audio_error(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file, not audio\n" * 10)
    with pytest.raises(AudioError, match="cannot decode") as err:
        load_audio(path)
    assert "notes.wav" in str(err.value)
    with pytest.raises(AudioError):
        audio_info(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_samples_raise_audio_error(tmp_corpus, bad):
    signal = np.zeros(1600, dtype=np.float32)
    signal[100] = bad
    path = tmp_corpus.audio_file("bad.wav", signal, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN/inf"):
        load_audio(path)


def test_unreadable_permissions_raise_audio_error(tmp_corpus, monkeypatch):
    path = tmp_corpus.audio_file("locked.flac")
    real_access = os.access
    # chmod 000 does not stop root (tests may run as root), so deny access through os.access as well
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode))
    path.chmod(0)
    try:
        with pytest.raises(AudioError, match="permission denied"):
            load_audio(path)
    finally:
        path.chmod(0o644)


def test_silent_file_loads_as_zeros_without_error(tmp_corpus):
    path = tmp_corpus.audio_file("silence.flac", np.zeros(8000, dtype=np.float32))
    samples = load_audio(path)
    assert samples.shape == (8000,) and samples.abs().max() == 0


def test_clipped_file_loads_unchanged(tmp_corpus, make_sine):
    clipped = np.clip(make_sine(0.5, 16000, amplitude=3.0), -1.0, 1.0)
    path = tmp_corpus.audio_file("clipped.wav", clipped, subtype="FLOAT")
    samples = load_audio(path)
    assert samples.max() == 1.0 and samples.min() == -1.0
    torch.testing.assert_close(samples, torch.from_numpy(clipped))


def test_ogg_vorbis_is_decoded(tmp_corpus, make_sine):
    path = tmp_corpus.audio_file("tone.ogg", make_sine(0.5, 16000, 440.0))
    samples = load_audio(path)
    assert abs(samples.shape[0] - 8000) <= 1
    assert abs(_peak_hz(samples, 16000) - 440.0) <= 4.0


def test_audio_error_keeps_its_fields_through_pickling():
    err = pickle.loads(pickle.dumps(AudioError("/x.flac", "broken", "fix it")))
    assert (err.path, err.reason, err.remedy) == ("/x.flac", "broken", "fix it")
    assert str(err) == "/x.flac: broken -> fix it"


def test_negative_offset_is_a_caller_error(tmp_corpus):
    with pytest.raises(ValueError, match="offset"):
        load_audio(tmp_corpus.audio_file("a.flac"), offset=-1.0)
