"""Audio reading: soundfile decode, segment reads, mono mix-down, resampling.

One function each: :func:`audio_info` reads only the header, :func:`load_audio` reads (a segment of) a file
and returns a mono float32 tensor at the requested rate. Every failure is an :class:`AudioError` that names the
file, says what is wrong and what to do, so a bad file never surfaces as an obscure crash inside a worker.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

__all__ = ["AudioError", "audio_info", "load_audio"]


class AudioError(RuntimeError):
    """A file that cannot be used as audio.

    Attributes:
        path: the file.
        reason: what is wrong (one sentence).
        remedy: what to do about it.
    """

    def __init__(self, path: str | os.PathLike, reason: str, remedy: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.remedy = remedy
        message = f"{self.path}: {reason}"
        if remedy:
            message += f" -> {remedy}"
        super().__init__(message)

    def __reduce__(self):  # keep the three fields when the error crosses a DataLoader worker boundary
        return (type(self), (self.path, self.reason, self.remedy))


def _check_file(path: Path) -> None:
    """Missing, not a regular file, unreadable permissions, zero bytes -> AudioError."""
    if not path.exists():
        raise AudioError(
            path, "file does not exist", "check the path (relative paths resolve against the manifest)"
        )
    if not path.is_file():
        raise AudioError(path, "not a regular file", "point the manifest at an audio file, not a folder")
    if not os.access(path, os.R_OK):
        raise AudioError(path, "permission denied (not readable)", "fix the file permissions (chmod a+r)")
    if path.stat().st_size == 0:
        raise AudioError(path, "file is empty (0 bytes)", "re-create or re-download the file, or drop it")


def _open_info(path: Path) -> sf._SoundFileInfo:
    _check_file(path)
    try:
        return sf.info(str(path))
    except PermissionError as err:
        raise AudioError(path, f"permission denied ({err})", "fix the file permissions (chmod a+r)") from err
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise AudioError(
            path,
            f"cannot decode audio header ({err})",
            "the file is corrupt or not audio; convert it to FLAC/WAV (e.g. with ffmpeg) or remove it",
        ) from err


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Header-only metadata of an audio file.

    Returns:
        (sample_rate, num_frames, channels).

    Raises:
        AudioError: missing, empty, unreadable or non-audio file.
    """
    info = _open_info(Path(path))
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(
            path, f"invalid header (rate={info.samplerate}, channels={info.channels})", "re-encode it"
        )
    return int(info.samplerate), int(info.frames), int(info.channels)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    offset: float = 0.0,
    duration: float | None = None,
) -> torch.Tensor:
    """Read a file (or a segment of it) as mono float32 at ``sample_rate``.

    Only the requested segment is decoded (soundfile ``start``/``frames``). Multichannel audio is mixed down by
    the mean over channels; a file at another rate is resampled with ``torchaudio.functional.resample``.

    Args:
        path: FLAC, WAV, OGG or any other format libsndfile decodes.
        sample_rate: output rate in Hz.
        offset: start of the segment, seconds from the beginning of the file.
        duration: length of the segment in seconds; ``None`` reads to the end of the file. A segment that runs
            past the end of the file is cut at the end (the manifest reader flags such durations).

    Returns:
        samples: (samples,) float32, nominally in [-1, 1].

    Raises:
        AudioError: missing, empty, unreadable, corrupt or truncated file, non-audio bytes, NaN/inf samples,
            an offset at or beyond the end of the file, or a segment with no samples.
        ValueError: negative offset/duration or a non-positive sample_rate (a caller bug, not a data problem).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if offset < 0 or not math.isfinite(offset):
        raise ValueError(f"offset must be a finite number >= 0 seconds, got {offset}")
    if duration is not None and (duration < 0 or not math.isfinite(duration)):
        raise ValueError(f"duration must be a finite number >= 0 seconds or None, got {duration}")
    path = Path(path)
    info = _open_info(path)
    file_rate, num_frames = int(info.samplerate), int(info.frames)
    start = int(round(offset * file_rate))
    if num_frames == 0:
        raise AudioError(path, "file has no samples", "remove it from the manifest")
    if start >= num_frames:
        raise AudioError(
            path,
            f"offset {offset:.3f} s is at or beyond the end of the file ({num_frames / file_rate:.3f} s)",
            "fix the item's offset/duration in the manifest",
        )
    frames = -1 if duration is None else min(int(round(duration * file_rate)), num_frames - start)
    if frames == 0:
        raise AudioError(
            path, f"segment at {offset:.3f} s with duration {duration} s has no samples", "fix it"
        )
    try:
        data, _ = sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)
    except PermissionError as err:
        raise AudioError(path, f"permission denied ({err})", "fix the file permissions (chmod a+r)") from err
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise AudioError(
            path,
            f"cannot decode audio data ({err}); the file is probably truncated or corrupt",
            "re-create or re-download the file, or remove it from the manifest",
        ) from err
    expected = (num_frames - start) if frames < 0 else frames
    if data.shape[0] < expected:
        raise AudioError(
            path,
            f"decoded {data.shape[0]} samples but the header promises {expected}; the file is truncated",
            "re-create or re-download the file, or remove it from the manifest",
        )
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(path, f"{bad} NaN/inf samples", "re-export the audio; it cannot be trained on")
    samples = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    if file_rate != sample_rate:
        samples = AF.resample(samples, file_rate, sample_rate)
    return samples.contiguous()
