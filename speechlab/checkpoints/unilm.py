"""Original microsoft/unilm WavLM (and fairseq HuBERT / wav2vec 2.0) ``.pt`` checkpoints -> :class:`SSLEncoder`.

Key names as in unilm's ``wavlm/WavLM.py`` and fairseq's ``wav2vec2.py`` / ``hubert.py``.

Layout: ``{"cfg": {...}, "model": state_dict}``. unilm releases have a flat ``cfg`` (the WavLMConfig fields); fairseq
training checkpoints nest the model fields under ``cfg["model"]`` (and must have been saved as plain containers:
files are read with ``torch.load(weights_only=True)`` only, never unpickling arbitrary objects).

The relative-bias geometry (``num_buckets``, ``max_distance``) is always read from the checkpoint's cfg: the unilm /
UniSpeech *class* defaults (``max_distance=1280``) differ from what every release used (800), so a cfg without these
fields is rejected instead of silently mis-bucketing (docs/pitfalls.md, 7). The positional-conv weight norm is read in both spellings
(``weight_g``/``weight_v`` and ``parametrizations.weight.original0/1``).
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path

import torch
from torch import Tensor

from speechlab.checkpoints.ssl_keys import (
    OURS,
    UNILM,
    check_pos_conv_magnitude,
    config_fields,
    rename_state_dict,
)
from speechlab.models.ssl_encoder import SSLEncoder, SSLEncoderConfig

HEAD_PREFIXES = ("final_proj.", "label_embs_concat", "label_embs", "quantizer.", "project_q.", "target_glu.")

_BINARY_OPS = {ast.Add: operator.add, ast.Mult: operator.mul}


MAX_CONV_SPEC_CHARS = 2000
MAX_CONV_LAYERS = 64  # fairseq models have 7; the bound applies to every intermediate list too
MAX_CONV_INT = 2**31 - 1


def parse_conv_feature_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``conv_feature_layers`` string (e.g. ``"[(512,10,5)] + [(512,3,2)] * 4"``) safely:
    only int literals, tuples, lists, ``+`` and ``*`` are allowed (no ``eval``), and sizes are bounded *before*
    anything is built: the string to ``MAX_CONV_SPEC_CHARS``, every list / tuple (intermediate ones included) to
    ``MAX_CONV_LAYERS`` items, every integer to ``MAX_CONV_INT``. So ``"[(1,1,1)]*(10000)*(10000)"`` is refused
    without expanding 10^8 tuples."""
    if not isinstance(spec, str) or len(spec) > MAX_CONV_SPEC_CHARS:
        raise ValueError(
            f"cfg conv_feature_layers: expected a string of at most {MAX_CONV_SPEC_CHARS} characters, got "
            f"{type(spec).__name__} of length {len(spec) if isinstance(spec, str) else '-'}"
        )

    def refuse(what: str) -> ValueError:
        return ValueError(
            f"cfg conv_feature_layers: {what} in {spec[:100]!r}; a feature encoder has at most "
            f"{MAX_CONV_LAYERS} layers -> the config is corrupt or hostile"
        )

    def evaluate(node: ast.AST):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            if abs(node.value) > MAX_CONV_INT:
                raise refuse(f"integer {node.value} out of range")
            return node.value
        if isinstance(node, ast.Tuple | ast.List):
            if len(node.elts) > MAX_CONV_LAYERS:
                raise refuse(f"a literal of {len(node.elts)} items")
            items = [evaluate(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Mult):
                sequence, count = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(sequence, list | tuple) and isinstance(count, int):
                    if len(sequence) * max(count, 0) > MAX_CONV_LAYERS:
                        raise refuse(f"a repetition to {len(sequence)} x {count} items")
                elif isinstance(left, int) and isinstance(right, int):
                    if abs(left * right) > MAX_CONV_INT:
                        raise refuse(f"integer {left} * {right} out of range")
                else:
                    raise refuse("a product of two sequences")
            elif isinstance(left, list | tuple) and type(left) is type(right):
                if len(left) + len(right) > MAX_CONV_LAYERS:
                    raise refuse(f"a concatenation to {len(left) + len(right)} items")
            elif isinstance(left, int) and isinstance(right, int):
                if abs(left + right) > MAX_CONV_INT:
                    raise refuse(f"integer {left} + {right} out of range")
            else:
                raise refuse(f"'+' of {type(left).__name__} and {type(right).__name__}")
            return _BINARY_OPS[type(node.op)](left, right)
        raise ValueError(
            f"cfg conv_feature_layers: unsupported expression {ast.dump(node)[:200]} in {spec[:100]!r}"
        )

    try:
        tree = ast.parse(spec, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as err:
        raise ValueError(
            f"cfg conv_feature_layers: not a Python literal expression ({err}): {spec[:100]!r}"
        ) from None
    try:
        layers = evaluate(tree)
    except RecursionError:
        raise refuse("nesting too deep") from None
    if not isinstance(layers, list) or not all(isinstance(t, tuple) and len(t) == 3 for t in layers):
        raise ValueError(
            f"cfg conv_feature_layers must be a list of (dim, kernel, stride) tuples, got {spec!r}"
        )
    return [tuple(int(v) for v in t) for t in layers]


def _model_cfg(cfg: dict) -> dict:
    """Flat unilm cfg, or fairseq's nested ``cfg["model"]``."""
    if isinstance(cfg.get("model"), dict):
        return cfg["model"]
    return cfg


def config_from_unilm(cfg: dict) -> SSLEncoderConfig:
    """unilm WavLMConfig dict (or fairseq HuBERT / wav2vec2 model cfg) -> :class:`SSLEncoderConfig`."""
    cfg = _model_cfg(cfg)
    if cfg.get("activation_fn", "gelu") != "gelu":
        raise ValueError(
            f"checkpoint cfg activation_fn={cfg['activation_fn']!r} is not supported (only 'gelu')"
        )
    extractor = cfg.get("extractor_mode", "default")
    conv_norm = {"default": "group", "layer_norm": "layer"}.get(extractor)
    if conv_norm is None:
        raise ValueError(f"checkpoint cfg extractor_mode={extractor!r}; expected 'default' or 'layer_norm'")
    relative = bool(cfg.get("relative_position_embedding", False))
    num_buckets, max_distance = 320, 800
    if relative:
        missing = [k for k in ("num_buckets", "max_distance") if k not in cfg]
        if missing:
            raise ValueError(
                f"checkpoint cfg has relative_position_embedding=True but no {missing}: refusing to guess (the unilm "
                f"class default max_distance=1280 differs from the 800 every release used); add them to cfg"
            )
        num_buckets, max_distance = int(cfg["num_buckets"]), int(cfg["max_distance"])
        if not cfg.get("gru_rel_pos", False):
            raise ValueError("checkpoint cfg gru_rel_pos=False (ungated relative bias) is not supported")
    conv_layers = cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
    if isinstance(conv_layers, str):
        conv_layers = parse_conv_feature_layers(conv_layers)
    return SSLEncoderConfig(
        conv_layers=conv_layers,
        conv_norm=conv_norm,
        relative_position_bias=relative,
        num_buckets=num_buckets,
        max_distance=max_distance,
        **config_fields(cfg, UNILM),
    )


def state_dict_from_unilm(state_dict: dict[str, Tensor], config: SSLEncoderConfig) -> dict[str, Tensor]:
    """unilm / fairseq backbone keys -> ours. Pretraining heads (``final_proj``, label embeddings, quantizer) are
    dropped; the fine-tuned prefix ``w2v_encoder.w2v_model.`` is stripped; anything else unknown is an error."""
    backbone = {}
    for key, value in state_dict.items():
        key = key.removeprefix("w2v_encoder.w2v_model.")
        if not (key.startswith(HEAD_PREFIXES) or key.startswith("w2v_encoder.proj")):
            backbone[key] = value
    out = rename_state_dict(
        backbone,
        UNILM,
        OURS,
        unknown=lambda key: KeyError(f"unexpected key {key!r} in the unilm/fairseq checkpoint"),
    )
    check_pos_conv_magnitude(out, config.pos_conv_kernel, "encoder.pos_conv.0")
    return out


def load_unilm_checkpoint(path: str | Path) -> SSLEncoder:
    """Read a unilm WavLM ``.pt`` (``{"cfg", "model"}``) with ``torch.load(weights_only=True)`` -> :class:`SSLEncoder`."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name and what to do
        raise ValueError(
            f"{path}: cannot read with torch.load(weights_only=True) ({error}). Only checkpoints whose 'cfg' is a plain "
            f"dict are supported (unilm releases are); re-save fairseq checkpoints with cfg converted to a dict."
        ) from error
    if not isinstance(checkpoint, dict) or "cfg" not in checkpoint or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: expected a dict with 'cfg' and 'model' (unilm layout), found {found}")
    config = config_from_unilm(checkpoint["cfg"])
    model = SSLEncoder(config)
    weights = state_dict_from_unilm(checkpoint["model"], config)
    if "mask_emb" not in weights:
        weights["mask_emb"] = model.mask_emb.detach().clone()
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not match the cfg architecture: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    return model
