"""The fbank + Conformer CTC encoder: torchaudio parity, padding, frame counts, stored configs, learning on real speech."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchaudio

from speechlab.audio import load_audio
from speechlab.data.text import PhonemeTokenizer
from speechlab.models.ctc import CTCConfig, CTCModel, encoder_config_from_dict
from speechlab.models.fbank_conformer import FbankConformerConfig, FbankConformerEncoder, normalized_fbank
from speechlab.models.registry import build_config

ESPEAK = Path(__file__).resolve().parents[1] / "data" / "espeak"
SMALL = {
    "hidden_size": 32,
    "ffn_size": 64,
    "num_heads": 2,
    "num_layers": 2,
    "dropout": 0.0,
    "feature_dropout": 0.0,
}


def _english(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (ESPEAK / "manifest.jsonl").read_text().splitlines()]
    return sorted((r for r in rows if r["language"] == "en"), key=lambda r: r["id"])[:count]


def _padded(audios: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(a) for a in audios])
    return torch.nn.utils.rnn.pad_sequence(audios, batch_first=True), lengths


@pytest.fixture(scope="module")
def speech() -> tuple[torch.Tensor, torch.Tensor]:
    return _padded([load_audio(ESPEAK / it["audio"])[: 16000 + 4000 * i] for i, it in enumerate(_english(3))])


def test_preset_is_selectable_by_name_with_overrides():
    config = build_config("ctc_encoder", "fbank_conformer_tiny", {"num_layers": 2})
    assert isinstance(config, FbankConformerConfig) and config.num_layers == 2
    waveform = build_config("ctc_encoder", "waveform_conformer_tiny")
    assert (
        waveform.front_end == "waveform" and FbankConformerEncoder(waveform).hop == 640
    )  # 25 Hz, as fbank's
    with pytest.raises(ValueError, match="conv_layers"):
        build_config("ctc_encoder", "fbank_conformer_tiny", {"conv_layers": []})


def test_front_end_is_kaldi_fbank_with_per_utterance_normalisation(speech):
    audio, lengths = speech
    encoder = FbankConformerEncoder(FbankConformerConfig(**SMALL))
    feats = encoder.features(audio, lengths)
    for b, n in enumerate(lengths.tolist()):
        reference = torchaudio.compliance.kaldi.fbank(audio[None, b, :n] * 32768, num_mel_bins=80, dither=0.0)
        reference = (reference - reference.mean(0)) / (reference.std(0, unbiased=False) + 1e-5)
        frames = reference.shape[0]
        torch.testing.assert_close(feats[b, :, :frames].T, reference, atol=1e-4, rtol=1e-4)
        assert bool((feats[b, :, frames:] == 0).all())
        torch.testing.assert_close(normalized_fbank(audio[b, :n]), reference, atol=1e-4, rtol=1e-4)


def test_encoder_equals_torchaudio_conformer_on_the_subsampled_features(speech):
    audio, lengths = speech
    torch.manual_seed(0)
    encoder = FbankConformerEncoder(FbankConformerConfig(**SMALL)).eval()
    reference = torchaudio.models.Conformer(
        input_dim=32, num_heads=2, ffn_dim=64, num_layers=2, depthwise_conv_kernel_size=15
    ).eval()
    reference.load_state_dict(encoder.encoder.state_dict())
    with torch.no_grad():
        out = encoder(audio, lengths)
        expected, expected_lengths = reference(encoder.feature_projection(out.features), out.frame_lengths)
    torch.testing.assert_close(out.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    assert out.frame_lengths.tolist() == expected_lengths.tolist()


@pytest.mark.parametrize("front_end", ["fbank", "waveform"])
def test_frame_lengths_match_the_output_and_num_frames(speech, front_end):
    audio, lengths = speech
    for layers in (1, 2):
        config = FbankConformerConfig(**SMALL, subsampling_layers=layers, front_end=front_end)
        encoder = FbankConformerEncoder(config).eval()
        with torch.no_grad():
            out = encoder(audio, lengths)
        assert (
            out.last_hidden_state.shape[1]
            == encoder.num_frames(audio.shape[1])
            == int(out.frame_lengths.max())
        )
        assert encoder.frame_lengths(lengths).tolist() == out.frame_lengths.tolist()
        for b, n in enumerate(lengths.tolist()):
            assert encoder.num_frames(n) == int(out.frame_lengths[b])


@pytest.mark.parametrize("front_end", ["fbank", "waveform"])
def test_padding_does_not_change_the_conformer_input_at_valid_frames(speech, front_end):
    audio, lengths = speech
    encoder = FbankConformerEncoder(FbankConformerConfig(**SMALL, front_end=front_end)).eval()
    with torch.no_grad():
        batched = encoder(audio, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = encoder(audio[b : b + 1, :n])
            frames = int(alone.frame_lengths[0])
            torch.testing.assert_close(batched.features[b, :frames], alone.features[0], atol=1e-5, rtol=1e-5)
            assert not bool(batched.padding_mask[b, :frames].any()) and bool(
                batched.padding_mask[b, frames:].all()
            )


def test_stored_config_round_trips_and_ssl_configs_still_do():
    config = CTCConfig(encoder=build_config("ctc_encoder", "fbank_conformer_tiny"), vocab_size=40)
    stored = json.loads(json.dumps(dataclasses.asdict(config)))
    assert CTCConfig(**stored) == config
    ssl = build_config("ctc_encoder", "wavlm_tiny")
    assert encoder_config_from_dict(json.loads(json.dumps(dataclasses.asdict(ssl)))) == ssl


def test_ctc_loss_decreases_on_a_small_real_batch():
    """4 real espeak utterances (whole, with their phones), 40 AdamW steps: the CTC loss per phone must fall."""
    items = _english(4)
    tokenizer = PhonemeTokenizer.build(it["phonemes"] for it in items)
    audio, lengths = _padded([load_audio(ESPEAK / it["audio"]) for it in items])
    targets = [torch.tensor(tokenizer.encode(it["phonemes"])) for it in items]
    target_lengths = torch.tensor([len(t) for t in targets])
    torch.manual_seed(0)
    model = CTCModel(
        build_config("ctc_encoder", "fbank_conformer_tiny", SMALL), tokenizer.vocab_size, head_dropout=0.0
    )
    features = model.encoder.features  # fbank is fixed: compute it once, not 40 times
    cached = features(audio, lengths)
    model.encoder.features = lambda audio, lengths: cached
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits, frame_lengths = model(audio, lengths)
        loss = F.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1), torch.cat(targets), frame_lengths, target_lengths,
            reduction="sum", zero_infinity=True,
        ) / target_lengths.sum()  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_transcriber_decodes_a_fbank_conformer_model_whole(speech):
    from speechlab.inference.transcriber import Transcriber

    audio, lengths = speech
    tokenizer = PhonemeTokenizer.build(it["phonemes"] for it in _english(3))
    model = CTCModel(build_config("ctc_encoder", "fbank_conformer_tiny", SMALL), tokenizer.vocab_size)
    transcriber = Transcriber(model, tokenizer=tokenizer)
    assert transcriber.chunk_threshold is None and transcriber.frame_seconds == 0.04
    waves = [audio[b, :n] for b, n in enumerate(lengths.tolist())]
    log_probs = transcriber.log_probs(waves)
    for wave, lp in zip(waves, log_probs, strict=True):
        assert lp.shape == (model.encoder.num_frames(wave.numel()), tokenizer.vocab_size)
    assert len(transcriber(waves)) == 3


def test_hugging_face_export_is_refused_with_a_clear_message(tmp_path):
    from speechlab.checkpoints.export import export

    model = CTCModel(build_config("ctc_encoder", "fbank_conformer_tiny", SMALL), 10)
    with pytest.raises(ValueError, match="fbank Conformer.*--format speechlab"):
        export(model, tmp_path / "hf", fmt="hf")


def test_layerwise_lr_decay_is_refused_for_the_from_scratch_encoder():
    from speechlab.tasks.ctc import CTCTask

    with pytest.raises(ValueError, match="layerwise_lr_decay"):
        CTCTask(encoder="fbank_conformer_tiny", layerwise_lr_decay=0.9)
