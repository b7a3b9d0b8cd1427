"""The README's main job, ``bash recipes/mini/run.sh``, runs end to end — every stage, the background anchor, the
timings and the results table — on the shipped mini configs shrunk in width and steps only (the same shrinking
as the shipped-config rehearsal, :mod:`tests.test_recipe_configs`); so do the README's other ``run.sh`` commands
(a rerun of stages 2-4, the separate stages 9, 10 and 11), in the same shrunk tree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_recipe_configs import MAX_BATCH_SECONDS, _merge, tiny_width

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "recipes" / "mini"


def _shrunk(config: dict) -> dict:
    """The shipped config with the rehearsal's tiny width, 4 steps validated every 2, small batches."""
    config["model"]["init_args"] = init_args = _merge(
        config["model"]["init_args"], tiny_width(config["model"])
    )
    if "adversarial_start_step" in init_args:
        init_args["adversarial_start_step"] = 2  # the codec: 2 reconstruction batches, then the GAN
    config["trainer"].update(
        max_steps=6, val_check_interval=2, log_every_n_steps=1, enable_progress_bar=False
    )
    data = config["data"]["init_args"]
    data["max_batch_seconds"] = min(
        float(data.get("max_batch_seconds", MAX_BATCH_SECONDS)), MAX_BATCH_SECONDS
    )
    return config


def _shrunk_tree(tmp_path: Path) -> Path:
    """A tree shaped like the checkout (run.sh works from the repository root) with the shrunk mini configs."""
    root = tmp_path / "repo"
    (root / "recipes" / "mini" / "conf").mkdir(parents=True)
    (root / "data").symlink_to(REPO / "data")
    shutil.copy(MINI / "run.sh", root / "recipes" / "mini")
    shutil.copy(MINI / "prepare.py", root / "recipes" / "mini")
    shutil.copytree(MINI / "local", root / "recipes" / "mini" / "local")
    for path in (MINI / "conf").glob("*.yaml"):
        config = _shrunk(yaml.safe_load(path.read_text()))
        (root / "recipes" / "mini" / "conf" / path.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # speechlab of this venv
        "ANCHOR_CPU_MINUTES": "0.01",
        "PYTHONWARNINGS": "ignore",
    }


def _run_sh(root: Path, *args: str, env: dict[str, str], timeout: float) -> str:
    """``bash recipes/mini/run.sh ARGS`` of the shrunk tree ``root``, run from its parent; its stdout."""
    command = ["bash", str(root / "recipes" / "mini" / "run.sh"), *args]
    done = subprocess.run(command, cwd=root.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-5000:])
    return done.stdout


@pytest.mark.slow
def test_the_main_job_runs_every_stage_and_writes_the_results_table(tmp_path):
    root = _shrunk_tree(tmp_path)
    env = _env()
    stdout = _run_sh(root, env=env, timeout=1500)
    exp = root / "recipes" / "mini" / "exp"
    for stage in range(9):
        assert f"=== stage {stage}:" in stdout, stage
    stages = [line.split("\t")[0] for line in (exp / "timings.tsv").read_text().splitlines()]
    assert set(stages) == {*map(str, range(9)), "total"}, stages
    results = (exp / "results.md").read_text()
    assert results == stdout[stdout.index("# Mini recipe results") :].strip() + "\n"
    for section in ("Phoneme CTC on espeak English", "UniSpeech", "Codec on held-out LJ Speech"):
        assert section in results, section
    assert "missing" not in results, results
    assert "anchor: fbank + BiLSTM" in results and "| total | the whole job |" in results
    assert results.count("met: ") + results.count("**not met**: ") >= 6, results  # every claim is a check
    for run in ("ctc_phoneme_fbank", "wavlm_fbank", "wavlm_ctc_phoneme_fbank", "codec"):
        assert (exp / "plots" / f"{run}.png").stat().st_size > 1000, run
    assert (exp / "ctc_phoneme_fbank" / "test_transcripts.jsonl").read_text().count("\n") == 12
    levels = (exp / "codec" / "levels.txt").read_text()
    assert "n_q 4" in levels and "unquantized" in levels and levels.split("\n", 1)[1] in results, levels

    # stage 9 (separate): the two CTC models on speech data/ does not hold, here 3 English items of a stand-in corpus
    corpora = tmp_path / "corpora"
    (corpora / "espeak").mkdir(parents=True)
    english = [
        json.loads(line) for line in (REPO / "data" / "espeak" / "manifest.jsonl").open(encoding="utf-8")
    ]
    english = [it for it in english if it["language"] == "en"][:3]
    unseen = [
        {**it, "id": f"{it['id']}-unseen", "audio": str(REPO / "data" / "espeak" / it["audio"])}
        for it in english
    ]
    (corpora / "espeak" / "manifest.jsonl").write_text("".join(json.dumps(it) + "\n" for it in unseen))
    env = {**env, "CORPORA": str(corpora)}
    _run_sh(root, "--stage", "9", "--stop-stage", "9", env=env, timeout=600)
    table = (exp / "unseen.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.endswith(" | 3 |")]
    assert len(rows) == 2 and table.count("unseen PER") >= 3, table

    # the README's other commands: a rerun of stages 2-4 (every fit resumes its finished run), the separate
    # stages 10 (seeds) and 11 (UniSpeech table), then stage 9 again, which now finds the seeds' models too
    def stage(first: int, last: int) -> str:
        return _run_sh(root, "--stage", str(first), "--stop-stage", str(last), env=env, timeout=1200)

    assert "=== stage 4:" in stage(2, 4)
    stage(10, 10)
    seeds = (exp / "seeds" / "results.md").read_text()
    assert "| model | seed 0 | seed 1 | seed 2 | mean ± sd |" in seeds and seeds.count(" ± ") >= 6, seeds
    stage(11, 11)
    table = (exp / "unispeech_table" / "results.md").read_text()
    for row in (
        "(a) CTC from scratch",
        "(b) contrastive-only",
        "(c) multitask, swap 0",
        "(d) UniSpeech, swap 0.5",
    ):
        assert f"| {row}" in table, (row, table)
    stage(9, 9)
    table = (exp / "unseen.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.endswith(" | 3 |")]
    assert len(rows) == 6, table


# The fit() of the README's diagnosis block, as printed there; the test swaps in one that also shrinks the run.
README_FIT = (
    "fit() { OMP_NUM_THREADS=1 speechlab fit --config recipes/mini/conf/$1.yaml "
    '--trainer.default_root_dir /tmp/$2 "${@:3}"; }'
)


def _diagnosis_block() -> str:
    """The bash block under the mini README's "Why `wavlm_tiny` sits on the blank plateau" table."""
    readme = (MINI / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Why `wavlm_tiny` sits on the blank plateau**") :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("\n```", start)]


@pytest.mark.slow
def test_the_readme_diagnosis_commands_run(tmp_path):
    """Every run D0-D7 of the README's table is a command of its block that trains and validates (2 steps each,
    the README's own overrides kept: they come before the shrinking ones)."""
    block = _diagnosis_block()
    assert block.startswith(README_FIT + "\n"), block.splitlines()[0]
    runs = tmp_path / "runs"
    shrink = "--trainer.max_steps 2 --trainer.val_check_interval 1 --trainer.limit_val_batches 1"
    fit = (
        f"fit() {{ OMP_NUM_THREADS=1 speechlab fit --config recipes/mini/conf/$1.yaml "
        f'--trainer.default_root_dir {runs}/$2 "${{@:3}}" {shrink}; }}'
    )
    root = _shrunk_tree(tmp_path)
    script = "set -euo pipefail\nbash recipes/mini/run.sh --stage 0 --stop-stage 0\n" + block.replace(
        README_FIT, fit
    )
    done = subprocess.run(
        ["bash", "-c", script], cwd=root, env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-5000:])
    names = sorted(line.split()[2] for line in block.splitlines()[1:] if line.startswith("fit "))
    assert names == [f"d{i}" for i in range(8)], names
    for name in names:
        assert list((runs / name / "checkpoints").glob("*.ckpt")), name


def _commands(bash: str) -> list[str]:
    """The commands of a bash snippet, continuation lines joined, comments (also after a command) and blank lines
    dropped."""
    joined = bash.replace("\\\n", " ")
    lines = (re.sub(r"\s#\s.*$", "", line) for line in joined.splitlines())
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _readme_block(heading: str) -> list[str]:
    """The commands of the first bash block under ``heading`` in the mini README."""
    readme = (MINI / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(heading) :]
    start = section.index("```bash\n") + len("```bash\n")
    return _commands(section[start : section.index("\n```", start)])


# run.sh's helpers and variables as the README spells them out
_AS_PRINTED = {
    "OMP_NUM_THREADS=$(threads) ": "",
    ' > "$exp/anchor/train.log" 2>&1 &': "",
    '"${ANCHOR_CPU_MINUTES:-12}"': "12",
    "fit $conf/": "speechlab fit --config recipes/mini/conf/",
    "$units": "$exp/wavlm/units_mfcc",
    '"$exp"': "recipes/mini/exp",
    "$exp/": "recipes/mini/exp/",
}


def _stage_commands(stage: int, spelled_out: dict[str, str]) -> list[str]:
    """The commands of run.sh's stage ``stage``, its variables replaced as ``spelled_out`` says, quotes dropped."""
    script = (MINI / "run.sh").read_text(encoding="utf-8")
    text = script[script.index(f"if run {stage}; then") : script.index(f"if run {stage + 1}; then")]
    for variable, value in spelled_out.items():
        text = text.replace(variable, value)
    return _commands(text.replace('"', ""))


def test_the_readme_codec_commands_are_what_stage_6_runs():
    """The mini README's codec block, as printed, is what the main job's stage 6 runs (which the slow main-job
    test executes): the stage's ``fit`` / ``$exp`` / ``$conf`` / thread count spelled out."""
    block = _readme_block("## A codec that uses its codebooks (stage 6)")
    ran = _stage_commands(6, _AS_PRINTED)
    assert len(block) == 2 and all(command in ran for command in block), (block, ran)


def test_the_readme_unseen_speech_commands_are_what_stage_9_runs():
    """The mini README's stage-9 block, as printed, is what run.sh stage 9 runs for the stage-2 model (the slow
    main-job test executes the stage): its ``$corpora`` / ``$exp`` / loop variables spelled out."""
    block = _readme_block("## Unseen English speech (stage 9)")
    ran = _stage_commands(
        9,
        {
            "OMP_NUM_THREADS=2 ": "",
            "$base/$run_dir": "recipes/mini/exp/ctc_phoneme_fbank",
            "$corpora/": "../shared/corpora/",
            "$exp/": "recipes/mini/exp/",
        },
    )
    assert len(block) == 2 and all(command in ran for command in block), (block, ran)


@pytest.mark.parametrize(
    "heading, stages",
    [
        ("## Phoneme CTC from scratch that learns (stage 2) against the anchor (stage 1)", [1, 2]),
        ("## WavLM-style pretraining, then fine-tuning (stages 3-4)", [3, 4]),
        ("## UniSpeech on the bundled espeak corpus (stage 5; the table: stage 11)", [5, 11]),
    ],
)
def test_the_readme_stage_blocks_are_what_run_sh_runs(heading, stages):
    """Each section's bash block is what those run.sh stages run (the slow main-job test executes them)."""
    ran = []
    for stage in stages:
        commands = _stage_commands(stage, _AS_PRINTED)
        # test_best X = speechlab test --config X --ckpt_path best
        ran += [
            re.sub(
                r"^test_best \$conf/(\S+)",
                r"speechlab test --config recipes/mini/conf/\1 --ckpt_path best",
                c,
            )
            for c in commands
        ]
    block = _readme_block(heading)
    assert len(block) >= 3 and all(command in ran for command in block), (block, ran)
