"""Atomic writes (``speechlab.atomic``): a failed write (here: the file-size limit, as a full disk behaves) is an
error naming the file and the cause, leaves the earlier file intact and no temporary file behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from speechlab.atomic import WriteFailed, atomic_write, write_text

REPO = Path(__file__).resolve().parents[1]


def _run_with_file_size_limit(code: str, limit_bytes: int) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose files may not grow past ``limit_bytes`` (RLIMIT_FSIZE)."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_checkpoint_write_past_the_file_size_limit_is_a_clear_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "last.ckpt"
    code = f"""
        import torch
        from speechlab.atomic import WriteFailed
        from speechlab.train import AtomicCheckpointIO
        io = AtomicCheckpointIO()
        io.save_checkpoint({{"step": torch.tensor(1)}}, {str(target)!r})
        try:
            io.save_checkpoint({{"weights": torch.zeros(2_000_000)}}, {str(target)!r})  # 8 MB
        except WriteFailed as error:
            print("WriteFailed:", error)
        print("step", io.load_checkpoint({str(target)!r})["step"].item())
    """
    done = _run_with_file_size_limit(code, 1_000_000)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"WriteFailed: could not write {target}" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "file-size limit" in done.stdout
    assert "step 1" in done.stdout, "the earlier checkpoint must survive a failed write"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file may be left behind"


def test_a_manifest_write_past_the_file_size_limit_is_a_clear_error(tmp_path):
    target = tmp_path / "big.jsonl"
    code = f"""
        from speechlab.data.manifest import write_manifest
        items = [{{"id": f"u{{i}}", "audio": "a.wav", "duration": 1.0, "text": "x" * 1000}} for i in range(3000)]
        write_manifest({str(target)!r}, items)
    """
    done = _run_with_file_size_limit(code, 500_000)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("speechlab.atomic.WriteFailed: could not write") and str(target) in last, last
    assert not list(tmp_path.iterdir()), "neither a partial manifest nor a temporary file may be left"


def test_an_error_inside_the_block_replaces_nothing_and_is_not_rewritten(tmp_path):
    target = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(ValueError, match="not a write failure"), atomic_write(target) as tmp:
        tmp.write_text("new")
        raise ValueError("not a write failure")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert issubclass(WriteFailed, OSError)
