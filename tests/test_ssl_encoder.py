"""Specification tests for the SSL backbone (conv encoder, position bias, attention, masking, SSLEncoder)."""

from __future__ import annotations

import math

import pytest
import torch

from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig, normalize_waveform
from speechlab.models.wavlm import (
    hubert_base,
    tiny_encoder,
    wav2vec2_base,
    wavlm_base,
    wavlm_base_plus,
    wavlm_large,
    wavlm_tiny,
)
from speechlab.nn.attention import MultiHeadSelfAttention
from speechlab.nn.feature_encoder import ConvFeatureEncoder, conv_output_lengths
from speechlab.nn.masking import span_mask
from speechlab.nn.position import RelativePositionBias, relative_position_buckets
from speechlab.nn.transformer import FeedForward, TransformerEncoder

BASE_CONV = SSLEncoderConfig().conv_layers


def small_config(**overrides) -> SSLEncoderConfig:
    """A fast config: 7 convs x 32 channels (320-sample hop), 2 layers x 64, 4 heads, no dropout."""
    values = dict(
        conv_layers=[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        ffn_size=128,
        pos_conv_kernel=16,
        pos_conv_groups=4,
        relative_position_bias=True,
        dropout=0.0,
        attention_dropout=0.0,
        feature_dropout=0.0,
        layerdrop=0.0,
    )
    values.update(overrides)
    return SSLEncoderConfig(**values)


# ---------------------------------------------------------------- relative position buckets (WavLM §III-A, T5 §2.1 buckets)

BUCKET_VECTORS = {
    0: 0, -1: 1, -79: 79, -80: 80, -81: 80, -100: 87, -160: 104, -200: 111, -400: 135, -799: 159, -5000: 159,
    1: 161, 79: 239, 80: 240, 100: 247, 200: 271, 400: 295, 800: 319,
}  # fmt: skip


def test_relative_position_buckets_match_reference_test_vectors():
    distances = torch.tensor(list(BUCKET_VECTORS))
    buckets = relative_position_buckets(distances, num_buckets=320, max_distance=800)
    assert buckets.tolist() == list(BUCKET_VECTORS.values())


def test_wrong_max_distance_changes_buckets():
    buckets = relative_position_buckets(torch.tensor([-100, -800]), num_buckets=320, max_distance=1280)
    assert buckets.tolist() == [86, 146]


def test_bucket_160_is_never_produced_and_range_is_valid():
    buckets = relative_position_buckets(torch.arange(-3000, 3001))
    assert int(buckets.min()) == 0 and int(buckets.max()) == 319
    assert not bool((buckets == 160).any())


def test_relative_position_bias_indexes_table_by_key_minus_query():
    torch.manual_seed(0)
    module = RelativePositionBias(num_heads=3)
    bias = module(7)
    assert bias.shape == (3, 7, 7)
    for i, j in [(0, 0), (2, 5), (6, 1), (3, 3)]:
        bucket = relative_position_buckets(torch.tensor(j - i))
        torch.testing.assert_close(bias[:, i, j], module.embedding.weight[bucket])
    assert module(7) is not bias  # fresh tensor each call (the index, not the result, is cached)


# ---------------------------------------------------------------- conv feature encoder (wav2vec 2.0 §2, §4.2)


def test_position_bias_cached_during_inference_mode_still_trains():
    """Lightning validates under torch.inference_mode: the (T, T) index cached then must not be an inference
    tensor, or the next training step of the same length fails to save it for backward."""
    bias = RelativePositionBias(num_heads=2, num_buckets=32, max_distance=20)
    with torch.inference_mode():
        bias(7)
        bias.distance_bias(7)
    (bias(7).sum() + bias.distance_bias(7).sum()).backward()
    assert bias.embedding.weight.grad is not None


def test_conv_output_lengths_follow_the_conv_formula():
    lengths = torch.tensor([399, 400, 16000, 32000, 48000])
    assert conv_output_lengths(lengths, BASE_CONV).tolist() == [0, 1, 49, 99, 149]


def test_frame_lengths_equal_actual_cnn_output_width():
    model = SSLEncoder(small_config()).eval()
    for samples in (400, 719, 720, 4321, 16000):
        out = model(torch.randn(1, samples))
        assert out.last_hidden_state.shape[1] == int(model.frame_lengths(torch.tensor([samples]))[0])


def test_audio_shorter_than_receptive_field_is_a_clear_error():
    model = SSLEncoder(small_config()).eval()
    with pytest.raises(ValueError, match="too short"):
        model(torch.randn(1, 399))


# ---------------------------------------------------------------- gate and attention (docs/pitfalls.md, 5)


def test_gate_lies_between_one_and_two_at_init():
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(64, 4, gated_relative_bias=True)
    gate = attention.gate(torch.randn(3, 20, 64))
    assert gate.shape == (3, 4, 20, 1)
    assert bool((gate > 1).all()) and bool((gate < 2).all())
    assert gate.std() > 0.01  # input-dependent, not a constant
    extreme = attention.gate(torch.randn(3, 20, 64) * 100)  # saturated sigmoids reach the closed bounds only
    assert bool((extreme >= 1).all()) and bool((extreme <= 2).all())


def test_attention_matches_explicit_softmax_with_gated_bias_and_padding():
    torch.manual_seed(0)
    dim, heads, length = 32, 4, 9
    attention = MultiHeadSelfAttention(dim, heads, gated_relative_bias=True).eval()
    with torch.no_grad():
        attention.gate_const.uniform_(-1.0, 2.0)
        attention.gate_proj.weight.normal_()
    x = torch.randn(2, length, dim)
    padding = torch.zeros(2, length, dtype=torch.bool)
    padding[1, 6:] = True
    table = RelativePositionBias(heads)
    bias = table(length)
    got = attention(x, padding, bias)

    # Reference written directly from the released gate formula (explicit softmax; fine at this size).
    hd = dim // heads

    def split(t):
        return t.view(2, length, heads, hd).transpose(1, 2)

    q, k, v = split(attention.q_proj(x)), split(attention.k_proj(x)), split(attention.v_proj(x))
    u = attention.gate_proj(x.view(2, length, heads, hd)).view(2, length, heads, 2, 4).sum(-1)
    a, b = torch.sigmoid(u).permute(0, 2, 1, 3).unbind(-1)
    gate = a * (b * attention.gate_const.view(1, heads, 1) - 1) + 2
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd) + gate[..., None] * bias
    logits = logits.masked_fill(padding[:, None, None, :], float("-inf"))
    expected = attention.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, length, dim))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- transformer / layerdrop


def test_layerdrop_never_drops_layer_zero():
    encoder = TransformerEncoder(dim=32, num_layers=4, num_heads=4, ffn_size=64, layerdrop=1.0).train()
    for _ in range(20):
        assert encoder.layers_to_run().tolist() == [True, False, False, False]
    encoder.eval()
    assert encoder.layers_to_run().all()


def test_layerdrop_keeps_hidden_state_count_and_still_applies_relative_bias():
    config = small_config(num_layers=3, layerdrop=1.0)
    model = SSLEncoder(config).train()
    out = model(torch.randn(2, 8000), output_hidden_states=True)
    assert len(out.hidden_states) == 4
    torch.testing.assert_close(out.hidden_states[2], out.hidden_states[1])  # layer 1 skipped
    assert not torch.equal(out.hidden_states[1], out.hidden_states[0])  # layer 0 ran


def test_hidden_states_are_num_layers_plus_one_and_post_ln_last_equals_last_hidden_state():
    model = SSLEncoder(small_config(num_layers=3)).eval()
    out = model(torch.randn(2, 6000), output_hidden_states=True)
    assert len(out.hidden_states) == 4
    assert out.hidden_states[-1] is out.last_hidden_state
    assert model(torch.randn(2, 6000)).hidden_states is None


def test_pre_ln_last_hidden_state_is_final_layer_norm_of_last_hidden_state_entry():
    model = SSLEncoder(small_config(layer_norm_first=True, conv_norm="layer")).eval()
    out = model(torch.randn(2, 6000), output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, model.encoder.layer_norm(out.hidden_states[-1]))


# ---------------------------------------------------------------- padding behaviour (docs/pitfalls.md, 1)


def _padded_vs_alone(config: SSLEncoderConfig) -> float:
    torch.manual_seed(0)
    model = SSLEncoder(config).eval()
    short, long = torch.randn(9000) * 0.1, torch.randn(16000) * 0.1
    batch = torch.zeros(2, 16000)
    batch[0, :9000], batch[1] = short, long
    with torch.no_grad():
        padded = model(batch, torch.tensor([9000, 16000]), output_hidden_states=True)
        alone = model(short[None], output_hidden_states=True)
    frames = int(padded.frame_lengths[0])
    assert frames == alone.last_hidden_state.shape[1]
    assert padded.padding_mask[0, frames:].all() and not padded.padding_mask[0, :frames].any()
    diffs = [
        (p[0, :frames] - a[0]).abs().max().item()
        for p, a in zip(padded.hidden_states, alone.hidden_states, strict=True)
    ]
    diffs.append((padded.last_hidden_state[0, :frames] - alone.last_hidden_state[0]).abs().max().item())
    return max(diffs)


def test_padded_frames_do_not_change_hidden_states_with_layer_norm_cnn():
    config = small_config(conv_norm="layer", layer_norm_first=True, normalize_waveform=True)
    assert _padded_vs_alone(config) <= 1e-5


def test_skip_padding_changes_only_padded_frames():
    torch.manual_seed(0)
    model = SSLEncoder(small_config(num_layers=3)).eval()
    audio = torch.randn(3, 12000) * 0.1
    lengths = torch.tensor([12000, 7000, 4000])
    with torch.no_grad():
        fast = model(audio, lengths, output_hidden_states=True)
        model.encoder.skip_padding = False
        slow = model(audio, lengths, output_hidden_states=True)
    valid = ~fast.padding_mask
    for a, b in zip(fast.hidden_states, slow.hidden_states, strict=True):
        torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=1e-5)
        assert bool((a[~valid] == 0).all())
    assert fast.hidden_states[-1] is fast.last_hidden_state


def test_skip_padding_training_step_gives_the_same_gradients():
    grads = []
    for skip in (True, False):
        torch.manual_seed(0)
        model = SSLEncoder(small_config(skip_padding=skip)).train()
        out = model(torch.randn(2, 9000), torch.tensor([9000, 5000]))
        out.last_hidden_state[~out.padding_mask].square().mean().backward()
        grads.append(model.encoder.layers[0].attention.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_group_norm_cnn_is_padding_sensitive_as_documented():
    # GroupNorm in conv block 0 normalises over the padded time axis: padded != alone (docs/pitfalls.md, 1).
    assert _padded_vs_alone(small_config(conv_norm="group")) > 1e-2


def test_normalize_waveform_uses_valid_samples_only():
    audio = torch.zeros(2, 100)
    audio[0, :60] = torch.randn(60) * 3 + 1
    audio[1] = torch.randn(100)
    out = normalize_waveform(audio, torch.tensor([60, 100]))
    assert abs(out[0, :60].mean().item()) < 1e-5 and abs(out[0, :60].var(unbiased=False).item() - 1) < 1e-3
    assert bool((out[0, 60:] == 0).all())
    torch.testing.assert_close(out[0, :60], normalize_waveform(audio[:1, :60])[0])


# ---------------------------------------------------------------- masking (wav2vec 2.0 §3.1)


def test_span_mask_is_deterministic_with_a_generator():
    lengths = torch.tensor([200, 150, 90])
    first = span_mask(lengths, 0.65, 10, generator=torch.Generator().manual_seed(3))
    second = span_mask(lengths, 0.65, 10, generator=torch.Generator().manual_seed(3))
    other = span_mask(lengths, 0.65, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_span_mask_never_masks_padding_and_equalizes_counts():
    lengths = torch.tensor([200, 150, 90, 12])
    mask = span_mask(lengths, 0.65, 10, generator=torch.Generator().manual_seed(0), num_frames=210)
    assert mask.shape == (4, 210)
    assert not bool((mask & (torch.arange(210)[None] >= lengths[:, None])).any())
    counts = mask.sum(-1)
    assert bool((counts == counts[0]).all()) and int(counts[0]) > 0


def test_span_mask_fraction_and_min_masks():
    gen = torch.Generator().manual_seed(0)
    mask = span_mask((64, 500), 0.65, 10, generator=gen, equalize=False)
    expected = 1 - (1 - 0.065) ** 10
    assert abs(mask.float().mean().item() - expected) < 0.03
    # min_masks forces spans even at mask_prob ~ 0: at least one 10-frame span per row.
    few = span_mask((8, 300), 1e-6, 10, min_masks=2, generator=gen, equalize=False)
    assert bool((few.sum(-1) >= 10).all()) and bool((few.sum(-1) <= 20).all())


def test_span_mask_spans_are_mask_length_runs():
    mask = span_mask((1, 400), 0.01, 10, min_masks=1, generator=torch.Generator().manual_seed(1))
    idx = mask[0].nonzero().flatten()
    assert idx.numel() == 10 and int(idx[-1] - idx[0]) == 9


# ---------------------------------------------------------------- SSLEncoder features


def test_frame_mask_replaces_frames_with_mask_embedding_and_keeps_features_unmasked():
    torch.manual_seed(0)
    model = SSLEncoder(small_config()).eval()
    audio = torch.randn(2, 8000)
    plain = model(audio)
    frame_mask = torch.zeros_like(plain.padding_mask)
    frame_mask[:, 5:10] = True
    masked = model(audio, frame_mask=frame_mask)
    torch.testing.assert_close(masked.features, plain.features)
    assert (masked.last_hidden_state - plain.last_hidden_state).abs().max() > 1e-3
    # An all-False mask is a no-op.
    torch.testing.assert_close(model(audio, frame_mask=torch.zeros_like(frame_mask)).last_hidden_state,
                               plain.last_hidden_state)  # fmt: skip


def test_feature_grad_mult_scales_cnn_gradients():
    grads = {}
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        model = SSLEncoder(small_config(feature_grad_mult=mult)).train()
        out = model(torch.randn(2, 6000))
        (out.last_hidden_state.square().mean() + 0 * out.feature_penalty).backward()
        grads[mult] = model.feature_encoder.conv_layers[0].conv.weight.grad.clone()
    torch.testing.assert_close(grads[0.1], grads[1.0] * 0.1, rtol=1e-4, atol=1e-8)


def test_feature_grad_mult_zero_freezes_cnn():
    model = SSLEncoder(small_config(feature_grad_mult=0.0)).train()
    model(torch.randn(2, 6000)).last_hidden_state.sum().backward()
    assert model.feature_encoder.conv_layers[0].conv.weight.grad is None
    assert model.feature_projection.weight.grad is not None


def test_bf16_autocast_is_close_and_same_under_inference_mode_and_no_grad():
    torch.manual_seed(0)
    model = SSLEncoder(small_config()).eval()
    audio = torch.randn(2, 8000) * 0.1
    lengths = torch.tensor([8000, 6000])
    with torch.no_grad():
        fp32 = model(audio, lengths).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(audio, lengths).last_hidden_state
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_inf = model(audio, lengths).last_hidden_state
    torch.testing.assert_close(bf16_inf.float(), bf16.float())
    assert (bf16.float() - fp32).abs().max() < 0.25


def test_presets_have_the_reference_parameter_counts():
    # transformers WavLMModel / HubertModel parameter counts (measured on the transformers classes).
    def count(config):
        with torch.device("meta"):
            return sum(p.numel() for p in SSLEncoder(config).parameters())

    assert count(wavlm_base()) == 94_381_936
    assert count(wavlm_base_plus()) == 94_381_936
    assert count(wavlm_large()) == 315_453_120
    assert count(hubert_base()) == 94_371_712
    assert count(wav2vec2_base()) == 94_371_712
    assert wavlm_large().normalize_waveform and not wavlm_base().normalize_waveform
    assert count(tiny_encoder()) < count(wavlm_tiny()) < 2_000_000


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_fused_gelu_conv_training_path_matches_plain_block_chain(norm):
    torch.manual_seed(0)
    encoder = ConvFeatureEncoder([(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2, norm, bias=True)
    audio = torch.randn(2, 4000, requires_grad=True)
    encoder(audio).square().sum().backward()
    fused = [p.grad.clone() for p in encoder.parameters()] + [audio.grad.clone()]
    encoder.zero_grad()
    audio.grad = None
    x = audio.unsqueeze(1)
    for block in encoder.conv_layers:
        x = block(x)
    x.square().sum().backward()
    plain = [p.grad for p in encoder.parameters()] + [audio.grad]
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_gelu_linear_feed_forward_matches_plain_gradients():
    torch.manual_seed(0)
    ffn = FeedForward(16, 32, dropout=0.0, activation_dropout=0.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ffn(x).square().sum().backward()
    fused = [p.grad.clone() for p in ffn.parameters()] + [x.grad.clone()]
    ffn.zero_grad()
    x.grad = None
    ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x))).square().sum().backward()
    for a, b in zip(fused, [p.grad for p in ffn.parameters()] + [x.grad], strict=True):
        torch.testing.assert_close(a, b)
