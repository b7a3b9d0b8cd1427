"""Every YAML under ``recipes/*/conf/`` runs as shipped: its strategy, precision, accumulation, LayerDrop, masking.

Each config is rehearsed by ``speechlab fit`` with its own trainer, model and data settings except:

* the model width, shrunk by the one override set :data:`TINY_WIDTH` (depth, dropout, LayerDrop, masking,
  ``feature_grad_mult``, losses and schedules stay as shipped);
* the data: manifests made from the bundled ``data/`` (short espeak utterances with phonemes, text, units and
  languages; the bundled noise clips), two utterances per batch (:data:`MAX_BATCH_SECONDS`), and enough of them
  that every rank completes a whole gradient accumulation within an epoch;
* ``accelerator: cpu``, and **2 processes (gloo)** wherever the config says ``strategy: ddp``; at most
  :data:`MAX_WORKERS` DataLoader workers a process (the shipped counts size a GPU host's cores; workers stay
  workers, started as shipped);
* ``max_steps``: one optimiser update, validation (one batch) every update, then a resume from ``last.ckpt``
  for one more update. DDP ranks start as a cluster starts them (``torchrun`` / SLURM style: every rank at once,
  with ``LOCAL_RANK`` and ``MASTER_PORT`` set), except in the fit of :data:`LAUNCHER_REHEARSAL`, started as
  ``recipes/librispeech/run.sh`` starts every fit (one ``speechlab fit``, whose Lightning starts the second
  rank): the two ways of starting ranks differ only in who starts the processes, not in what a config does;
* ``init_from`` points at the rehearsed run of the config that writes that checkpoint.

A config that cannot run this way is a bug in the config or in the code.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from speechlab.checkpoints.safe_load import load_torch_checkpoint
from speechlab.models.registry import build_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "recipes").glob("*/conf/*.yaml"))
TIMEOUT = 600  # seconds per run; a hang fails the test instead of stalling the suite

# The one override set that shrinks every shipped model in width only.
TINY_ENCODER_WIDTH = {
    "conv_layers": [[32, 10, 5]] + [[32, 3, 2]] * 4 + [[32, 2, 2]] * 2,
    "hidden_size": 32,
    "ffn_size": 64,
    "num_heads": 2,
}
TINY_WIDTH: dict[str, dict[str, Any]] = {
    "speechlab.tasks.ctc.CTCTask": {"encoder_overrides": TINY_ENCODER_WIDTH},
    "speechlab.tasks.wavlm_pretrain.WavLMPretrainTask": {
        "encoder_overrides": TINY_ENCODER_WIDTH,
        "final_dim": 16,
    },
    "speechlab.tasks.unispeech.UniSpeechTask": {
        "encoder_overrides": TINY_ENCODER_WIDTH,
        "model_overrides": {"codevector_dim": 16, "proj_codevector_dim": 16, "num_codevectors_per_group": 16},
    },
    "speechlab.tasks.codec.CodecTask": {
        "codec_overrides": {
            "n_filters": 4,
            "dimension": 16,
            "max_channels": 32,
            "transformer_ffn": 32,
            "codebook_size": 16,
        },
        "discriminator": {"stft_filters": 4, "period_channels": [4, 8, 16, 16, 16]},
    },
}
# Encoders that are not SSL encoders take their own width override (CTCTask's ``encoder`` selects it, or
# UniSpeechTask's ``model`` preset); the UniSpeech fbank one matches fbank_conformer_tiny's, so its fine-tuning
# configs load the rehearsed pretraining checkpoint.
TINY_WIDTH_BY_ENCODER: dict[str, dict[str, Any]] = {
    "fbank_conformer_tiny": {"encoder_overrides": {"hidden_size": 32, "ffn_size": 64, "num_heads": 2}},
    "unispeech_fbank_tiny": {
        "encoder_overrides": {"hidden_size": 32, "ffn_size": 64, "num_heads": 2},
        "model_overrides": {"codevector_dim": 16, "proj_codevector_dim": 16, "num_codevectors_per_group": 16},
    },
}


def tiny_width(model: dict) -> dict[str, Any]:
    """The width override of a config's ``model`` section: by its encoder / model preset, else by its task."""
    init_args = model["init_args"]
    preset = init_args.get("encoder") or init_args.get("model")
    width = TINY_WIDTH_BY_ENCODER.get(preset, TINY_WIDTH[model["class_path"]])
    if model["class_path"] == "speechlab.tasks.codec.CodecTask":  # shrink the codebooks, never grow them
        shipped = build_config(
            "codec", init_args.get("codec", "codec_16khz"), init_args.get("codec_overrides")
        )
        overrides = {**width["codec_overrides"], "codebook_size": min(16, shipped.codebook_size)}
        width = {**width, "codec_overrides": overrides}
    return width


MAX_BATCH_SECONDS = 6.5  # two of the rehearsal's 2-3.2 s utterances
MAX_WORKERS = 2  # DataLoader workers a process (2 CPU cores here)
LAUNCHER_REHEARSAL = "librispeech/wavlm_base_iter1"  # run.sh's first fit


# ------------------------------------------------------------------------------------------------ the data
def _espeak(language: str, count: int, low: float = 2.0, high: float = 3.2) -> list[dict]:
    """``count`` espeak utterances of ``language`` between ``low`` and ``high`` seconds (absolute audio paths)."""
    rows = [json.loads(line) for line in (REPO / "data/espeak/manifest.jsonl").open(encoding="utf-8")]
    chosen = sorted(
        (r for r in rows if r["language"] == language and low <= r["duration"] <= high),
        key=lambda r: r["id"],
    )[:count]
    assert len(chosen) == count, (
        f"the bundled espeak data has too few {language} utterances of {low}-{high} s"
    )
    return [{**r, "audio": str(REPO / "data/espeak" / r["audio"])} for r in chosen]


def _write(path: Path, rows: list[dict], units: int | None = None) -> Path:
    """Write a manifest; ``units``: add made-up unit ids in 0..units-1, one per 20 ms frame (k-means stand-in)."""
    with path.open("w", encoding="utf-8") as f:
        for n, row in enumerate(rows):
            if units is not None:
                frames = int(row["num_samples"]) // 320
                row = {**row, "units": " ".join(str((3 * n + i // 4) % units) for i in range(frames))}
            f.write(json.dumps(row) + "\n")
    return path


def _manifests(folder: Path, utterances: int, units: int | None) -> dict[str, Path]:
    """Train / val / test manifests; train has ``utterances`` 2-3.2 s utterances, English first, 4+ Swahili
    (UniSpeech's unlabeled language), Turkish and Welsh for the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    english = _espeak("en", min(utterances - 4, 41))
    rest = max(0, utterances - 4 - len(english))
    others = _espeak("sw", 4) + _espeak("tr", min(rest, 16)) + _espeak("cy", max(0, rest - 16))
    # Validation and test reuse training utterances: the tokenizers are built from the training manifest, and
    # a rehearsal checks that the run works, not how well it generalises.
    return {
        "train_manifest": _write(folder / "train.jsonl", english + others, units),
        "val_manifest": _write(folder / "val.jsonl", english[:2], units),
        "test_manifest": _write(folder / "test.jsonl", english[2:4], units),
    }


# --------------------------------------------------------------------------------------- the rehearsed config
def _merge(shipped: dict, overrides: dict) -> dict:
    merged = dict(shipped)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _name(path: Path) -> str:
    return f"{path.parent.parent.name}/{path.stem}"


def _producer_of(checkpoint: str) -> Path:
    """The shipped config whose run writes ``checkpoint`` (a ``<default_root_dir>/checkpoints/*.ckpt`` path)."""
    for path in CONFIGS:
        root = yaml.safe_load(path.read_text())["trainer"]["default_root_dir"]
        if checkpoint.startswith(root.rstrip("/") + "/"):
            return path
    raise AssertionError(f"no shipped config writes init_from {checkpoint!r}")


def rehearsal_config(path: Path, work: Path, init_from: Path | None = None) -> tuple[dict, int]:
    """The shipped config with the rehearsal's changes (module docstring) -> (config, number of processes)."""
    config = yaml.safe_load(path.read_text())
    trainer, model, data = config["trainer"], config["model"], config["data"]
    run = work / "run"
    devices = 2 if trainer.get("strategy") == "ddp" else 1
    accumulate = int(trainer.get("accumulate_grad_batches", 1))
    trainer.update(
        default_root_dir=str(run),
        accelerator="cpu",
        devices=devices,
        num_nodes=1,
        max_steps=0,  # set below
        val_check_interval=accumulate,  # batches: validate after the first optimiser step
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model["init_args"] = init_args = _merge(model["init_args"], tiny_width(model))
    if "init_from" in init_args:
        assert init_from is not None, f"{path}: init_from needs its producer's run"
        init_args["init_from"] = str(init_from)
    if init_args.get("mixing", {}).get("noise_manifest"):
        init_args["mixing"]["noise_manifest"] = str(REPO / "data/noise_opensfx/manifest.jsonl")
    data_args = data["init_args"]
    units = init_args.get("num_classes") if data_args.get("units_field") else None
    # Enough batches that every rank makes a whole accumulation before its epoch ends (2 utterances a batch).
    utterances = max(12, 2 * devices * accumulate)
    manifests = _manifests(work / "data", utterances, units=min(units, 50) if units else None)
    for key in [k for k in data_args if k.endswith("_manifest")]:
        data_args[key] = str(manifests[key])
    if "tokenizer_dir" in data_args:
        data_args["tokenizer_dir"] = str(work / "tokenizer")
    if data_args.get("num_workers"):
        data_args["num_workers"] = min(int(data_args["num_workers"]), MAX_WORKERS)
    data_args["max_batch_seconds"] = min(
        float(data_args.get("max_batch_seconds", MAX_BATCH_SECONDS)), MAX_BATCH_SECONDS
    )
    trainer["max_steps"] = _steps(config, 1)
    return config, devices


def _fit(config_path: Path, devices: int, extra: list[str], log: Path, external_ranks: bool) -> None:
    """``speechlab fit --config config_path *extra``; a hang fails within :data:`TIMEOUT` seconds.

    A run on one device runs here, through the entry point the console script calls (:func:`speechlab.cli.main`),
    which saves the ~10 s import of Lightning a process costs; it gets what a subprocess would (one CPU thread,
    the repository as working directory, warnings off), its DataLoader workers are forked from this process as
    they would be from a ``speechlab fit`` process, and the process state is restored after it. A DDP run runs
    as subprocesses in a process group of their own, so that no process outlives the test: one process that
    starts its other ranks itself, or with ``external_ranks`` all ``devices`` ranks at once, as ``torchrun``
    starts them (each rank's import of Lightning then runs beside the others', not after rank 0's).
    """
    argv = ["fit", "--config", str(config_path), *extra]
    if devices == 1:
        code = _fit_here(argv, log)
    else:
        code = _fit_in_subprocesses(argv, log, devices if external_ranks else 1)
    text = log.read_text(errors="replace")
    assert code is not None, (
        f"{config_path.name} ({devices} process(es)) ran past {TIMEOUT} s:\n{text[-4000:]}"
    )
    assert code == 0, f"{config_path.name} ({devices} process(es)) failed:\n{text[-4000:]}"


def _fit_in_subprocesses(argv: list[str], log: Path, ranks: int) -> int | None:
    """Start ``ranks`` processes (more than one: Lightning's environment variables for ranks started from
    outside); the first non-zero exit status, or None when the run was killed after :data:`TIMEOUT` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    if ranks > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0")
    processes: list[subprocess.Popen] = []
    with log.open("ab") as out:
        try:
            for rank in range(ranks):
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "speechlab.cli", *argv],
                        cwd=REPO,
                        env={**env, "LOCAL_RANK": str(rank)} if ranks > 1 else env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        # one process group for the run, led by rank 0: the killpg below ends them all
                        process_group=processes[0].pid if rank else 0,
                    )
                )
            code = _wait_all(processes)
        finally:
            if processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(processes[0].pid, signal.SIGKILL)
            for process in processes:
                process.wait()
    return code


def _wait_all(processes: list[subprocess.Popen]) -> int | None:
    """0 when every process exits 0; the first failure's status as soon as one fails (its peers may be waiting
    for it in a collective); None after :data:`TIMEOUT` seconds."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fit_here(argv: list[str], log: Path) -> int | None:
    """The exit status of ``speechlab.cli.main(argv)`` run in this process, its output appended to ``log``;
    None when it ran past :data:`TIMEOUT` seconds."""
    from speechlab.cli import main

    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"the run took more than {TIMEOUT} s")

    environ, cwd, threads = dict(os.environ), Path.cwd(), torch.get_num_threads()
    alarm = signal.signal(signal.SIGALRM, stop)
    signal.alarm(TIMEOUT)
    try:
        os.chdir(REPO)
        torch.set_num_threads(1)
        with (
            log.open("a", encoding="utf-8") as out,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            try:
                return main(argv)
            except SystemExit as exit_:  # a refused config: the log holds the parser's message
                return exit_.code if isinstance(exit_.code, int) else 1
            except TimeoutError:
                return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        gc.collect()  # the run's DataLoader, and with it its persistent workers, ends here
        os.chdir(cwd)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


_REHEARSED: dict[Path, Path] = {}  # shipped config -> run folder of its rehearsal (producers are reused)


def rehearse(path: Path, tmp_root: Path) -> Path:
    """Fit ``path`` for one step, resume it for one more; return the run folder."""
    if path in _REHEARSED:
        return _REHEARSED[path]
    shipped = yaml.safe_load(path.read_text())
    init_from = shipped["model"]["init_args"].get("init_from")
    producer_ckpt = None
    if init_from is not None:
        producer_run = rehearse(_producer_of(init_from), tmp_root)
        producer_ckpt = producer_run / "checkpoints" / Path(init_from).name
    work = tmp_root / _name(path).replace("/", "-")
    config, devices = rehearsal_config(path, work, producer_ckpt)
    config_path = work / "rehearsal.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = work / "fit.log"
    _fit(config_path, devices, [], log, external_ranks=_name(path) != LAUNCHER_REHEARSAL)
    last = work / "run" / "checkpoints" / "last.ckpt"
    assert load_torch_checkpoint(last)["global_step"] == _steps(config, 1), log.read_text()[-3000:]
    resume = ["--trainer.max_steps", str(_steps(config, 2)), "--ckpt_path", "last"]
    _fit(config_path, devices, resume, log, external_ranks=True)
    assert load_torch_checkpoint(last)["global_step"] == _steps(config, 2), log.read_text()[-3000:]
    _REHEARSED[path] = work / "run"
    return work / "run"


def _steps(config: dict, batches: int) -> int:
    """Lightning's ``global_step`` after that many optimiser updates: the codec GAN steps two optimisers per
    batch (one during its reconstruction-only warm-up)."""
    init_args = config["model"]["init_args"]
    gan = config["model"]["class_path"].endswith("CodecTask") and not init_args.get("adversarial_start_step")
    return batches * (2 if gan else 1)


@pytest.fixture(scope="module")
def rehearsal_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rehearsal")


def test_every_shipped_config_is_rehearsed_and_every_model_has_a_width_override():
    assert len(CONFIGS) >= 16
    classes = {yaml.safe_load(p.read_text())["model"]["class_path"] for p in CONFIGS}
    assert classes <= set(TINY_WIDTH), classes - set(TINY_WIDTH)
    (launched,) = [p for p in CONFIGS if _name(p) == LAUNCHER_REHEARSAL]
    assert yaml.safe_load(launched.read_text())["trainer"]["strategy"] == "ddp", (
        "Lightning's launcher must run"
    )


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_shipped_config_fits_and_resumes(path, rehearsal_root):
    run = rehearse(path, rehearsal_root)
    logged = "".join(p.read_text() for p in sorted((run / "logs").glob("version_*/metrics.csv")))
    assert "val/" in logged, "validation never ran"
