"""UniSpeech model: the swap, eval determinism, padding, and parity with transformers' UniSpeech."""

import pytest
import torch
from transformers import UniSpeechConfig as HFUniSpeechConfig
from transformers import UniSpeechForPreTraining, UniSpeechModel

from speechlab.checkpoints.hf_unispeech import config_from_hf, convert_state_dict, load_hf_unispeech
from speechlab.models.unispeech import (
    UniSpeech,
    UniSpeechConfig,
    unispeech_base,
    unispeech_fbank_tiny,
    unispeech_large,
    unispeech_tiny,
)


def _no_dropout(config: UniSpeechConfig) -> UniSpeechConfig:
    e = config.encoder
    e.dropout = e.attention_dropout = e.activation_dropout = e.feature_dropout = e.layerdrop = 0.0
    config.quantizer_dropout = config.final_dropout = 0.0
    return config


def _tiny(**overrides) -> UniSpeech:
    torch.manual_seed(0)
    config = _no_dropout(unispeech_tiny(num_ctc_classes=12))
    for key, value in overrides.items():
        setattr(config, key, value)
    return UniSpeech(config)


def test_swap_probability_zero_equals_plain_multitask():
    model = _tiny(swap_prob=0.0).train()
    audio = torch.randn(2, 8000)
    out = model(audio, generator=torch.Generator().manual_seed(0))
    # CTC reads the Transformer output itself: exactly ctc_proj(c), no frame swapped
    torch.testing.assert_close(out.ctc_logits, model.ctc_proj(out.last_hidden_state), rtol=0, atol=0)
    assert not out.swap_mask.any()
    # and CTC gradients never reach the quantizer (plain multitask: CTC and contrastive share only the backbone)
    model.zero_grad()
    out.ctc_logits.logsumexp(-1).sum().backward()
    assert (
        model.quantizer.weight_proj.weight.grad is None
        or model.quantizer.weight_proj.weight.grad.abs().sum() == 0
    )
    assert model.quantizer.codevectors.grad is None or model.quantizer.codevectors.grad.abs().sum() == 0
    assert model.encoder.feature_projection.weight.grad.abs().sum() > 0


def test_swap_probability_one_feeds_quantized_vectors_to_ctc_with_gradient_to_codebook():
    model = _tiny(swap_prob=1.0).train()
    out = model(torch.randn(2, 8000), generator=torch.Generator().manual_seed(0))
    assert out.swap_mask.all()
    # every frame's CTC input is a projected code vector: logits differ from the context-only logits
    assert not torch.allclose(out.ctc_logits, model.ctc_proj(out.last_hidden_state))
    out.ctc_logits.logsumexp(-1).sum().backward()
    assert model.quantizer.codevectors.grad.abs().sum() > 0
    assert model.quantizer.weight_proj.weight.grad.abs().sum() > 0  # straight-through reaches the logits


def test_swap_is_bernoulli_per_frame_and_never_touches_padding():
    model = _tiny(swap_prob=0.5).train()
    audio = torch.randn(3, 32000)
    lengths = torch.tensor([32000, 20000, 9000])
    out = model(audio, lengths, generator=torch.Generator().manual_seed(1))
    valid = ~out.padding_mask
    fraction = out.swap_mask[valid].float().mean().item()
    assert 0.35 < fraction < 0.65
    assert not out.swap_mask[out.padding_mask].any()


def test_eval_never_swaps_and_is_deterministic():
    model = _tiny(swap_prob=1.0).eval()
    audio = torch.randn(2, 8000)
    a = model(audio, generator=torch.Generator().manual_seed(0))
    b = model(audio, generator=torch.Generator().manual_seed(1))
    assert not a.swap_mask.any()
    torch.testing.assert_close(a.ctc_logits, model.ctc_proj(a.last_hidden_state), rtol=0, atol=0)
    torch.testing.assert_close(a.targets, b.targets, rtol=0, atol=0)
    torch.testing.assert_close(a.ctc_logits, b.ctc_logits, rtol=0, atol=0)


def test_padded_frames_do_not_change_outputs_of_real_frames():
    torch.manual_seed(0)
    config = _no_dropout(unispeech_tiny(num_ctc_classes=12))
    config.encoder.conv_norm = (
        "layer"  # the group-norm CNN is padding-sensitive by design (docs/pitfalls.md, 1)
    )
    model = UniSpeech(config).eval()
    audio = torch.randn(1, 12000)
    alone = model(audio)
    padded = model(torch.cat([audio, torch.zeros(1, 6000)], dim=1), torch.tensor([12000]))
    t = alone.ctc_logits.shape[1]
    assert int(padded.frame_lengths[0]) == t
    torch.testing.assert_close(padded.ctc_logits[:, :t], alone.ctc_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.targets[:, :t], alone.targets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.prob_perplexity, alone.prob_perplexity, atol=1e-5, rtol=1e-5)


def test_presets_match_the_released_recipes():
    large = unispeech_large()
    assert (large.encoder.hidden_size, large.encoder.num_layers, large.encoder.num_heads) == (1024, 24, 16)
    assert large.encoder.conv_bias and large.encoder.layer_norm_first and large.encoder.conv_norm == "layer"
    assert (large.codevector_dim, large.proj_codevector_dim, large.swap_prob) == (768, 768, 0.5)
    assert large.temperature == (2.0, 0.1, 0.999995) and large.encoder.mask_prob == 0.5
    base = unispeech_base()
    assert (base.encoder.hidden_size, base.codevector_dim) == (768, 256)
    with pytest.raises(ValueError, match="swap_prob"):
        UniSpeechConfig(swap_prob=1.5)


# ---------------------------------------------------------------------------------------------------- HF parity
def _hf_config(stable: bool) -> HFUniSpeechConfig:
    return HFUniSpeechConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 3, 2),
        conv_stride=(5, 2, 2),
        conv_bias=stable,
        feat_extract_norm="layer" if stable else "group",
        do_stable_layer_norm=stable,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_codevector_groups=2,
        num_codevectors_per_group=8,
        codevector_dim=16,
        proj_codevector_dim=12,
        num_ctc_classes=10,
        replace_prob=0.0,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.05,
    )


def _perturb(module: torch.nn.Module) -> None:
    """Move LayerNorm affines and biases off their init so a swapped key would show."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))


@pytest.mark.parametrize("stable", [False, True], ids=["base_post_ln_group_norm", "large_pre_ln_layer_norm"])
def test_hidden_states_match_transformers_unispeech_model(tmp_path, stable):
    torch.manual_seed(0)
    hf = UniSpeechModel(_hf_config(stable)).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = load_hf_unispeech(tmp_path).eval()
    audio = torch.randn(2, 4000)
    lengths = torch.tensor([4000, 2800])
    mask = torch.arange(4000)[None] < lengths[:, None]
    with torch.no_grad():
        ref = hf(audio * mask, attention_mask=mask.long())
        out = ours.encoder(audio * mask, lengths if stable else None)
    if stable:  # layer-norm CNN: padding-invariant, compare valid frames with padding masks on both sides
        valid = ~out.padding_mask
        diff = (ref.last_hidden_state - out.last_hidden_state)[valid].abs().max()
    else:  # group-norm CNN: HF ignores the sample mask in the CNN; compare the unpadded path
        with torch.no_grad():
            ref = hf(audio)
            out = ours.encoder(audio)
        diff = (ref.last_hidden_state - out.last_hidden_state).abs().max()
        torch.testing.assert_close(out.features, ref.extract_features, atol=1e-5, rtol=0)
    assert diff <= 1e-4, f"max abs diff {diff}"


@pytest.mark.parametrize("stable", [False, True], ids=["base", "large"])
def test_pretraining_heads_match_transformers_unispeech_for_pretraining(tmp_path, stable):
    torch.manual_seed(1)
    hf = UniSpeechForPreTraining(_hf_config(stable)).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path)
    ours = load_hf_unispeech(tmp_path, require_heads=True).eval()
    assert ours.config.swap_prob == 0.0 and ours.config.proj_codevector_dim == 12
    audio = torch.randn(2, 4000)
    with torch.no_grad():
        ref = hf(audio)  # eval: argmax codevectors; replace_prob=0 -> CTC on the Transformer output
        out = ours(audio)
        ref_ctc = hf.ctc_proj(ref.projected_states)
    # quantized targets (argmax codevectors -> project_q -> project_hid) and Transformer outputs
    assert (ref.projected_quantized_states - out.targets).abs().max() <= 1e-4
    assert (ref.projected_states - out.last_hidden_state).abs().max() <= 1e-4
    assert (ref_ctc - out.ctc_logits).abs().max() <= 1e-4
    # raw code vectors (before project_q) of the argmax quantizer
    with torch.no_grad():
        hf_codes, _ = hf.quantizer(hf.unispeech(audio).extract_features)
        our_codes = ours.quantizer(ours.encoder(audio).features).codevectors
    assert (hf_codes - our_codes).abs().max() <= 1e-4
    # HF's eval perplexity is computed from hard assignments = our code perplexity
    torch.testing.assert_close(out.code_perplexity, ref.codevector_perplexity, atol=1e-4, rtol=0)


def test_config_from_hf_maps_every_architecture_field():
    hf = _hf_config(True).to_dict()
    ours = config_from_hf(hf)
    assert ours.encoder.conv_layers == [(32, 10, 5), (32, 3, 2), (32, 2, 2)]
    assert ours.encoder.layer_norm_first and ours.encoder.conv_bias and ours.encoder.conv_norm == "layer"
    assert (ours.num_codevector_groups, ours.num_codevectors_per_group, ours.codevector_dim) == (2, 8, 16)
    assert ours.num_ctc_classes == 10


def test_weight_norm_old_spelling_is_mapped(tmp_path):
    torch.manual_seed(0)
    hf = UniSpeechForPreTraining(_hf_config(True)).eval()
    state = dict(hf.state_dict())
    g = state.pop("unispeech.encoder.pos_conv_embed.conv.parametrizations.weight.original0")
    v = state.pop("unispeech.encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    state["unispeech.encoder.pos_conv_embed.conv.weight_g"] = g
    state["unispeech.encoder.pos_conv_embed.conv.weight_v"] = v
    converted = convert_state_dict(state, config_from_hf(_hf_config(True).to_dict()))
    assert torch.equal(converted["encoder.encoder.pos_conv.conv.parametrizations.weight.original0"], g)
    assert torch.equal(converted["encoder.encoder.pos_conv.conv.parametrizations.weight.original1"], v)


# ------------------------------------------------------------------------------ the fbank + Conformer backbone


def _fbank(**overrides) -> UniSpeech:
    torch.manual_seed(0)
    config = unispeech_fbank_tiny(num_ctc_classes=12)
    config.encoder.dropout = config.encoder.feature_dropout = 0.0
    config.quantizer_dropout = config.final_dropout = 0.0
    for key, value in overrides.items():
        setattr(config, key, value)
    return UniSpeech(config)


def test_fbank_variant_quantizes_the_unmasked_subsampled_features_and_gives_25_hz_outputs():
    model = _fbank(swap_prob=0.5).train()
    audio, lengths = torch.randn(2, 16000), torch.tensor([16000, 11000])
    frames = model.encoder.frame_lengths(lengths)
    assert frames.tolist() == [25, 17]  # 98 / 67 fbank frames -> two stride-2 convolutions
    frame_mask = torch.zeros(2, 25, dtype=torch.bool)
    frame_mask[:, 3:8] = True
    out = model(audio, lengths, frame_mask=frame_mask, generator=torch.Generator().manual_seed(0))
    hidden = model.config.encoder.hidden_size
    assert out.last_hidden_state.shape == (2, 25, hidden) and out.targets.shape == (2, 25, hidden)
    assert out.ctc_logits.shape == (2, 25, 12) and out.codevector_indices.shape == (2, 25, 2)
    assert out.frame_lengths.tolist() == [25, 17] and out.padding_mask[1, 17:].all()
    assert not out.swap_mask[out.padding_mask].any() and out.swap_mask.any()
    # the quantizer's input is the encoder's unmasked features: masking changes the context, not the targets
    model.eval()
    masked = model(audio, lengths, frame_mask=frame_mask)
    unmasked = model(audio, lengths)
    torch.testing.assert_close(masked.targets, unmasked.targets, rtol=0, atol=0)
    assert not torch.allclose(masked.last_hidden_state[:, 3:8], unmasked.last_hidden_state[:, 3:8])


def test_fbank_variant_swap_probability_zero_equals_plain_multitask():
    model = _fbank(swap_prob=0.0).train()
    out = model(torch.randn(2, 16000), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.ctc_logits, model.ctc_proj(out.last_hidden_state), rtol=0, atol=0)
    assert not out.swap_mask.any()
    model.zero_grad()
    out.ctc_logits.logsumexp(-1).sum().backward()
    assert model.quantizer.codevectors.grad is None or model.quantizer.codevectors.grad.abs().sum() == 0
    assert model.encoder.feature_projection.weight.grad.abs().sum() > 0


def test_fbank_variant_swap_one_trains_the_codebook_through_ctc():
    model = _fbank(swap_prob=1.0).train()
    out = model(torch.randn(2, 16000), generator=torch.Generator().manual_seed(0))
    assert out.swap_mask.all()
    out.ctc_logits.logsumexp(-1).sum().backward()
    assert model.quantizer.codevectors.grad.abs().sum() > 0
    assert model.quantizer.weight_proj.weight.grad.abs().sum() > 0


def test_fbank_variant_padding_does_not_change_targets_of_real_frames():
    """Promised by the fbank front end (each utterance's fbank alone, padded frames zeroed after each subsampling
    convolution): the quantizer's input, hence targets and code indices, are padding-invariant. The context is
    not promised: the Conformer's depthwise convolutions read padded frames (4 layers x kernel 15 span the whole
    utterance here), see speechlab/models/fbank_conformer.py."""
    model = _fbank().eval()
    audio = torch.randn(1, 16000)
    alone = model(audio)
    longer = torch.randn(1, 24000)  # a batch as the collate pads it: to its longest utterance
    padded = model(
        torch.cat([torch.cat([audio, torch.zeros(1, 8000)], dim=1), longer]), torch.tensor([16000, 24000])
    )
    padded = type(padded)(
        **{k: v[:1] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in padded.__dict__.items()}
    )
    t = alone.targets.shape[1]
    assert int(padded.frame_lengths[0]) == t
    torch.testing.assert_close(padded.targets[:, :t], alone.targets, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded.codevector_indices[:, :t], alone.codevector_indices)


def test_fbank_variant_round_trips_through_a_pretrained_directory(tmp_path):
    from speechlab.api import load
    from speechlab.checkpoints.pretrained_dir import save_pretrained
    from speechlab.models.fbank_conformer import FbankConformerEncoder

    model = _fbank().eval()
    save_pretrained(model, tmp_path / "us", family="unispeech")
    again = load(tmp_path / "us").eval()
    assert isinstance(again, UniSpeech) and isinstance(again.encoder, FbankConformerEncoder)
    audio = torch.randn(1, 12000)
    torch.testing.assert_close(again(audio).ctc_logits, model(audio).ctc_logits)


def test_hf_unispeech_weights_cannot_initialise_the_fbank_backbone_and_say_so():
    from speechlab.checkpoints.safe_load import CheckpointError

    with pytest.raises(CheckpointError, match="wav2vec 2.0 backbone.*unispeech_fbank_tiny"):
        convert_state_dict({}, unispeech_fbank_tiny())


def test_target_grad_mult_zero_keeps_quantizer_gradients_out_of_the_features():
    model = _fbank(swap_prob=0.0, target_grad_mult=0.0).train()
    out = model(torch.randn(2, 16000), generator=torch.Generator().manual_seed(0))
    out.targets.sum().backward()
    assert model.quantizer.weight_proj.weight.grad.abs().sum() > 0
    grad = model.encoder.feature_encoder[0].weight.grad
    assert grad is None or grad.abs().sum() == 0
