"""HuBERT-style k-means unit targets: MFCC (iteration 1) or hidden-layer (iteration 2) features -> unit ids.

Features (``ssl_spec.md`` §5.1–5.2):

- iteration 1: 39-d MFCC = 13 Kaldi-compatible MFCCs (``torchaudio.compliance.kaldi.mfcc``, 25 ms window, 10 ms
  shift, 23 mel bins, ``use_energy=False``) + deltas + delta-deltas, at 100 Hz;
- iteration 2: one hidden layer (``hidden_states[layer]``, 0 = Transformer input) of a trained ``SSLEncoder``,
  at 50 Hz, each utterance run alone (unpadded: Base's GroupNorm makes padded batches differ, pitfall 8).

Alignment with the encoder's 50 Hz frames: encoder frame ``t`` sees samples ``[320 t, 320 t + 400)``, MFCC frame
``k`` sees ``[160 k, 160 k + 400)`` (Kaldi ``snip_edges``), so MFCC frame ``2 t`` has exactly the same 25 ms window
as encoder frame ``t``. We keep every second MFCC frame (as HuBERT does with its 100 Hz labels, feat2tar ratio 2)
and crop (or repeat the last frame) to ``conv_output_lengths(num_samples)`` — the same count as
``SSLEncoder.frame_lengths`` — so ``len(units) == frames`` for every utterance.

K-means: a short mini-batch k-means in torch: k-means++ initialisation on a sample of the fit set, one
Sculley-style mini-batch pass (every centre is the running mean of the points assigned to it), then streamed
Lloyd iterations (assignment in chunks, exact means) until a pass lowers the mean inertia by less than ``tol``. Why our own rather than scikit-learn's
``MiniBatchKMeans`` (what fairseq uses): it runs on the GPU when there is one (500 centres × 768-d over millions
of frames is a few matrix products per batch there, minutes on CPU with sklearn), needs no extra dependency,
streams the assignment pass, and its result is a plain (K, D) tensor we save as safetensors.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MFCC_HOP = 160  # samples, 10 ms
# conv stack of every wav2vec 2.0 / HuBERT / WavLM preset: 320-sample hop, 400-sample receptive field
DEFAULT_CONV_LAYERS: tuple[tuple[int, int, int], ...] = (
    ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
)


# ----------------------------------------------------------------------------------------------------------------
# features


def encoder_frame_count(
    num_samples: int | Tensor, conv_layers: Sequence[tuple[int, int, int]] | None = None
) -> Tensor:
    """Frames of the SSL encoder for ``num_samples`` (int or (batch,) tensor) -> (batch,) int64."""
    from speechlab.nn.feature_encoder import conv_output_lengths

    lengths = torch.as_tensor(num_samples, dtype=torch.long).reshape(-1)
    return conv_output_lengths(lengths, conv_layers or DEFAULT_CONV_LAYERS)


def mfcc_features(audio: Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """39-d MFCC + deltas at 100 Hz. audio: (samples,) float32 -> (frames_100hz, 39) float32."""
    import torchaudio

    if audio.numel() < 400:
        return audio.new_zeros(0, 39)
    mfcc = torchaudio.compliance.kaldi.mfcc(
        audio.reshape(1, -1).float(), sample_frequency=sample_rate, use_energy=False, dither=0.0
    )  # (frames, 13)
    static = mfcc.transpose(0, 1)  # (13, frames)
    delta = torchaudio.functional.compute_deltas(static)
    delta2 = torchaudio.functional.compute_deltas(delta)
    return torch.cat([static, delta, delta2], dim=0).transpose(0, 1).contiguous()


def align_frames(features: Tensor, num_frames: int, stride: int = 1) -> Tensor:
    """Take every ``stride``-th row of (frames, D) features and crop / repeat the last row to ``num_frames``."""
    features = features[::stride]
    if num_frames <= 0:
        return features[:0]
    if features.shape[0] == 0:
        raise ValueError(f"cannot align an empty feature sequence to {num_frames} frames")
    if features.shape[0] >= num_frames:
        return features[:num_frames]
    pad = features[-1:].expand(num_frames - features.shape[0], -1)
    return torch.cat([features, pad], dim=0)


def mfcc_frame_features(audio: Tensor, conv_layers: Sequence[tuple[int, int, int]] | None = None) -> Tensor:
    """MFCC features aligned to the encoder's 50 Hz frames. audio: (samples,) -> (frames, 39)."""
    num_frames = int(encoder_frame_count(audio.numel(), conv_layers)[0])
    return align_frames(mfcc_features(audio), num_frames, stride=2)


@torch.no_grad()
def hidden_layer_features(encoder: nn.Module, audio: Tensor, layer: int) -> Tensor:
    """``hidden_states[layer]`` of an ``SSLEncoder`` for one unpadded utterance. audio: (samples,) -> (frames, D)."""
    device = next(encoder.parameters()).device
    wav = audio.to(device).reshape(1, -1)
    out = encoder(wav, torch.tensor([wav.shape[1]], device=device), output_hidden_states=True)
    states = out.hidden_states
    if not -len(states) <= layer < len(states):
        raise ValueError(
            f"layer {layer} does not exist: the encoder returns {len(states)} hidden states (0..L)"
        )
    return states[layer][0].float()


# ----------------------------------------------------------------------------------------------------------------
# k-means


@dataclass
class KMeansConfig:
    """Mini-batch k-means settings (fairseq's ``learn_kmeans.py`` values where they apply)."""

    num_clusters: int = 100
    batch_size: int = 10000
    minibatch_passes: int = 1  # mini-batch passes over the fit set before the Lloyd refinement
    max_iter: int = 100  # Lloyd refinement iterations (each one pass over the fit set)
    init_sample: int = 100000  # points the k-means++ initialisation looks at
    tol: float = 1e-4  # stop when a pass lowers the mean inertia by less than this fraction
    seed: int = 0


def squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances (clamped at 0)."""
    dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.T + centroids.pow(2).sum(1)[None, :]
    return dist.clamp_(min=0)


def assign(x: Tensor, centroids: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row. x: (N, D) -> (labels (N,) int64, squared distance (N,) float32)."""
    labels, dists = [], []
    for part in x.split(chunk):
        d = squared_distances(part.to(centroids.device, centroids.dtype), centroids)
        best, idx = d.min(1)
        labels.append(idx)
        dists.append(best)
    if not labels:
        return torch.zeros(0, dtype=torch.long, device=centroids.device), torch.zeros(
            0, device=centroids.device
        )
    return torch.cat(labels), torch.cat(dists)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): x (N, D) -> (k, D) initial centroids."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centroids = x.new_empty(k, x.shape[1])
    centroids[0] = x[first]
    closest = squared_distances(x, centroids[:1])[:, 0]
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: duplicate a random point
            pick = int(torch.randint(n, (1,), generator=generator, device=generator.device))
        else:
            pick = int(torch.multinomial(closest / total, 1, generator=generator))
        centroids[i] = x[pick]
        closest = torch.minimum(closest, squared_distances(x, centroids[i : i + 1])[:, 0])
    return centroids


def check_finite(values: Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``values`` holds NaN/inf (a NaN distance picks an arbitrary unit)."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(
            f"{what}: {bad} of {values.numel()} values are NaN/inf -> the features overflow (check the "
            "--checkpoint encoder on a known-good file) or the centroids file is corrupt (fit it again)"
        )


class KMeans:
    """Mini-batch k-means on a (N, D) tensor, on whatever device the tensor (or ``device``) is on.

    ``fit(x)`` sets ``centroids`` (K, D) float32 and ``inertia`` (mean squared distance to the nearest centroid);
    ``predict(x)`` returns (N,) int64 labels. ``save`` / ``load`` use safetensors.
    """

    def __init__(self, config: KMeansConfig | None = None, device: str | torch.device | None = None) -> None:
        self.config = config or KMeansConfig()
        self.device = torch.device(device) if device is not None else None
        self.centroids: Tensor | None = None
        self.inertia: float = math.nan
        self.n_iter: int = 0

    def fit(self, x: Tensor) -> KMeans:
        cfg = self.config
        device = self.device or x.device
        x = x.to(device, torch.float32)
        check_finite(x, "k-means fit features")
        n, k = x.shape[0], cfg.num_clusters
        if n < k:
            raise ValueError(f"k-means: {n} feature frames for {k} clusters; use more data or fewer clusters")
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        sample = x[torch.randperm(n, generator=gen, device=device)[: cfg.init_sample]]
        centroids = kmeans_plus_plus(sample, k, gen)
        # 1) mini-batch passes (Sculley 2010): each centre is the running mean of every point assigned to it
        counts = torch.zeros(k, device=device)
        for _ in range(cfg.minibatch_passes):
            order = torch.randperm(n, generator=gen, device=device)
            for batch_idx in order.split(cfg.batch_size):
                batch = x[batch_idx]
                labels, _ = assign(batch, centroids)
                batch_counts = torch.bincount(labels, minlength=k).float()
                batch_sums = torch.zeros_like(centroids).index_add_(0, labels, batch)
                counts += batch_counts
                # c <- c + (sum_b - n_b c) / n_total; centres without points in this batch do not move
                centroids += (batch_sums - batch_counts[:, None] * centroids) / counts.clamp(min=1)[:, None]
        # 2) streamed Lloyd iterations (one pass each, in chunks): the mini-batch learning rate 1/n_total
        #    shrinks so fast that further mini-batch passes creep; full passes converge in a few steps.
        previous = math.inf
        for iteration in range(cfg.max_iter):
            sums, counts = torch.zeros_like(centroids), torch.zeros(k, device=device)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for chunk in x.split(cfg.batch_size):
                labels, dists = assign(chunk, centroids)
                sums.index_add_(0, labels, chunk)
                counts += torch.bincount(labels, minlength=k).float()
                total += dists.double().sum()
            inertia = float(total) / n  # of the centroids before this update
            empty = counts == 0
            centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
            if empty.any():  # a centre nobody chose: restart it on a random point
                centroids[empty] = x[torch.randint(n, (int(empty.sum()),), generator=gen, device=device)]
            self.n_iter = iteration + 1
            log.info("k-means iteration %d: mean inertia %.4f", iteration + 1, inertia)
            if previous - inertia <= cfg.tol * inertia and not empty.any():
                break
            previous = inertia
        check_finite(centroids, "k-means centroids after fitting")  # finite but huge features overflow
        self.centroids = centroids
        self.inertia = float(assign(x, centroids)[1].double().mean())
        return self

    def predict(self, x: Tensor) -> Tensor:
        if self.centroids is None:
            raise RuntimeError("k-means: call fit() or load() before predict()")
        check_finite(x, "k-means features to label")
        return assign(x, self.centroids)[0].cpu()

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        if self.centroids is None:
            raise RuntimeError("k-means: nothing to save, call fit() first")
        meta = {"num_clusters": str(self.centroids.shape[0]), "inertia": f"{self.inertia:.6g}"}
        meta.update(metadata or {})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": self.centroids.detach().cpu().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> KMeans:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "centroids" not in f.keys():
                raise ValueError(
                    f"{path}: no 'centroids' tensor; expected a file written by `speechlab kmeans`"
                )
            centroids = f.get_tensor("centroids")
            meta = f.metadata() or {}
        check_finite(centroids, f"{path}: centroids")
        km = cls(KMeansConfig(num_clusters=centroids.shape[0]), device=device)
        km.centroids = centroids.float().to(device or "cpu")
        km.inertia = float(meta.get("inertia", "nan"))
        km.metadata = meta
        return km


# ----------------------------------------------------------------------------------------------------------------
# manifests -> features -> units


def load_item_audio(item: dict, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """The audio of one manifest item exactly as the data loader reads it (segment when ``offset`` is set)."""
    from speechlab.audio import load_audio

    offset = float(item.get("offset") or 0.0)
    duration = float(item["duration"]) if "offset" in item else None
    return load_audio(item["audio"], sample_rate=sample_rate, offset=offset, duration=duration)


class _AudioItems(torch.utils.data.Dataset):
    """Item audio, or its features when ``worker_fn`` is given (CPU features computed in the workers)."""

    def __init__(self, items: Sequence[dict], worker_fn: Callable[[Tensor], Tensor] | None = None) -> None:
        self.items = items
        self.worker_fn = worker_fn

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        audio = load_item_audio(self.items[index])
        return index, self.worker_fn(audio) if self.worker_fn is not None else audio


def iterate_features(
    items: Sequence[dict],
    feature_fn: Callable[[Tensor], Tensor],
    num_workers: int = 0,
    desc: str = "features",
    progress: bool = True,
    in_workers: bool = False,
):
    """Yield ``(index, features (frames, D))`` for each item, audio decoded in ``num_workers`` processes.

    ``in_workers=True`` runs ``feature_fn`` inside the workers too (a picklable CPU function such as
    :func:`mfcc_frame_features`): MFCC extraction then scales with the workers. GPU features stay in the main process.
    """
    from tqdm import tqdm

    dataset = _AudioItems(items, feature_fn if in_workers else None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)
    for index, value in tqdm(loader, total=len(items), desc=desc, disable=not progress, unit="utt"):
        yield int(index), value if in_workers else feature_fn(value)


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """An ``SSLEncoder`` in eval mode on ``device``, from any source ``speechlab.load`` reads: a Lightning ``.ckpt``
    of a speechlab task (e.g. WavLM pretraining), our pretrained dir, a Hugging Face WavLM / HuBERT / wav2vec2 dir,
    a unilm/fairseq ``.pt`` — e.g. layer 6 of a released HuBERT Base for 500 iteration-2 units. One reader for all,
    so every source goes through the same config limits and weight checks before a model is built."""
    from speechlab.api import find_encoder, load

    return find_encoder(load(path)).to(device).eval()


def _output_name(manifest: Path) -> str:
    return manifest.parent.name if manifest.stem == "manifest" else manifest.stem


def run(args: argparse.Namespace) -> int:
    """``speechlab kmeans``: fit (or load) centroids, write one manifest with ``units`` per input manifest."""
    from speechlab.data.manifest import read_manifest, write_manifest

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    device = torch.device(
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    out_dir = Path(args.output_dir)
    manifests = [Path(m) for m in args.manifest]
    names = [_output_name(m) for m in manifests]
    if len(set(names)) != len(names):
        raise SystemExit(
            f"speechlab kmeans: manifests {names} would overwrite each other in {out_dir}; "
            "give them distinct file names"
        )
    items_per_manifest = [read_manifest(m, check_audio="exists") for m in manifests]

    if args.checkpoint:
        encoder = load_encoder(args.checkpoint, device)
        layer = args.layer
        in_workers = False

        def feature_fn(audio: Tensor) -> Tensor:
            return hidden_layer_features(encoder, audio, layer)

        kind = f"layer{layer}:{args.checkpoint}"
    else:
        feature_fn = mfcc_frame_features  # all presets share the 320-sample hop: default conv layers
        in_workers = True
        kind = "mfcc39"

    cached: dict[int, Tensor] = {}  # global item index -> features already computed for fitting
    if args.centroids:
        kmeans = KMeans.load(args.centroids, device=device)
        log.info("loaded %d centroids from %s", kmeans.centroids.shape[0], args.centroids)
    else:
        all_items = [item for items in items_per_manifest for item in items]
        gen = torch.Generator().manual_seed(args.seed)
        count = max(1, round(len(all_items) * args.fit_fraction))
        chosen = torch.randperm(len(all_items), generator=gen)[:count].sort().values.tolist()
        fit_items = [all_items[i] for i in chosen]
        expected_frames = sum(float(it["duration"]) for it in fit_items) * SAMPLE_RATE / 320
        keep = min(1.0, args.max_fit_frames / max(expected_frames, 1.0))
        parts = []
        for index, feats in iterate_features(
            fit_items, feature_fn, args.num_workers, "k-means features", in_workers=in_workers
        ):
            check_finite(feats, f"id {fit_items[index]['id']!r} ({fit_items[index]['audio']}): features")
            if keep < 1.0:
                feats = feats[torch.rand(feats.shape[0], generator=gen) < keep]
            else:  # every frame is kept anyway: reuse them for labelling instead of recomputing
                cached[chosen[index]] = feats
            parts.append(feats.cpu())
        fit_x = torch.cat(parts)
        log.info(
            "fitting %d clusters on %d frames of %d-d %s features", args.num_clusters, *fit_x.shape, kind
        )
        config = KMeansConfig(
            num_clusters=args.num_clusters,
            batch_size=args.batch_size,
            max_iter=args.max_iter,
            init_sample=args.init_sample,
            tol=args.tol,
            seed=args.seed,
        )
        kmeans = KMeans(config, device=device).fit(fit_x)
        del fit_x, parts
        kmeans.save(out_dir / "centroids.safetensors", {"features": kind})
        log.info(
            "k-means: %d passes, mean inertia %.4f -> %s",
            kmeans.n_iter,
            kmeans.inertia,
            out_dir / "centroids.safetensors",
        )

    merged: list[dict] = []
    first = 0  # global index of the manifest's first item
    for manifest, name, items in zip(manifests, names, items_per_manifest, strict=True):
        labelled = [dict(item) for item in items]
        todo = [i for i in range(len(items)) if first + i not in cached]
        for i in range(len(items)):
            if first + i in cached:
                labelled[i]["units"] = " ".join(map(str, kmeans.predict(cached.pop(first + i)).tolist()))
        for index, feats in iterate_features(
            [items[i] for i in todo], feature_fn, args.num_workers, f"units {name}", in_workers=in_workers
        ):
            check_finite(feats, f"{manifest}: id {items[todo[index]]['id']!r}: features")
            labels = kmeans.predict(feats)
            labelled[todo[index]]["units"] = " ".join(map(str, labels.tolist()))
        first += len(items)
        path = write_manifest(out_dir / f"{name}.jsonl", labelled)
        log.info("wrote %s (%d utterances, units from %s)", path, len(labelled), manifest)
        merged += labelled
    if args.merge:
        if args.val_fraction > 0:
            order = torch.randperm(len(merged), generator=torch.Generator().manual_seed(args.seed)).tolist()
            num_val = max(1, round(len(merged) * args.val_fraction))
            val = sorted(order[:num_val])
            val_set = set(val)
            write_manifest(out_dir / f"{args.merge}_val.jsonl", [merged[i] for i in val])
            write_manifest(
                out_dir / f"{args.merge}_train.jsonl", [m for i, m in enumerate(merged) if i not in val_set]
            )
            log.info(
                "wrote %s_train.jsonl / %s_val.jsonl (%d / %d utterances)",
                args.merge,
                args.merge,
                len(merged) - num_val,
                num_val,
            )
        else:
            write_manifest(out_dir / f"{args.merge}.jsonl", merged)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``speechlab kmeans``."""
    parser = subparsers.add_parser(
        "kmeans",
        help="k-means unit targets (HuBERT/WavLM pseudo-labels) for manifests",
        description=(
            "Compute 50 Hz frame features (39-d MFCC, or a hidden layer of a trained SSL encoder given by "
            "--checkpoint), fit mini-batch k-means (torch, GPU if present) on a sample, and write for every input manifest a copy "
            "with a 'units' field (space-separated cluster ids, one per encoder frame) to OUTPUT_DIR/<name>.jsonl, "
            "plus OUTPUT_DIR/centroids.safetensors."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--manifest",
        action="append",
        required=True,
        help="input manifest (repeat for several); output name = file stem, or the folder name "
        "for files called manifest.jsonl",
    )
    parser.add_argument("--output-dir", required=True, help="where the labelled manifests and centroids go")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="encoder for hidden-layer features (iteration 2): a WavLM pretraining Lightning .ckpt, or anything "
        "speechlab.load reads (pretrained dir, Hugging Face WavLM/HuBERT/wav2vec2 dir, unilm/fairseq .pt); "
        "without it, MFCC features (iteration 1)",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=6,
        help="hidden_states index with --checkpoint (0 = Transformer input, L = last layer)",
    )
    parser.add_argument(
        "--centroids",
        default=None,
        help="existing centroids.safetensors: skip fitting, only label (e.g. dev/test sets)",
    )
    parser.add_argument(
        "--num-clusters", type=int, default=100, help="k (HuBERT: 100 on MFCC, 500 on layer 6)"
    )
    parser.add_argument(
        "--fit-fraction",
        type=float,
        default=1.0,
        help="fraction of utterances whose features fit k-means (fairseq uses 0.1 on 960 h)",
    )
    parser.add_argument(
        "--max-fit-frames",
        type=int,
        default=2_000_000,
        help="cap on frames kept for fitting (random frames per utterance); bounds memory",
    )
    parser.add_argument("--batch-size", type=int, default=10000, help="mini-batch size (frames)")
    parser.add_argument(
        "--max-iter",
        type=int,
        default=100,
        help="maximum Lloyd iterations after the mini-batch pass (each one pass over the fit frames)",
    )
    parser.add_argument("--init-sample", type=int, default=100000, help="frames seen by the k-means++ init")
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-4,
        help="stop when a pass lowers the mean inertia by less than this fraction",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and k-means")
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."
    )
    parser.add_argument(
        "--merge",
        default=None,
        metavar="NAME",
        help="also write all labelled utterances into OUTPUT_DIR/NAME.jsonl",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="with --merge: hold out this random fraction as NAME_val.jsonl, the rest as "
        "NAME_train.jsonl (instead of NAME.jsonl)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="audio decoding worker processes")
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechlab")
    add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
