"""Hugging Face ``EncodecModel`` / ``DacModel`` behind speechlab's codec interface.

``HFCodec.encode(audio (B, S), lengths=None, n_q=None) -> (codes (B, n_q, T) int64, frame_lengths (B,))`` and
``decode(codes, frame_lengths=None) -> audio (B, S)``, the same calls as :class:`speechlab.models.codec.Codec`, so
the token tools and the evaluation harness take either. Codes are exactly what transformers returns.

Caveats inherited from the wrapped models: EnCodec picks its bitrate from a fixed list (``n_q`` must match one of
``config.target_bandwidths``); neither model is padding-invariant (non-zero padding modes / non-causal convs), so a
padded batch can give different codes than each file alone; EnCodec's chunked/normalised 48 kHz variant is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from speechlab.checkpoints.pretrained_dir import is_pretrained_dir, load_pretrained_codec
from speechlab.models.codec import Codec
from speechlab.nn.masks import valid_mask

SUPPORTED = ("encodec", "dac")


def load_codec(source: str | Path, device: str = "cpu") -> Codec | HFCodec:
    """A speechlab codec directory or a transformers EnCodec/DAC directory -> an object with encode/decode."""
    if is_pretrained_dir(source):
        return load_pretrained_codec(source, device=device)
    if is_hf_codec_dir(source):
        return HFCodec.from_pretrained(source, device=device)
    raise FileNotFoundError(
        f"{source}: not a codec directory; expected a speechlab codec (config.json with family 'codec', from "
        "CodecTask.export_pretrained / save_pretrained(codec, family='codec')) or a transformers EnCodec/DAC directory"
    )


def is_hf_codec_dir(directory: str | Path) -> bool:
    """True when ``directory/config.json`` is a transformers EnCodec or DAC config."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") in SUPPORTED
    except (OSError, ValueError):
        return False


class HFCodec(nn.Module):
    """Wrap a transformers ``EncodecModel`` or ``DacModel`` (eval mode, no grad)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        kind = getattr(model.config, "model_type", None)
        if kind not in SUPPORTED:
            raise ValueError(f"HFCodec wraps EncodecModel or DacModel, got model_type {kind!r}")
        if kind == "encodec" and (model.config.chunk_length_s is not None or model.config.normalize):
            raise ValueError(
                "HFCodec: chunked/normalised EnCodec configs (the 48 kHz model) return per-chunk scales that "
                "speechlab token files do not carry; use a config with chunk_length_s=None and normalize=False"
            )
        if getattr(model.config, "audio_channels", 1) != 1:
            raise ValueError("HFCodec supports mono codecs only")
        self.kind = kind
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> HFCodec:
        """Load a local transformers directory (``config.json`` with model_type encodec or dac)."""
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a transformers EnCodec/DAC model directory")
        kind = json.loads(path.read_text()).get("model_type")
        if kind == "encodec":
            from transformers import EncodecModel as Model
        elif kind == "dac":
            from transformers import DacModel as Model
        else:
            raise ValueError(f"{path}: model_type {kind!r} is not one of {SUPPORTED}")
        return cls(Model.from_pretrained(str(directory)).to(device))

    # --- geometry (same names as speechlab's Codec) ---------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return int(self.model.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        return int(self.model.config.hop_length)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    @property
    def num_quantizers(self) -> int:
        c = self.model.config
        return int(c.n_codebooks) if self.kind == "dac" else int(c.num_quantizers)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return torch.div(lengths + self.hop_length - 1, self.hop_length, rounding_mode="floor")

    def allowed_n_q(self) -> list[int]:
        """Codebook counts the model can produce (EnCodec: one per target bandwidth)."""
        if self.kind == "dac":
            return list(range(1, self.num_quantizers + 1))
        c = self.model.config
        return [int(round(bw * 1000 / (c.frame_rate * c.codebook_nbits))) for bw in c.target_bandwidths]

    def _bandwidth(self, n_q: int | None) -> float:
        c = self.model.config
        if n_q is None:
            return float(c.target_bandwidths[-1])
        allowed = self.allowed_n_q()
        if n_q not in allowed:
            raise ValueError(f"EnCodec n_q must be one of {allowed} (its target bandwidths), got {n_q}")
        return float(c.target_bandwidths[allowed.index(n_q)])

    def codebook_hash(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            if "quantizer" in name and ("embed" in name or "codebook" in name or "out_proj" in name):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def model_version(self) -> str:
        import transformers

        return f"transformers-{self.kind}/{transformers.__version__}"

    # --- encode / decode ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self, audio: Tensor, lengths: Tensor | None = None, n_q: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``audio: (B, S)`` -> ``codes (B, n_q, T) int64, frame_lengths (B,)``."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be (batch, samples) mono, got shape {tuple(audio.shape)}")
        inputs = audio[:, None]
        if lengths is None:
            lengths = torch.full((audio.shape[0],), audio.shape[1], dtype=torch.long, device=audio.device)
        # the encoder's latent is checked for NaN/inf: quantizing it would give arbitrary codes
        latents: list[Tensor] = []
        hook = self.model.encoder.register_forward_hook(lambda module, args, out: latents.append(out))
        try:
            if self.kind == "encodec":
                mask = valid_mask(lengths, audio.shape[1])[:, None]
                out = self.model.encode(inputs, padding_mask=mask, bandwidth=self._bandwidth(n_q))
                codes = out.audio_codes[0]
            else:
                if n_q is not None and not 1 <= n_q <= self.num_quantizers:
                    raise ValueError(f"DAC n_q must be in [1, {self.num_quantizers}], got {n_q}")
                codes = self.model.encode(inputs, n_quantizers=n_q).audio_codes[
                    :, : n_q or self.num_quantizers
                ]
        finally:
            hook.remove()
        bad_rows = sorted(
            {
                row
                for latent in latents
                for row in (~torch.isfinite(latent)).flatten(1).any(1).nonzero().flatten().tolist()
            }
        )
        if bad_rows:
            raise ValueError(
                f"codec latent is NaN/inf for batch rows {bad_rows}, so their codes would be meaningless -> the "
                "codec overflows or its weights are corrupt; re-export it"
            )
        return codes.long(), self.frame_lengths(lengths).clamp_max(codes.shape[-1])

    @torch.no_grad()
    def decode(self, codes: Tensor, frame_lengths: Tensor | None = None) -> Tensor:
        """``codes: (B, n_q, T)`` -> ``audio (B, S)``; samples past ``frame_lengths * hop`` are zeroed."""
        if self.kind == "encodec":
            audio = self.model.decode(codes[None], [None]).audio_values[:, 0]
        else:
            audio = self.model.decode(audio_codes=codes).audio_values
        if frame_lengths is not None:
            audio = audio * valid_mask(frame_lengths * self.hop_length, audio.shape[-1])
        return audio

    def bitrate(self, n_q: int | None = None) -> float:
        return (n_q or self.num_quantizers) * math.log2(self.codebook_size) * self.frame_rate
