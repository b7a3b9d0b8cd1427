import math
from pathlib import Path

import pytest
import torch

from speechlab.augment.mixing import MixingConfig, UtteranceMixer

DATA = Path(__file__).resolve().parents[1] / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0, lengths=(8000, 7000, 5000, 3000, 8000, 900)):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    audio = 0.1 * torch.randn(len(lengths), int(lengths.max()), generator=gen)
    audio[torch.arange(audio.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return audio, lengths


def _noise_clips():
    gen = torch.Generator().manual_seed(1)
    return [0.3 * torch.randn(500, generator=gen), torch.randn(20000, generator=gen)]


def _level_db(audio, mixed, lengths, info, row):
    start, length = int(info.start[row]), int(info.length[row])
    added = (mixed[row] - audio[row])[start : start + length].double()
    primary = audio[row, : int(lengths[row])].double()
    return 10 * math.log10(primary.pow(2).mean() / added.pow(2).mean())


def test_interfering_segment_never_exceeds_max_overlap_and_stays_inside_it():
    audio, lengths = _batch()
    for max_overlap in (0.5, 0.2):
        mixer = UtteranceMixer(_noise_clips(), mix_prob=1.0, noise_prob=0.5, max_overlap=max_overlap, seed=3)
        for _ in range(20):
            mixed, _, info = mixer.mix(audio, lengths)
            assert (info.kind > 0).all()
            assert (info.length >= 1).all()
            assert (info.length <= torch.floor(lengths * max_overlap)).all()
            assert (info.start + info.length <= lengths).all()
            changed = (mixed != audio).nonzero()
            rows, cols = changed[:, 0], changed[:, 1]
            assert (cols >= info.start[rows]).all() and (cols < (info.start + info.length)[rows]).all()


@pytest.mark.parametrize("noise_prob,kind", [(1.0, 2), (0.0, 1)])
def test_achieved_snr_and_energy_ratio_equal_the_drawn_value(noise_prob, kind):
    audio, lengths = _batch()
    mixer = UtteranceMixer(_noise_clips(), mix_prob=1.0, noise_prob=noise_prob, seed=5)
    for _ in range(10):
        mixed, _, info = mixer.mix(audio, lengths)
        assert (info.kind == kind).all()
        low, high = mixer.snr_range if kind == 2 else mixer.energy_ratio_range
        assert ((info.level_db >= low) & (info.level_db <= high)).all()
        for row in range(audio.shape[0]):
            assert abs(_level_db(audio, mixed, lengths, info, row) - float(info.level_db[row])) < 0.1


def test_padding_stays_exactly_zero():
    audio, lengths = _batch()
    mixer = UtteranceMixer(_noise_clips(), mix_prob=1.0, noise_prob=0.5, seed=0)
    padding = torch.arange(audio.shape[1])[None, :] >= lengths[:, None]
    for _ in range(10):
        mixed, out_lengths, _ = mixer.mix(audio, lengths)
        assert torch.equal(out_lengths, lengths)
        assert (mixed[padding] == 0).all()


def test_same_seed_gives_the_same_mixture_and_other_seeds_differ():
    audio, lengths = _batch()
    first = UtteranceMixer(_noise_clips(), mix_prob=0.7, seed=11)(audio, lengths)[0]
    again = UtteranceMixer(_noise_clips(), mix_prob=0.7, seed=11)(audio, lengths)[0]
    other = UtteranceMixer(_noise_clips(), mix_prob=0.7, seed=12)(audio, lengths)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_speech_partner_is_another_utterance_and_its_clean_segment_is_added():
    audio, lengths = _batch()
    mixer = UtteranceMixer(None, mix_prob=1.0, seed=2)
    rows = torch.arange(audio.shape[0])
    for _ in range(30):
        mixed, _, info = mixer.mix(audio, lengths)
        assert (info.kind == 1).all()
        assert (info.source != rows).all()
        for row in rows.tolist():
            src, s0, start, n = (
                int(v[row]) for v in (info.source, info.source_start, info.start, info.length)
            )
            assert s0 + n <= lengths[src]
            expected = info.scale[row].float() * audio[src, s0 : s0 + n]
            torch.testing.assert_close(
                mixed[row, start : start + n] - audio[row, start : start + n], expected
            )


def test_short_noise_clips_are_looped():
    audio, lengths = _batch(lengths=(8000, 8000))
    clip = torch.linspace(0.1, 1.0, 500)
    mixer = UtteranceMixer([clip], mix_prob=1.0, noise_prob=1.0, seed=4)
    mixed, _, info = mixer.mix(audio, lengths)
    for row in range(2):
        start, n, s0 = int(info.start[row]), int(info.length[row]), int(info.source_start[row])
        assert n > 500
        expected = info.scale[row].float() * clip[(s0 + torch.arange(n)) % 500]
        torch.testing.assert_close(mixed[row, start : start + n] - audio[row, start : start + n], expected)


def test_mix_prob_zero_and_single_utterance_without_noise_leave_audio_unchanged():
    audio, lengths = _batch()
    assert torch.equal(UtteranceMixer(_noise_clips(), mix_prob=0.0, seed=0)(audio, lengths)[0], audio)
    single = audio[:1]
    assert torch.equal(UtteranceMixer(None, mix_prob=1.0, seed=0)(single, lengths[:1])[0], single)


def test_mix_prob_is_respected_on_average():
    audio, lengths = _batch(lengths=(4000,) * 64)
    mixer = UtteranceMixer(_noise_clips(), mix_prob=0.3, noise_prob=0.5, seed=9)
    kinds = torch.cat([mixer.mix(audio, lengths)[2].kind for _ in range(20)])
    assert abs((kinds > 0).float().mean().item() - 0.3) < 0.05
    assert abs((kinds == 2).float().sum().item() / (kinds > 0).sum().item() - 0.5) < 0.08


def test_noise_bank_loads_from_a_noise_manifest():
    manifest = DATA / "noise_opensfx" / "manifest.jsonl"
    mixer = UtteranceMixer.from_config(
        MixingConfig(mix_prob=1.0, noise_prob=1.0, noise_manifest=str(manifest)), seed=0
    )
    assert mixer.num_noise_clips == sum(1 for line in manifest.read_text().splitlines() if line.strip())
    audio, lengths = _batch()
    mixed, _, info = mixer.mix(audio, lengths)
    assert (info.kind == 2).all()
    for row in range(audio.shape[0]):
        assert abs(_level_db(audio, mixed, lengths, info, row) - float(info.level_db[row])) < 0.1


def test_invalid_probabilities_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="mix_prob"):
        UtteranceMixer(None, mix_prob=1.5)
    with pytest.raises(ValueError, match="max_overlap"):
        UtteranceMixer(None, max_overlap=0.0)
