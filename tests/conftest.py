"""Shared test fixtures: the bundled corpora in data/ and a builder for small throw-away corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The bundled corpora folder (``data/``)."""
    return DATA


@pytest.fixture(scope="session")
def espeak_manifest() -> Path:
    """``data/espeak/manifest.jsonl``: synthetic en/sw/tr/cy speech with ``text`` and ``phonemes``."""
    return DATA / "espeak" / "manifest.jsonl"


@pytest.fixture(scope="session")
def ljspeech_manifest() -> Path:
    """``data/ljspeech_en/manifest.jsonl``: real English read speech with ``text``."""
    return DATA / "ljspeech_en" / "manifest.jsonl"


@pytest.fixture(scope="session")
def noise_manifest() -> Path:
    """``data/noise_opensfx/manifest.jsonl``: noise clips (``text`` is empty)."""
    return DATA / "noise_opensfx" / "manifest.jsonl"


def sine(seconds: float, sample_rate: int, frequency: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    """(samples,) float32 sine wave."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


class TmpCorpus:
    """Writes small audio files and a manifest into a temporary folder.

    ``add(...)`` writes one file under ``root/audio/`` and remembers its manifest line (``audio`` relative to
    ``root``); ``write()`` writes ``root/manifest.jsonl`` from the remembered lines, or from explicit lines
    (dicts are JSON-encoded, ``str`` written as they are, ``bytes`` written raw).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "audio").mkdir(parents=True, exist_ok=True)
        self.lines: list[dict] = []

    def audio_file(
        self,
        name: str,
        signal: np.ndarray | None = None,
        *,
        seconds: float = 0.5,
        sample_rate: int = 16000,
        frequency: float = 440.0,
        subtype: str | None = None,
    ) -> Path:
        """Write ``signal`` ((samples,) or (samples, channels)) or a sine to ``audio/<name>``; format from suffix."""
        if signal is None:
            signal = sine(seconds, sample_rate, frequency)
        path = self.root / "audio" / name
        sf.write(path, signal, sample_rate, subtype=subtype)
        return path

    def add(
        self,
        id: str,
        *,
        seconds: float = 0.5,
        sample_rate: int = 16000,
        text: str | None = "hello world",
        signal: np.ndarray | None = None,
        suffix: str = ".flac",
        **fields,
    ) -> dict:
        path = self.audio_file(f"{id}{suffix}", signal, seconds=seconds, sample_rate=sample_rate)
        frames = sf.info(str(path)).frames
        line = {
            "id": id,
            "audio": f"audio/{path.name}",
            "duration": round(frames / sample_rate, 3),
            "sample_rate": sample_rate,
            "num_samples": frames,
        }
        if text is not None:
            line["text"] = text
        line.update(fields)
        self.lines.append(line)
        return line

    def write(self, lines: list[dict | str | bytes] | None = None, name: str = "manifest.jsonl") -> Path:
        path = self.root / name
        with open(path, "wb") as out:
            for line in self.lines if lines is None else lines:
                if isinstance(line, dict):
                    line = json.dumps(line, ensure_ascii=False)
                if isinstance(line, str):
                    line = line.encode("utf-8")
                out.write(line + b"\n")
        return path


@pytest.fixture
def tmp_corpus(tmp_path: Path) -> TmpCorpus:
    """A :class:`TmpCorpus` in a fresh temporary folder."""
    return TmpCorpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def make_sine():
    """The :func:`sine` helper: ``make_sine(seconds, sample_rate, frequency=440.0, amplitude=0.5)``."""
    return sine


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 threads per process run ~10x slower under load.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
