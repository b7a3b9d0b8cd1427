"""Mini-batch k-means in torch, on whatever device the data is on.

k-means++ initialisation (Arthur & Vassilvitskii 2007) on a sample of the fit set, Sculley-style mini-batch passes
(Sculley 2010: every centre is the running mean of the points assigned to it), then streamed Lloyd iterations
(assignment in chunks, exact means) until a pass lowers the mean inertia by less than ``tol``. Why our own rather than
scikit-learn's ``MiniBatchKMeans`` (what fairseq's HuBERT recipe uses): it runs on the GPU when there is one (500
centres x 768-d over millions of frames is a few matrix products per batch there, minutes on CPU with sklearn),
needs no extra dependency, streams the assignment pass, and its result is a plain (K, D) tensor saved as
safetensors.

It lives in ``nn/`` (the bottom layer) rather than beside the unit discovery that uses it
(:mod:`speechlab.tasks.units`) so that every k-means of the package can be this one, the codebook initialisation of
:mod:`speechlab.nn.rvq` included, without an import going up the layers.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "KMeans",
    "KMeansConfig",
    "assign",
    "check_finite",
    "kmeans_plus_plus",
    "lloyd_kmeans",
    "squared_distances",
]

log = logging.getLogger(__name__)


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


def lloyd_kmeans(
    samples: Tensor, num_clusters: int, num_iters: int, generator: torch.Generator | None = None
) -> Tensor:
    """k-means++ seeding + ``num_iters`` Lloyd iterations on a small in-memory set (codebook initialisation of
    :mod:`speechlab.nn.rvq`). ``samples: (N, D)`` -> centres ``(num_clusters, D)``.

    At most 65536 rows are used (a random subset: plenty for the statistics, bounded cost on a huge first batch);
    empty clusters keep their centre; with fewer samples than clusters, the samples are repeated. ``generator``
    (default: one seeded from the global RNG, so ``seed_everything`` fixes the result) must be on the CPU.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    if samples.shape[0] > 65536:
        samples = samples[torch.randperm(samples.shape[0], generator=generator)[:65536].to(samples.device)]
    n = samples.shape[0]
    if n <= num_clusters:
        idx = torch.randint(0, n, (num_clusters,), generator=generator).to(samples.device)
        idx[:n] = torch.arange(n, device=samples.device)
        return samples[idx].clone()
    centres = kmeans_plus_plus(samples.cpu(), num_clusters, generator).to(samples.device)
    for _ in range(num_iters):
        labels, _ = assign(samples, centres)
        counts = torch.bincount(labels, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(centres).index_add_(0, labels, samples)
        centres = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centres)
    return centres


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
        if self.centroids is None:
            raise RuntimeError("k-means: nothing to save, call fit() first")
        meta = {"num_clusters": str(self.centroids.shape[0]), "inertia": f"{self.inertia:.6g}"}
        meta.update(metadata or {})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"centroids": self.centroids.detach().cpu().contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> KMeans:
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
