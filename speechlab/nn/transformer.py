"""The Transformer of the package: one layer class (:class:`TransformerLayer`: post-LN or pre-LN, optional layer
scale, the attention's position scheme, causal masks and streaming cache) and the SSL backbone's encoder built from
it (:class:`TransformerEncoder`: conv positional embedding + layers, LayerDrop); the codec's latent Transformer is
:class:`speechlab.nn.seanet.LatentTransformer`, built from the same layer.

The SSL encoder:

wav2vec 2.0 (Baevski et al. 2020) §2 ("Contextualized representations with Transformers"); the pre-LN layout of the
Large models is fairseq's ``layer_norm_first`` (transformers' ``do_stable_layer_norm``).

- Post-LN (Base, ``layer_norm_first=False``): ``x = LN(x + pos_conv(x))`` -> dropout -> layers with
  ``x = LN1(x + Drop(Attn(x)))``, ``x = LN2(x + FFN(x))``. No final LN.
- Pre-LN (Large, ``layer_norm_first=True``): ``x = x + pos_conv(x)`` -> dropout -> layers with
  ``x = x + Drop(Attn(LN1(x)))``, ``x = x + FFN(LN2(x))`` -> final LN.

Hidden-state convention (matches ``transformers``' WavLM/HuBERT/wav2vec2 ``hidden_states``): L+1 states,
``hidden_states[0]`` = encoder input after the conv positional embedding (and after the input LN for post-LN),
``hidden_states[i]`` = output of layer i. For pre-LN the states are *before* the final LN, which is applied only to
``last_hidden_state``; for post-LN ``hidden_states[-1] is last_hidden_state``. A layer skipped by LayerDrop repeats
the previous state so the tuple always has L+1 entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechlab.host_sync import host_reads_are_free
from speechlab.nn import fused
from speechlab.nn.attention import MultiHeadSelfAttention, resolve_attention_backend
from speechlab.nn.position import ConvPositionalEmbedding, RelativePositionBias


class FeedForward(nn.Module):
    """Linear(D, F) -> GELU -> Dropout(activation_dropout) -> Linear(F, D) -> Dropout(dropout).

    ``init_std``: normal init of the weights (biases 0), as wav2vec 2.0 / BERT; None keeps PyTorch's (the codec's).
    """

    def __init__(
        self,
        dim: int,
        ffn_size: int,
        dropout: float,
        activation_dropout: float,
        init_std: float | None = 0.02,
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_size)
        self.fc2 = nn.Linear(ffn_size, dim)
        if init_std is not None:
            for linear in (self.fc1, self.fc2):
                nn.init.normal_(linear.weight, std=init_std)
                nn.init.zeros_(linear.bias)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, T, D) -> (batch, T, D). Training without activation dropout runs the same maths as
        :func:`speechlab.nn.fused.gelu_linear` when fused kernels are on (the GELU output is not stored)."""
        pre = self.fc1(x)
        if self.activation_dropout.p == 0.0 and fused.for_training(self.fc2.weight):
            return self.dropout(fused.gelu_linear(pre, self.fc2))
        return self.dropout(self.fc2(self.activation_dropout(F.gelu(pre))))


class TransformerLayer(nn.Module):
    """One Transformer layer, the one of the package (the SSL encoder's and the codec's). x: (batch, T, D).

    - post-LN (``layer_norm_first=False``): ``x = LN1(x + Drop(Attn(x)))``, ``x = LN2(x + FFN(x))``;
    - pre-LN: ``x = x + s1 * Drop(Attn(LN1(x)))``, ``x = x + s2 * FFN(LN2(x))``, where ``s1``, ``s2`` are learned
      per-channel layer scales (CaiT, Touvron et al. 2021) initialised to ``layer_scale``, or 1 (absent) when it
      is None.

    The position scheme is the attention's: ``gated_relative_bias`` (WavLM; the bias itself comes from the caller),
    ``rotary`` (RoPE), or neither. ``attention_bias``, ``packed_qkv`` and ``init_std`` are passed to
    :class:`~speechlab.nn.attention.MultiHeadSelfAttention` (``init_std`` to the feed-forward too).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_size: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layer_norm_first: bool = False,
        gated_relative_bias: bool = False,
        layer_norm_eps: float = 1e-5,
        *,
        rotary: bool = False,
        layer_scale: float | None = None,
        attention_bias: bool = True,
        packed_qkv: bool = False,
        init_std: float | None = 0.02,
    ):
        super().__init__()
        if layer_scale is not None and not layer_norm_first:
            raise ValueError(
                "layer_scale scales the residual branches of a pre-LN layer: set layer_norm_first"
            )
        self.layer_norm_first = layer_norm_first
        self.attention = MultiHeadSelfAttention(
            dim,
            num_heads,
            attention_dropout,
            gated_relative_bias,
            rotary=rotary,
            bias=attention_bias,
            packed_qkv=packed_qkv,
            init_std=init_std,
        )
        self.attention_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.feed_forward = FeedForward(dim, ffn_size, dropout, activation_dropout, init_std)
        self.ffn_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.attention_scale = self.ffn_scale = None
        if layer_scale is not None:
            self.attention_scale = nn.Parameter(torch.full((dim,), layer_scale))
            self.ffn_scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
        attention_backend: str = "sdpa",
        *,
        attn_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """x: (batch, T, D) -> (batch, T, D); the other arguments go to the attention (its :meth:`forward`)."""

        def attend(h: Tensor) -> Tensor:
            return self.dropout(
                self.attention(
                    h, padding_mask, position_bias, attention_backend,
                    attn_mask=attn_mask, positions=positions, cache=cache,
                )
            )  # fmt: skip

        if not self.layer_norm_first:
            x = self.attention_norm(x + attend(x))
            return self.ffn_norm(x + self.feed_forward(x))
        # The WavLM gate reads the attention input, i.e. the LN1 output here (docs/pitfalls.md, 5).
        x = x + _scaled(self.attention_scale, attend(self.attention_norm(x)))
        return x + _scaled(self.ffn_scale, self.feed_forward(self.ffn_norm(x)))


def _scaled(scale: Tensor | None, branch: Tensor) -> Tensor:
    return branch if scale is None else scale * branch


class TransformerEncoder(nn.Module):
    """Positional conv + L layers (+ WavLM relative bias shared from one table).

    LayerDrop skips whole layers in training with probability ``layerdrop`` but never layer 0 (WavLM's bias table
    belongs to layer 0 in every checkpoint; docs/pitfalls.md, 6). Here the bias is built once at encoder level, so it is
    available to every layer regardless. The draws come from a generator that the training loop reseeds alike on
    every rank before each batch (:meth:`reseed_shared`), so DDP ranks drop the same layers, as one process
    training on the global batch would; without a reseed they come from the global torch RNG.

    ``attention_backend`` (``"auto"``, ``"sdpa"`` or ``"flex"``, an attribute that may be changed at any time, not a
    checkpointed setting) picks how the gated relative bias is applied (:mod:`speechlab.nn.attention`): ``"auto"``
    uses FlexAttention on CUDA where attention dropout is inactive, so no (batch, heads, T, T) bias is built there.
    """

    def __init__(
        self,
        dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        ffn_size: int = 3072,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layer_norm_first: bool = False,
        pos_conv_kernel: int = 128,
        pos_conv_groups: int = 16,
        relative_position_bias: bool = False,
        num_buckets: int = 320,
        max_distance: int = 800,
        layerdrop: float = 0.0,
        layer_norm_eps: float = 1e-5,
        skip_padding: bool = True,
        skip_padding_min_fraction: float = 0.1,
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop
        self.skip_padding = skip_padding
        self.skip_padding_min_fraction = skip_padding_min_fraction
        self._layerdrop_generator: torch.Generator | None = None
        self.attention_dropout = attention_dropout
        self.attention_backend = "auto"
        self.pos_conv = ConvPositionalEmbedding(dim, pos_conv_kernel, pos_conv_groups)
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.relative_position_bias = (
            RelativePositionBias(num_heads, num_buckets, max_distance) if relative_position_bias else None
        )
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim,
                num_heads,
                ffn_size,
                dropout,
                attention_dropout,
                activation_dropout,
                layer_norm_first,
                relative_position_bias,
                layer_norm_eps,
            )
            for _ in range(num_layers)
        )

    def reseed_shared(self, seed: int) -> None:
        """Seed the LayerDrop draws with a seed every rank shares (called before each training batch)."""
        if self._layerdrop_generator is None:
            self._layerdrop_generator = torch.Generator()
        self._layerdrop_generator.manual_seed(seed)

    def layers_to_run(self) -> Tensor:
        """(num_layers,) bool on the CPU: which layers run this step. Layer 0 always runs."""
        keep = torch.ones(len(self.layers), dtype=torch.bool)
        if self.training and self.layerdrop > 0.0 and len(self.layers) > 1:
            draws = torch.rand(len(self.layers) - 1, generator=self._layerdrop_generator)
            keep[1:] = draws >= self.layerdrop
        return keep

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """x: (batch, T, D) projected features; padding_mask: (batch, T) bool, True at padded frames.

        Returns ``(last_hidden_state, hidden_states)``; hidden_states has L+1 entries when requested (see module doc).

        When ``skip_padding`` is on, the tensors are on the CPU and more than ``skip_padding_min_fraction`` of the
        frames are padding, each utterance runs alone on its valid frames (exactly what the padded computation gives on valid frames, since
        padded keys are masked and the positional conv sees zeros either way) and padded output frames are 0.
        """
        keep = self.layers_to_run()
        # The per-utterance path needs the padded fraction and the lengths on the host: taken only where reading
        # them is free (CPU). On an accelerator the whole batch runs at once with the padded keys masked.
        if (
            padding_mask is not None
            and self.skip_padding
            and x.shape[0] > 1
            and host_reads_are_free(padding_mask)
            and float(padding_mask.float().mean()) > self.skip_padding_min_fraction
        ):
            return self._forward_per_utterance(x, (~padding_mask).sum(-1), output_hidden_states, keep)
        return self._forward_batch(x, padding_mask, output_hidden_states, keep)

    def _forward_per_utterance(
        self, x: Tensor, lengths: Tensor, output_hidden_states: bool, keep: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Each utterance of x: (batch, T, D) alone on its ``lengths`` valid frames, padded back to T with zeros.

        A loop over utterances (each step a whole Transformer pass), not over frames: its point is to skip the padded
        frames' work, which a vectorised form over the padded batch would do again (e.g. 30 % of the frames of the
        10 / 8 / 6 / 4 s batch of benchmarks/extract.py). Only taken where the lengths are on the host already (CPU).
        """
        width = x.shape[1]
        lasts, all_states = [], []
        for index, length in enumerate(lengths.tolist()):
            length = max(
                length, 1
            )  # an all-padding row still yields a (meaningless) frame instead of failing
            last, states = self._forward_batch(
                x[index : index + 1, :length], None, output_hidden_states, keep
            )
            lasts.append(F.pad(last, (0, 0, 0, width - length)))
            if states is not None:
                all_states.append([F.pad(state, (0, 0, 0, width - length)) for state in states])
        last = torch.cat(lasts)
        if not output_hidden_states:
            return last, None
        states = tuple(torch.cat(per_layer) for per_layer in zip(*all_states, strict=True))
        if not self.layer_norm_first:
            states = states[:-1] + (last,)
        return last, states

    def _forward_batch(
        self, x: Tensor, padding_mask: Tensor | None, output_hidden_states: bool, keep: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        if padding_mask is not None:
            # Zero padded frames so the positional conv sees what it would see at a real boundary (zero padding).
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)

        gated = self.relative_position_bias is not None
        backend = resolve_attention_backend(
            self.attention_backend, x.device, gated, self.attention_dropout, self.training
        )
        position_bias = None
        if gated and backend == "flex":
            position_bias = self.relative_position_bias.distance_bias(x.shape[1])  # (H, 2T-1)
        elif gated:
            position_bias = self.relative_position_bias(x.shape[1])  # (H, T, T)

        states: list[Tensor] = [x]
        for layer, run in zip(self.layers, keep.tolist(), strict=True):
            if run:
                x = layer(x, padding_mask, position_bias, backend)
            if output_hidden_states:
                states.append(x)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, (tuple(states) if output_hidden_states else None)
