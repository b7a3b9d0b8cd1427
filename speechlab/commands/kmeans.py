"""``speechlab kmeans``: HuBERT-style k-means unit targets for manifests (see :mod:`speechlab.tasks.units`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import Tensor

from speechlab.api import find_encoder, load
from speechlab.commands import common
from speechlab.data.manifest import read_manifest, write_manifest
from speechlab.nn.kmeans import KMeans, KMeansConfig, check_finite
from speechlab.tasks.units import SAMPLE_RATE, hidden_layer_features, iterate_features, mfcc_frame_features

log = logging.getLogger(__name__)

# The KMeansConfig fields offered as options (``--num-clusters`` ...): field -> help.
KMEANS_OPTIONS = {
    "num_clusters": "k (HuBERT: 100 on MFCC, 500 on layer 6)",
    "batch_size": "mini-batch size (frames)",
    "max_iter": "maximum Lloyd iterations after the mini-batch pass (each one pass over the fit frames)",
    "init_sample": "frames seen by the k-means++ init",
    "tol": "stop when a pass lowers the mean inertia by less than this fraction",
    "seed": "seed for sampling and k-means",
}


def _output_name(manifest: Path) -> str:
    return manifest.parent.name if manifest.stem == "manifest" else manifest.stem


def run(args: argparse.Namespace) -> int:
    """``speechlab kmeans``: fit (or load) centroids, write one manifest with ``units`` per input manifest."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    device = torch.device(common.select_device(args))
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
        # any source speechlab.load reads (a WavLM pretraining .ckpt, our pretrained dir, a Hugging Face WavLM /
        # HuBERT / wav2vec2 dir, a unilm/fairseq .pt): one reader, so every source goes through the same config
        # limits and weight checks before a model is built
        encoder = find_encoder(load(args.checkpoint)).to(device).eval()
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
        config = KMeansConfig(**{name: getattr(args, name) for name in KMEANS_OPTIONS})
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
    parser = common.add_command(
        subparsers,
        "kmeans",
        run,
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
    defaults = KMeansConfig()
    for name, help in KMEANS_OPTIONS.items():  # type and default: KMeansConfig's
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=help)
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
    common.add_device_arguments(parser, default="auto")
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
