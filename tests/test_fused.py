"""speechlab.nn.fused: each fused / recomputing kernel equals its plain block, in values and gradients.

The plain blocks (``with fused.use(False)``) are the definition; fp32 to float rounding, bf16 autocast (CPU) to bf16
rounding, where both sides run the same bf16 ops.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speechlab.models.ssl_encoder import SSLEncoder
from speechlab.models.wavlm import wavlm_tiny
from speechlab.nn import fused
from speechlab.nn.attention import MultiHeadSelfAttention
from speechlab.nn.feature_encoder import ConvFeatureEncoder
from speechlab.nn.position import RelativePositionBias
from speechlab.nn.transformer import FeedForward

TOLERANCE = {False: 1e-5, True: 2e-2}  # relative, fp32 / bf16 autocast


def _run(module: torch.nn.Module, inputs: torch.Tensor, forward, bf16: bool, use_fused: bool):
    """(output, gradients) of a fixed random projection of ``forward(inputs)`` (an fp32 loss, as the tasks compute),
    with the fused kernels on or off."""
    module.zero_grad(set_to_none=True)
    inputs = inputs.detach().requires_grad_(True)
    with fused.use(use_fused), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward(inputs)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * target).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    grads["<input>"] = inputs.grad.detach().clone()
    return out.detach(), grads


def _assert_close(a: torch.Tensor, b: torch.Tensor, tolerance: float, name: str) -> None:
    assert a.dtype == b.dtype, name
    assert (a.float() - b.float()).norm() <= tolerance * b.float().norm() + 1e-12, name


def _inference_outputs(forward, bf16: bool) -> tuple:
    """``forward()`` under ``inference_mode`` (and CPU bf16 autocast when ``bf16``), fused kernels on, then off."""
    outputs = []
    for use_fused in (True, False):
        with (
            fused.use(use_fused),
            torch.inference_mode(),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            outputs.append(forward())
    return outputs[0], outputs[1]


def _assert_fused_equals_plain(module, inputs, forward, bf16: bool) -> None:
    out_fused, grads_fused = _run(module, inputs, forward, bf16, use_fused=True)
    out_plain, grads_plain = _run(module, inputs, forward, bf16, use_fused=False)
    _assert_close(out_fused, out_plain, TOLERANCE[bf16], "<output>")
    assert grads_fused.keys() == grads_plain.keys() and len(grads_plain) > 1
    for name, grad in grads_plain.items():
        assert grads_fused[name].dtype == torch.float32, name
        _assert_close(grads_fused[name], grad, TOLERANCE[bf16], name)


def test_fused_kernels_are_on_by_default_and_use_restores_the_setting():
    assert fused.enabled()
    with fused.use(False):
        assert not fused.enabled()
        with fused.use(True):
            assert fused.enabled()
        assert not fused.enabled()
    assert fused.enabled()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("norm,bias", [("group", False), ("layer", True)])
def test_recomputing_conv_feature_encoder_equals_the_chain_of_conv_blocks(norm, bias, bf16):
    torch.manual_seed(0)
    module = ConvFeatureEncoder(wavlm_tiny().conv_layers, norm=norm, bias=bias)
    _assert_fused_equals_plain(module, torch.randn(2, 8000) * 0.1, module, bf16)


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``out``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_the_fused_conv_chain_runs_in_training_and_the_plain_one_when_switched_off():
    module = ConvFeatureEncoder(wavlm_tiny().conv_layers, norm="layer")
    audio = torch.randn(1, 4000)
    assert any("NormGeluConv1d" in name for name in _graph_nodes(module(audio)))
    with fused.use(False):
        assert not any("NormGeluConv1d" in name for name in _graph_nodes(module(audio)))
    with torch.no_grad():
        assert module(audio).grad_fn is None


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_under_cpu_bf16_the_training_chain_runs_time_major(norm):
    """The time-major chain (tested equal to the plain blocks above) is what runs under CPU bf16 autocast: its output
    (batch, channels, frames) has channels innermost in memory, and no recomputing block is in the graph."""
    module = ConvFeatureEncoder(wavlm_tiny().conv_layers, norm=norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(torch.randn(2, 4000))
    assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
    assert not any("NormGeluConv1d" in name for name in _graph_nodes(out))
    if norm == "group":  # the plain chain (and the fp32 recomputing one) keep time innermost
        with fused.use(False), torch.autocast("cpu", dtype=torch.bfloat16):
            assert not module(torch.randn(2, 4000)).transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    "norm,bf16,fixed_statistics",
    [("group", True, False), ("group", True, True), ("layer", True, False), ("layer", False, False)],
)
def test_time_major_chain_equals_the_plain_blocks_in_inference(norm, bf16, fixed_statistics):
    """Inference (feature extraction) runs the time-major chain under CPU bf16, with the whole-file block-0
    statistics of chunked extraction as well, and for a LayerNorm CNN in fp32 too."""
    torch.manual_seed(0)
    module = ConvFeatureEncoder(wavlm_tiny().conv_layers, norm=norm).eval()
    audio = torch.randn(1, 8000) * 0.1
    statistics = module.block0_statistics(audio[0]) if fixed_statistics else None
    with fused.use(False), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert not fused.runs_time_major(audio, module.conv_layers)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        assert fused.runs_time_major(audio, module.conv_layers)
    out_fused, out_plain = _inference_outputs(lambda: module(audio, statistics), bf16)
    assert out_fused.transpose(1, 2).is_contiguous()
    _assert_close(out_fused, out_plain, TOLERANCE[bf16], "<output>")


def test_the_time_major_chain_refuses_block0_statistics_for_a_layer_norm_cnn_as_the_plain_one_does():
    module = ConvFeatureEncoder(wavlm_tiny().conv_layers, norm="layer").eval()
    statistics = (torch.zeros(128), torch.ones(128))
    for use_fused in (True, False):
        with fused.use(use_fused), torch.inference_mode(), pytest.raises(ValueError, match="GroupNorm"):
            module(torch.randn(1, 4000), statistics)


def test_fp32_training_and_a_group_norm_cnn_in_fp32_inference_keep_the_channel_major_chain():
    for norm in ("group", "layer"):
        module = ConvFeatureEncoder(wavlm_tiny().conv_layers, norm=norm)
        audio = torch.randn(1, 4000)
        assert not fused.runs_time_major(audio, module.conv_layers)  # training: the recomputing chain
        with torch.no_grad():
            assert fused.runs_time_major(audio, module.conv_layers) == (norm == "layer")


@pytest.mark.parametrize("bf16", [False, True])
def test_recomputing_gelu_linear_equals_the_plain_feed_forward(bf16):
    torch.manual_seed(0)
    ffn = FeedForward(64, 256, dropout=0.0, activation_dropout=0.0)
    _assert_fused_equals_plain(ffn, torch.randn(2, 50, 64), ffn, bf16)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_one_gemm_qkv_projection_equals_three_projections_in_inference(gated, bf16):
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(64, 4, dropout=0.0, gated_relative_bias=gated).eval()
    bias = RelativePositionBias(4, 320, 800)(30) if gated else None
    x = torch.randn(2, 30, 64)
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[1, 20:] = True
    out_fused, out_plain = _inference_outputs(lambda: attention(x, padding, bias), bf16)
    _assert_close(out_fused, out_plain, TOLERANCE[bf16], "<output>")


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("conv_norm", ["group", "layer"])
def test_whole_encoder_training_step_is_the_same_with_and_without_fused_kernels(conv_norm, bf16):
    torch.manual_seed(0)
    config = dataclasses.replace(
        wavlm_tiny(),
        conv_norm=conv_norm,
        dropout=0.0,
        attention_dropout=0.0,
        feature_dropout=0.0,
        layer_norm_first=conv_norm == "layer",
    )
    model = SSLEncoder(config).train()
    lengths = torch.tensor([16000, 12000])
    _assert_fused_equals_plain(
        model, torch.randn(2, 16000) * 0.1, lambda x: model(x, lengths).last_hidden_state, bf16
    )


@pytest.mark.parametrize("bf16", [False, True])
def test_whole_encoder_inference_is_the_same_with_and_without_fused_kernels(bf16):
    torch.manual_seed(0)
    model = SSLEncoder(wavlm_tiny()).eval()
    audio, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    states = _inference_outputs(lambda: model(audio, lengths, output_hidden_states=True).hidden_states, bf16)
    for layer, (a, b) in enumerate(zip(*states, strict=True)):
        _assert_close(a, b, TOLERANCE[bf16], f"hidden state {layer}")
