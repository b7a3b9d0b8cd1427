"""FlexAttention backend for WavLM's gated relative position bias: same result as SDPA with the materialised bias.

FlexAttention runs eagerly on the CPU (forward only: torch 2.11 has no CPU backward for it), which is enough to
check the ``score_mod`` against the SDPA path; the compiled kernel (what CUDA uses) is checked on the CPU in a slow
test, since compiling takes ~30 s here. Gradients through the FlexAttention path are not checked on this machine.
"""

from __future__ import annotations

import pytest
import torch

from speechlab.host_sync import HostSyncCounter, device_path
from speechlab.models.ssl_encoder import SSLEncoder
from speechlab.models.wavlm import wavlm_tiny
from speechlab.nn.attention import (
    MultiHeadSelfAttention,
    gated_flex_attention,
    resolve_attention_backend,
)
from speechlab.nn.position import RelativePositionBias

pytestmark = pytest.mark.usefixtures("one_thread")


def _padded(batch=3, length=70, dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=generator)
    padding_mask = torch.arange(length)[None] >= torch.tensor([length, length - 23, 31])[:batch, None]
    return x, padding_mask


def test_distance_bias_holds_the_diagonals_of_the_full_bias():
    torch.manual_seed(0)
    table = RelativePositionBias(num_heads=4, num_buckets=32, max_distance=40)
    length = 57
    full, per_distance = table(length), table.distance_bias(length)
    assert per_distance.shape == (4, 2 * length - 1)
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    torch.testing.assert_close(per_distance[:, j - i + length - 1], full, atol=0, rtol=0)


def test_flex_attention_equals_sdpa_with_the_gated_bias_and_padding():
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(64, 4, gated_relative_bias=True).eval()
    with torch.no_grad():
        attention.gate_const.uniform_(0.5, 1.5)  # not the init value 1, so the gate constant matters
    table = RelativePositionBias(num_heads=4, num_buckets=32, max_distance=40)
    x, padding_mask = _padded()
    with torch.no_grad():
        sdpa = attention(x, padding_mask, table(x.shape[1]), backend="sdpa")
        flex = attention(x, padding_mask, table.distance_bias(x.shape[1]), backend="flex")
        flex_unpadded = attention(x, None, table.distance_bias(x.shape[1]), backend="flex")
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=0)
    assert (flex_unpadded - flex).abs().max() > 1e-2  # the padding is really applied


def test_the_flex_backend_of_the_encoder_gives_the_sdpa_hidden_states_on_valid_frames():
    torch.manual_seed(0)
    encoder = SSLEncoder(wavlm_tiny()).eval()
    encoder.encoder.skip_padding = False  # the batch path, where padded keys are masked in attention
    audio = 0.1 * torch.randn(3, 16000)
    lengths = torch.tensor([16000, 12000, 7000])
    outputs = {}
    with torch.no_grad():
        for backend in ("sdpa", "flex"):
            encoder.encoder.attention_backend = backend
            outputs[backend] = encoder(audio, lengths, output_hidden_states=True)
    valid = ~outputs["sdpa"].padding_mask
    for sdpa, flex in zip(outputs["sdpa"].hidden_states, outputs["flex"].hidden_states, strict=True):
        torch.testing.assert_close(flex[valid], sdpa[valid], atol=1e-4, rtol=0)


def test_the_flex_path_reads_nothing_on_the_host():
    torch.manual_seed(0)
    encoder = SSLEncoder(wavlm_tiny()).eval()
    encoder.encoder.attention_backend = "flex"
    audio, lengths = 0.1 * torch.randn(2, 8000), torch.tensor([8000, 5000])
    with torch.no_grad(), device_path(), HostSyncCounter() as counter:
        encoder(audio, lengths)
    assert [s.site for s in counter.syncs if "keep.tolist()" not in s.site] == []


def test_auto_picks_flex_on_cuda_only_where_attention_dropout_is_off(monkeypatch):
    import speechlab.nn.attention as attention

    monkeypatch.setattr(
        attention, "_can_compile_for_cuda", lambda: True
    )  # no Triton GPU build on this machine
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attention_backend("auto", cpu, gated=True, dropout=0.0, training=False) == "sdpa"
    assert resolve_attention_backend("auto", cuda, gated=True, dropout=0.1, training=False) == "flex"
    assert resolve_attention_backend("auto", cuda, gated=True, dropout=0.0, training=True) == "flex"
    assert resolve_attention_backend("auto", cuda, gated=True, dropout=0.1, training=True) == "sdpa"
    assert resolve_attention_backend("auto", cuda, gated=False, dropout=0.0, training=False) == "sdpa"
    monkeypatch.setattr(attention, "_can_compile_for_cuda", lambda: False)
    assert resolve_attention_backend("auto", cuda, gated=True, dropout=0.0, training=False) == "sdpa"


def test_flex_asked_for_with_attention_dropout_in_training_is_a_clear_error():
    with pytest.raises(ValueError, match="no attention dropout"):
        resolve_attention_backend("flex", torch.device("cuda"), gated=True, dropout=0.1, training=True)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attention_backend("flash", torch.device("cpu"), gated=True, dropout=0.0, training=False)


@pytest.mark.slow
def test_compiled_flex_attention_equals_sdpa_on_cpu():
    """What CUDA runs (the compiled kernel), compiled here for the CPU: ~30 s to compile."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, length, head_dim = 2, 4, 70, 16
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(3))
    gate = 1 + torch.rand(batch, heads, length, generator=generator)
    distance_bias = torch.randn(heads, 2 * length - 1, generator=generator)
    padding_mask = torch.arange(length)[None] >= torch.tensor([length, 40])[:, None]
    i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    mask = gate[..., None] * distance_bias[:, j - i + length - 1][None]
    mask = mask.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    flex = torch.compile(gated_flex_attention)(q, k, v, gate, distance_bias, padding_mask)
    torch.testing.assert_close(flex, sdpa, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_written_out_attention_equals_sdpa(mask_kind):
    # The CPU training path (attention dropout on) uses eager_attention; without dropout both must agree.
    from speechlab.nn.attention import eager_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=generator) for _ in range(3))
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 1, 17, dtype=torch.bool)
        mask[1, ..., 12:] = False
    elif mask_kind == "float":
        mask = torch.randn(2, 3, 17, 17, generator=generator)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(eager_attention(q, k, v, mask, 0.0), expected, rtol=1e-5, atol=1e-5)


def test_cpu_training_with_attention_dropout_drops_probabilities_at_the_configured_rate():
    from speechlab.nn.attention import eager_attention

    torch.manual_seed(0)
    q = k = torch.zeros(1, 1, 200, 4)
    v = torch.ones(1, 1, 200, 4)
    out = eager_attention(q, k, v, None, 0.25)  # uniform probabilities 1/200, each kept with p 0.75, scaled
    kept_mass = out[..., 0].mean()
    assert abs(float(kept_mass) - 1.0) < 0.05 and float(out[..., 0].std()) > 0.01
