"""The one Transformer layer (speechlab.nn.transformer.TransformerLayer) as the codec's latent Transformer.

The codec's layers were a second Transformer with its own tensor names (``norm1``, ``qkv``, ``out``, ``norm2``,
``mlp.0`` / ``mlp.2``, ``scale1`` / ``scale2``). Codec files written then must load and compute the same: a reference
copy of that layer, run on an old-layout state dict, is the definition here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from speechlab.checkpoints.pretrained_dir import load_pretrained, save_pretrained
from speechlab.models.codec import Codec, codec_tiny
from speechlab.nn import fused
from speechlab.nn.attention import MultiHeadSelfAttention
from speechlab.nn.seanet import LatentTransformer
from speechlab.nn.transformer import TransformerLayer
from speechlab.optim import OptimConfig, build_optimizer

OLD_LAYER_KEYS = {
    "scale1": lambda d, f: (d,),
    "scale2": lambda d, f: (d,),
    "norm1.weight": lambda d, f: (d,),
    "norm1.bias": lambda d, f: (d,),
    "qkv.weight": lambda d, f: (3 * d, d),
    "out.weight": lambda d, f: (d, d),
    "norm2.weight": lambda d, f: (d,),
    "norm2.bias": lambda d, f: (d,),
    "mlp.0.weight": lambda d, f: (f, d),
    "mlp.0.bias": lambda d, f: (f,),
    "mlp.2.weight": lambda d, f: (d, f),
    "mlp.2.bias": lambda d, f: (d,),
}


def _old_layout_state(num_layers: int, dim: int, ffn: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"layers.{i}.{name}": torch.randn(shape(dim, ffn), generator=generator) * 0.3
        for i in range(num_layers)
        for name, shape in OLD_LAYER_KEYS.items()
    }


def _reference_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * inv_freq[None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], dim=-1)


def _reference_codec_transformer(
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    heads: int,
    causal: bool,
    context: int,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """The pre-refactor codec Transformer, written out on its own tensor names: (B, D, T) -> (B, D, T)."""
    b, d, t = x.shape
    positions = torch.arange(t)
    distance = positions[:, None] - positions[None, :]
    allowed = ((distance >= 0) & (distance < context)) if causal else torch.ones(t, t, dtype=torch.bool)
    allowed = allowed[None, None] & (positions[None, :] < lengths[:, None])[:, None, None, :]
    h = x.transpose(1, 2)
    num_layers = len({key.split(".")[1] for key in state})
    for i in range(num_layers):
        w = {name: state[f"layers.{i}.{name}"] for name in OLD_LAYER_KEYS}
        normed = F.layer_norm(h, (d,), w["norm1.weight"], w["norm1.bias"])
        q, k, v = (normed @ w["qkv.weight"].t()).view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k = _reference_rope(q, positions), _reference_rope(k, positions)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + w["scale1"] * (attn.transpose(1, 2).reshape(b, t, d) @ w["out.weight"].t())
        normed = F.layer_norm(h, (d,), w["norm2.weight"], w["norm2.bias"])
        mlp = F.linear(
            F.gelu(F.linear(normed, w["mlp.0.weight"], w["mlp.0.bias"])), w["mlp.2.weight"], w["mlp.2.bias"]
        )
        h = h + w["scale2"] * mlp
    return h.transpose(1, 2) * (positions[None, :] < lengths[:, None])[:, None, :]


@pytest.mark.parametrize("causal", [False, True])
def test_an_old_layout_codec_transformer_state_dict_loads_and_computes_what_the_old_layer_did(causal):
    dim, heads, ffn, context = 16, 2, 24, 5
    state = _old_layout_state(2, dim, ffn)
    transformer = LatentTransformer(dim, 2, heads, ffn, causal, context).eval()
    transformer.load_state_dict(state, strict=True)
    x = torch.randn(3, dim, 11)
    lengths = torch.tensor([11, 8, 3])
    expected = _reference_codec_transformer(state, x, heads, causal, context, lengths)
    with torch.no_grad():
        assert (transformer(x, lengths) - expected).abs().max() < 1e-5


def test_the_codec_transformer_writes_the_saved_tensor_names_and_reads_the_shared_layers_too():
    transformer = LatentTransformer(16, 2, 2, 24, causal=True)
    assert set(transformer.state_dict()) == {
        f"layers.{i}.{name}" for i in range(2) for name in OLD_LAYER_KEYS
    }
    by_module_name = {name: p.detach() + 1.0 for name, p in transformer.named_parameters()}
    assert "layers.0.attention.qkv_proj.weight" in by_module_name
    fresh = LatentTransformer(16, 2, 2, 24, causal=True)
    fresh.load_state_dict(by_module_name, strict=True)
    assert all(torch.equal(p, by_module_name[name]) for name, p in fresh.named_parameters())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**transformer.state_dict(), "layers.0.extra": torch.zeros(1)}, strict=True)


def test_the_codec_transformer_parameters_come_in_the_saved_order_so_old_runs_resume():
    # AdamW's saved state is matched to the parameters by position: a run saved before the codec used the shared
    # layer resumes only if the parameters come in that layer's order (OLD_LAYER_KEYS), norm2 before the MLP.
    dim, ffn = 16, 24
    transformer = LatentTransformer(dim, 2, 2, ffn, causal=False)
    saved_order = [f"layers.{i}.{name}" for i in range(2) for name in OLD_LAYER_KEYS]
    assert list(transformer.state_dict()) == saved_order
    saved_name = {p.data_ptr(): name for name, p in transformer.state_dict().items()}
    assert [saved_name[p.data_ptr()] for p in transformer.parameters()] == saved_order

    # an optimiser state written in the saved order (what a pre-refactor run holds) resumes and steps
    old_run = LatentTransformer(dim, 2, 2, ffn, causal=False)
    old_run.load_state_dict(transformer.state_dict())
    by_saved_name = dict(zip(saved_order, old_run.parameters(), strict=True))
    config = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0, decay="constant")
    old_optimizer = build_optimizer(
        [(name, by_saved_name[name]) for name in saved_order], config, total_steps=2, fused=False
    )["optimizer"]
    x = torch.randn(2, dim, 7)
    old_run(x).square().mean().backward()
    old_optimizer.step()
    transformer.load_state_dict(old_run.state_dict())
    optimizer = build_optimizer(transformer.named_parameters(), config, total_steps=2, fused=False)[
        "optimizer"
    ]
    optimizer.load_state_dict(old_optimizer.state_dict())
    for p in transformer.parameters():
        assert optimizer.state[p]["exp_avg"].shape == p.shape
    transformer(x).square().mean().backward()
    optimizer.step()


def test_a_saved_codec_directory_keeps_the_codec_transformer_tensor_names(tmp_path):
    torch.manual_seed(0)
    codec = Codec(codec_tiny()).eval()
    save_pretrained(codec, tmp_path, family="codec")
    names = set(load_file(str(next(tmp_path.glob("*.safetensors")))))
    assert {"encoder_transformer.layers.0.qkv.weight", "decoder_transformer.layers.0.mlp.2.bias"} <= names
    assert not any("qkv_proj" in name or "feed_forward" in name for name in names)
    audio = torch.randn(2, 3200) * 0.1
    loaded = load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.encode(audio)[0], codec.encode(audio)[0])


def test_the_ssl_layer_keeps_its_tensor_names_and_has_no_layer_scale():
    layer = TransformerLayer(16, 2, 32, gated_relative_bias=True)
    assert set(layer.state_dict()) == {
        *(f"attention.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")),
        "attention.out_proj.weight", "attention.out_proj.bias",
        "attention.gate_proj.weight", "attention.gate_proj.bias", "attention.gate_const",
        "attention_norm.weight", "attention_norm.bias", "ffn_norm.weight", "ffn_norm.bias",
        "feed_forward.fc1.weight", "feed_forward.fc1.bias", "feed_forward.fc2.weight", "feed_forward.fc2.bias",
    }  # fmt: skip


def test_layer_scale_is_refused_on_a_post_ln_layer():
    with pytest.raises(ValueError, match="layer_norm_first"):
        TransformerLayer(16, 2, 32, layer_norm_first=False, layer_scale=0.1)


def test_codec_transformer_padded_frames_do_not_change_the_valid_ones():
    torch.manual_seed(0)
    transformer = LatentTransformer(16, 2, 2, 24, causal=False).eval()
    x = torch.randn(1, 16, 9)
    padded = torch.cat([x, torch.randn(1, 16, 4) * 100], dim=-1)
    with torch.no_grad():
        alone = transformer(x)
        in_batch = transformer(padded, torch.tensor([9]))
    assert (in_batch[..., :9] - alone).abs().max() < 1e-5
    assert torch.equal(in_batch[..., 9:], torch.zeros(1, 16, 4))


def test_codec_transformer_training_step_is_the_same_with_and_without_fused_kernels():
    torch.manual_seed(0)
    transformer = LatentTransformer(16, 2, 2, 24, causal=True).train()
    x = torch.randn(2, 16, 10, requires_grad=True)
    grads = []
    for use_fused in (True, False):
        transformer.zero_grad(set_to_none=True)
        with fused.use(use_fused):
            transformer(x, torch.tensor([10, 6])).square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in transformer.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        assert (grads[0][name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-7, name


def test_rope_attention_depends_only_on_the_distance_between_frames():
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(16, 2, rotary=True, bias=False, init_std=None).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        from_zero = attention(x)
        from_forty = attention(x, positions=torch.arange(40, 47))
        unrotated = MultiHeadSelfAttention(16, 2, bias=False, init_std=None).eval()
        unrotated.load_state_dict(attention.state_dict())
        plain = unrotated(x)
    assert (from_zero - from_forty).abs().max() < 1e-5
    assert (from_zero - plain).abs().max() > 1e-3
