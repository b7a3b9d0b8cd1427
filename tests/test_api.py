"""speechlab.load from every source type, the pretrained directory, and FeatureExtractor's guarantees."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from speechlab.api import (
    FeatureExtractor,
    WeightedLayerSum,
    conv_geometry,
    cpu_has_native_bf16,
    load,
    plan_chunks,
)
from speechlab.checkpoints.pretrained_dir import load_pretrained, load_tokenizer, save_pretrained
from speechlab.checkpoints.safe_load import CheckpointError
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig

REPO = Path(__file__).resolve().parents[1]
TINY_CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2


def tiny_config(**overrides) -> SSLEncoderConfig:
    values = dict(
        conv_layers=TINY_CONV,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=64,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        relative_position_bias=True,
        num_buckets=32,
        max_distance=64,
    )
    values.update(overrides)
    return SSLEncoderConfig(**values)


def tiny_encoder(**overrides) -> SSLEncoder:
    torch.manual_seed(0)
    return SSLEncoder(tiny_config(**overrides)).eval()


HF_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    conv_dim=[32] * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


def hf_model(model_type: str, **overrides):
    """A random-init transformers model of ``model_type`` (tiny)."""
    import transformers

    classes = {
        "wavlm": ("WavLMConfig", "WavLMModel", {"num_buckets": 32, "max_bucket_distance": 64}),
        "hubert": ("HubertConfig", "HubertModel", {}),
        "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", {}),
        "unispeech": ("UniSpeechConfig", "UniSpeechModel", {}),
    }
    config_name, model_name, extra = classes[model_type]
    config = getattr(transformers, config_name)(**HF_TINY, **extra, **overrides)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def hf_hidden_states(model, audio: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(audio, output_hidden_states=True).hidden_states


# ---------------------------------------------------------------------------------------- pretrained directory


def test_save_load_pretrained_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_encoder(conv_norm="layer", layer_norm_first=True, normalize_waveform=True)
    save_pretrained(model, tmp_path / "m", family="wavlm")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["family"] == "wavlm" and config["speechlab_version"]
    assert config["config"]["hidden_size"] == 32 and config["config"]["conv_norm"] == "layer"
    assert set(config["config"]) == set(SSLEncoderConfig.__dataclass_fields__)
    assert (tmp_path / "m" / "README.md").read_text().startswith("# m")
    loaded = load(tmp_path / "m")
    assert loaded.config == model.config
    audio = torch.randn(2, 8000)
    with torch.no_grad():
        assert torch.equal(model(audio).last_hidden_state, loaded(audio).last_hidden_state)


def test_pretrained_dir_saves_and_restores_the_tokenizer(tmp_path):
    from speechlab.data.text import CharTokenizer

    tokenizer = CharTokenizer.build(["hello world", "abc"])
    save_pretrained(tiny_encoder(), tmp_path / "m", family="wavlm", tokenizer=tokenizer)
    restored = load_tokenizer(tmp_path / "m")
    assert restored.units == tokenizer.units
    assert restored.encode("hello") == tokenizer.encode("hello")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    save_pretrained(tiny_encoder(), tmp_path / "m", family="wavlm")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(str(weights))
    del state["feature_projection.weight"]
    state["head.weight"] = torch.zeros(3)
    state["feature_norm.weight"] = torch.zeros(7)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path / "m")
    message = str(info.value)
    assert "missing keys: feature_projection.weight" in message
    assert "unexpected keys: head.weight" in message
    assert "feature_norm.weight: checkpoint [7] vs model [32]" in message


def test_truncated_weights_in_pretrained_dir_are_a_clear_error(tmp_path):
    save_pretrained(tiny_encoder(), tmp_path / "m", family="wavlm")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(tmp_path / "m")


def test_absurd_config_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    save_pretrained(tiny_encoder(), tmp_path / "m", family="wavlm")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["config"]["hidden_size"] = 4_000_000
    path.write_text(json.dumps(config))

    def no_build(*args, **kwargs):
        raise AssertionError("model was built")

    monkeypatch.setattr(SSLEncoder, "__init__", no_build)
    with pytest.raises(CheckpointError, match="hidden_size=4000000"):
        load(tmp_path / "m")


def test_unknown_family_and_unknown_fields_are_named(tmp_path):
    save_pretrained(tiny_encoder(), tmp_path / "m", family="wavlm")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "family": "whisper"}))
    with pytest.raises(CheckpointError, match="unknown model family 'whisper'"):
        load(tmp_path / "m")
    config["config"]["num_experts"] = 4
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_experts"):
        load(tmp_path / "m")


# ---------------------------------------------------------------------------------------- other sources


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("wavlm", {}),
        ("hubert", {}),
        ("wav2vec2", {}),
        ("wavlm", {"feat_extract_norm": "layer", "do_stable_layer_norm": True}),
    ],
)
def test_load_hugging_face_directory_matches_transformers(tmp_path, model_type, overrides):
    reference = hf_model(model_type, **overrides)
    reference.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf")
    audio = torch.randn(1, 12000)
    expected = hf_hidden_states(reference, audio)
    features = FeatureExtractor(model)(audio[0])
    assert features.hidden_states.shape[0] == len(expected) == 3
    for layer, state in enumerate(expected):
        assert (features.hidden_states[layer, 0] - state[0]).abs().max() < 1e-4


def test_load_hugging_face_unispeech_directory(tmp_path):
    reference = hf_model("unispeech")
    reference.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf")
    audio = torch.randn(1, 12000)
    expected = hf_hidden_states(reference, audio)
    features = FeatureExtractor(model)(audio[0])
    for layer, state in enumerate(expected):
        assert (features.hidden_states[layer, 0] - state[0]).abs().max() < 1e-4


def test_unknown_hugging_face_model_type_is_named(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'whisper'"):
        load(tmp_path / "hf")


def _hf_to_unilm_key(key: str) -> str:
    """HF WavLMModel key -> unilm WavLM key, written out from the two codebases' module names (independent of our importer)."""
    import re

    rules = [
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
        (r"feature_extractor\.conv_layers\.0\.layer_norm\.", r"feature_extractor.conv_layers.0.2."),
        (r"feature_projection\.layer_norm\.", "layer_norm."),
        (r"feature_projection\.projection\.", "post_extract_proj."),
        (r"masked_spec_embed", "mask_emb"),
        (
            r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0",
            "encoder.pos_conv.0.weight_g",
        ),
        (
            r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1",
            "encoder.pos_conv.0.weight_v",
        ),
        (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"attention\.rel_attn_embed\.", "self_attn.relative_attention_bias."),
        (r"attention\.gru_rel_pos_linear\.", "self_attn.grep_linear."),
        (r"attention\.gru_rel_pos_const", "self_attn.grep_a"),
        (r"attention\.(q|k|v|out)_proj\.", r"self_attn.\1_proj."),
        (r"layers\.(\d+)\.layer_norm\.", r"layers.\1.self_attn_layer_norm."),
        (r"feed_forward\.intermediate_dense\.", "fc1."),
        (r"feed_forward\.output_dense\.", "fc2."),
    ]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def test_load_unilm_pt_matches_transformers(tmp_path):
    reference = hf_model("wavlm")
    state = {_hf_to_unilm_key(k): v.clone() for k, v in reference.state_dict().items()}
    assert "encoder.pos_conv.0.weight_g" in state and "encoder.layers.1.self_attn.grep_a" in state
    cfg = {
        "extractor_mode": "default",
        "encoder_layers": 2,
        "encoder_embed_dim": 32,
        "encoder_ffn_embed_dim": 64,
        "encoder_attention_heads": 4,
        "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        "conv_pos": 16,
        "conv_pos_groups": 4,
        "relative_position_embedding": True,
        "num_buckets": 32,
        "max_distance": 64,
        "gru_rel_pos": True,
        "layer_norm_first": False,
        "normalize": False,
    }
    torch.save({"cfg": cfg, "model": state}, tmp_path / "WavLM-Tiny.pt")
    model = load(tmp_path / "WavLM-Tiny.pt")
    audio = torch.randn(1, 12000)
    expected = hf_hidden_states(reference, audio)
    features = FeatureExtractor(model)(audio[0])
    for layer, hidden in enumerate(expected):
        assert (features.hidden_states[layer, 0] - hidden[0]).abs().max() < 1e-4

    del state["encoder.layers.1.fc1.weight"]
    torch.save({"cfg": cfg, "model": state}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: encoder\.layers\.1\.feed_forward\.fc1\.weight"):
        load(tmp_path / "broken.pt")


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """Lay out ``source`` as the cached snapshot of ``repo_id`` (the huggingface_hub cache format)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(source, repo / "snapshots" / sha)


def test_hub_id_loads_from_the_local_cache_when_offline(tmp_path):
    reference = hf_model("wavlm")
    reference.save_pretrained(tmp_path / "hf")
    _fake_hub_cache(tmp_path / "cache", "speechlab-tests/tiny-wavlm", tmp_path / "hf")
    model = load("speechlab-tests/tiny-wavlm", cache_dir=tmp_path / "cache")
    audio = torch.randn(1, 8000)
    with torch.no_grad():
        assert (model(audio).last_hidden_state - reference(audio).last_hidden_state).abs().max() < 1e-4


def test_hub_id_not_reachable_and_not_cached_names_the_id(tmp_path):
    with pytest.raises(CheckpointError, match="speechlab-tests/not-a-model.*not in the local cache"):
        load("speechlab-tests/not-a-model", cache_dir=tmp_path / "empty")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load(str(tmp_path / "nothing" / "here" / "model"))


# ---------------------------------------------------------------------------------------- feature extraction


def test_padded_batch_equals_single_utterances_for_layer_norm_models():
    model = tiny_encoder(conv_norm="layer", layer_norm_first=True, normalize_waveform=True)
    extractor = FeatureExtractor(model)
    torch.manual_seed(1)
    waves = [torch.randn(n) for n in (16000, 9100, 12345, 400)]
    batch = extractor(waves)
    assert batch.lengths.tolist() == [49, 28, 38, 1]  # floor((S - 400) / 320) + 1
    for i, wave in enumerate(waves):
        alone = extractor(wave)
        n = int(batch.lengths[i])
        assert (batch.hidden_states[:, i, :n] - alone.hidden_states[:, 0]).abs().max() < 1e-4
        assert not batch.hidden_states[:, i, n:].any()  # padded frames are zero


def test_padded_tensor_with_lengths_equals_list_input():
    extractor = FeatureExtractor(tiny_encoder(conv_norm="layer"))
    waves = [torch.randn(12000), torch.randn(7000)]
    padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    a = extractor(padded, torch.tensor([12000, 7000]))
    b = extractor(waves)
    assert torch.equal(a.lengths, b.lengths)
    assert (a.hidden_states - b.hidden_states).abs().max() < 1e-5


def test_group_norm_model_warns_once_and_exact_mode_matches_single_utterances():
    model = tiny_encoder()  # conv_norm="group" (Base)
    waves = [torch.randn(16000), torch.randn(6000), torch.randn(6000)]
    padded_extractor = FeatureExtractor(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        padded = padded_extractor(waves)
        padded_extractor(waves)
    assert sum("GroupNorm" in str(w.message) for w in caught) == 1
    exact = FeatureExtractor(model, exact=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped = exact(waves)
    for i, wave in enumerate(waves):
        alone = exact(wave)
        n = int(grouped.lengths[i])
        assert (grouped.hidden_states[:, i, :n] - alone.hidden_states[:, 0]).abs().max() < 1e-4
    # and the padded (non-exact) result really differs for the short utterances: the warning is not idle
    n = int(padded.lengths[1])
    assert (padded.hidden_states[:, 1, :n] - grouped.hidden_states[:, 1, :n]).abs().max() > 1e-2


def test_file_paths_are_read_and_resampled(tmp_path):
    import torchaudio.functional as AF

    rng = np.random.default_rng(0)
    signal = (0.1 * rng.standard_normal(22050)).astype(np.float32)
    sf.write(tmp_path / "a.wav", signal, 22050, subtype="FLOAT")
    extractor = FeatureExtractor(tiny_encoder(conv_norm="layer"), layers=[-1])
    from_file = extractor(tmp_path / "a.wav")
    from_array = extractor(torch.from_numpy(signal), sample_rate=22050)
    expected = extractor(AF.resample(torch.from_numpy(signal), 22050, 16000))
    assert from_file.layers == (2,)
    assert (from_file.hidden_states - expected.hidden_states).abs().max() < 1e-5
    assert (from_array.hidden_states - expected.hidden_states).abs().max() < 1e-5


def test_too_short_input_is_a_clear_error():
    extractor = FeatureExtractor(tiny_encoder())
    with pytest.raises(ValueError, match="input 1: 399 samples is shorter than the model's receptive field"):
        extractor([torch.randn(1000), torch.randn(399)])


@pytest.mark.parametrize("num_samples", [400, 719, 720, 16000, 16399, 123457])
@pytest.mark.parametrize("chunk, context", [(1, 0), (7, 3), (50, 10)])
def test_chunk_plan_covers_every_frame_once_on_the_global_grid(num_samples, chunk, context):
    hop, field = conv_geometry(TINY_CONV)
    assert (hop, field) == (320, 400)
    encoder = tiny_encoder()
    total = int(encoder.frame_lengths(torch.tensor([num_samples]))[0])
    windows = plan_chunks(total, hop=hop, receptive_field=field, chunk_frames=chunk, context_frames=context)
    kept = [f for w in windows for f in range(w.keep_start, w.keep_end)]
    assert kept == list(range(total))
    for w in windows:
        assert w.sample_start == w.frame_start * hop and w.sample_end <= num_samples
        frames = int(encoder.frame_lengths(torch.tensor([w.num_samples]))[0])
        assert frames == w.frame_end - w.frame_start
        assert w.frame_start <= w.keep_start and w.keep_end <= w.frame_end


def test_chunked_extraction_equals_unchunked_when_context_covers_the_receptive_field():
    # no attention layers: every output frame depends on a bounded window (conv encoder + positional conv of
    # 16 frames), so frame-exact stitching must reproduce the unchunked result, including whole-file normalisation
    model = tiny_encoder(conv_norm="layer", num_layers=0, normalize_waveform=True)
    torch.manual_seed(2)
    audio = 0.1 * torch.randn(16000 * 7 + 123)
    full = FeatureExtractor(model, chunk_seconds=None)(audio)
    chunked_extractor = FeatureExtractor(model, chunk_seconds=1.0, context_seconds=0.4, batch_seconds=3.0)
    assert audio.numel() > chunked_extractor.chunk_threshold
    chunked = chunked_extractor(audio)
    assert chunked.hidden_states.shape == full.hidden_states.shape
    assert (chunked.hidden_states - full.hidden_states).abs().max() < 1e-4
    streamed = torch.cat([states for _, states in chunked_extractor.iter_chunks(audio)], dim=1)
    assert torch.equal(streamed, chunked.hidden_states[:, 0])


def test_chunked_extraction_with_attention_layers_has_exact_frame_count_and_close_values():
    model = tiny_encoder(conv_norm="layer", layer_norm_first=True)
    audio = 0.1 * torch.randn(16000 * 6)
    full = FeatureExtractor(model, chunk_seconds=None)(audio)
    chunked = FeatureExtractor(model, chunk_seconds=1.0, context_seconds=1.0)(audio)
    assert chunked.hidden_states.shape == full.hidden_states.shape
    # the conv-level state (index 0 sees 16 frames of positional context) is exact; attention layers see 1 s
    assert (chunked.hidden_states[0] - full.hidden_states[0]).abs().max() < 1e-4
    assert torch.isfinite(chunked.hidden_states).all()


def test_weighted_layer_sum_learnable_and_fixed():
    states = torch.randn(3, 2, 5, 4)
    learnable = WeightedLayerSum(3)
    assert torch.allclose(learnable(states), states.mean(0), atol=1e-6)
    learnable(states).sum().backward()
    assert learnable.logits.grad is not None and learnable.logits.grad.abs().sum() > 0
    fixed = WeightedLayerSum(3, learnable=False, weights=[0.0, 1.0, 0.0])
    assert torch.equal(fixed(states), states[1])
    assert not list(fixed.parameters())


def test_bf16_autocast_runs_in_inference_mode_and_stays_close():
    model = tiny_encoder(conv_norm="layer")
    audio = torch.randn(16000)
    fp32 = FeatureExtractor(model)(audio).hidden_states
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bf16_extractor = FeatureExtractor(model, bf16=True)
    # on CPUs without native bf16 the user is told that autocast will be slower there
    assert any("native bfloat16" in str(w.message) for w in caught) == (not cpu_has_native_bf16())
    bf16 = bf16_extractor(audio).hidden_states
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.25 * fp32.abs().max()
    assert not torch.equal(bf16, fp32)


def test_readme_snippet_runs_as_written(tmp_path):
    """docs/extract_snippet.py runs unchanged; the hub id resolves to a tiny model in an offline cache."""
    import transformers

    config = transformers.WavLMConfig(
        **{**HF_TINY, "num_hidden_layers": 12}, num_buckets=32, max_bucket_distance=64
    )
    transformers.WavLMModel(config).save_pretrained(tmp_path / "hf")
    _fake_hub_cache(tmp_path / "hub", "microsoft/wavlm-base-plus", tmp_path / "hf")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "extract_snippet.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 2, 482, 32])" in result.stdout


@pytest.mark.parametrize("conv_norm", ["group", "layer"])
def test_streaming_long_input_leaves_the_shared_model_and_config_untouched(conv_norm):
    # Another user of the same model (a second extractor, a training step) may run between two windows.
    model = tiny_encoder(conv_norm=conv_norm, layer_norm_first=conv_norm == "layer", normalize_waveform=True)
    before = dataclasses.asdict(model.config)
    norm = model.feature_encoder.conv_layers[0].norm
    attributes = set(vars(norm)) if norm is not None else None
    audio = 0.1 * torch.randn(16000 * 4)
    short = 0.1 * torch.randn(12000)
    alone = FeatureExtractor(model)(short).hidden_states
    stream = FeatureExtractor(model, chunk_seconds=1.0, context_seconds=0.25).iter_chunks(audio)
    next(stream)  # paused between windows
    assert dataclasses.asdict(model.config) == before
    if norm is not None:
        assert set(vars(norm)) == attributes, "no state set on the norm module"
    assert torch.equal(FeatureExtractor(model)(short).hidden_states, alone)
    list(stream)


@pytest.mark.parametrize("conv_norm", ["group", "layer"])
def test_chunked_conv_features_are_exact_for_group_norm_and_layer_norm_models(conv_norm):
    # Base models normalise block 0 over time (GroupNorm): each window must use the whole file's statistics.
    model = tiny_encoder(conv_norm=conv_norm, layer_norm_first=conv_norm == "layer")
    torch.manual_seed(3)
    audio = 0.1 * torch.randn(16000 * 6 + 77)
    audio[: 16000 * 2] *= 5.0  # a loud first part: per-window statistics would differ a lot from the file's
    full = FeatureExtractor(model, chunk_seconds=None)(audio)
    chunked = FeatureExtractor(model, chunk_seconds=1.0, context_seconds=0.5)(audio)
    assert chunked.hidden_states.shape == full.hidden_states.shape
    # hidden state 0 = conv features + positional conv (16 frames here, inside the 0.5 s context): exact
    assert (chunked.hidden_states[0] - full.hidden_states[0]).abs().max() < 1e-4
    assert (
        model.feature_encoder.conv_layers[0].norm is None
        or getattr(model.feature_encoder.conv_layers[0].norm, "fixed_statistics", None) is None
    ), "the whole-file statistics must not stay set after extraction"
