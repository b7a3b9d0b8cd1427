"""Audio: listing and reading files (soundfile decode, segment reads, mono mix-down), resampling, MFCC features.

One function each: :func:`list_audio_files` finds the audio files of a folder, :func:`audio_info` reads only the
header, :func:`load_audio` reads (a segment of) a file and returns a mono float32 tensor at the requested rate,
:func:`resample` changes the rate with bounded memory, :func:`mfcc_features` computes 39-d MFCC + deltas.
Every failure is an :class:`AudioError` that names the file, says what is wrong and what to do, so a bad file
never surfaces as an obscure crash inside a worker.

Sanity checks at read time (:func:`check_header` for what the header says, and the decoded samples in
:func:`load_audio`): a sample rate outside [``MIN_SAMPLE_RATE``, ``MAX_SAMPLE_RATE``], a WAV whose data chunk is
cut short of the length its header declares, NaN/inf samples, and samples beyond ``MAX_ABS_SAMPLE`` (float files
written on the integer PCM scale, or garbage) are errors; a rate pair whose sinc kernel would be huge (16001 Hz
to 16 kHz needs ~5 GB with torchaudio) is resampled by a polyphase filter of bounded size instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi
import torchaudio.functional as AF

__all__ = [
    "AUDIO_EXTENSIONS",
    "MAX_ABS_SAMPLE",
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "AudioError",
    "as_waveform",
    "audio_info",
    "check_header",
    "list_audio_files",
    "load_audio",
    "mfcc_features",
    "resample",
]

# What a folder search counts as audio (every tool that takes --input-dir / a folder): the formats soundfile
# (libsndfile >= 1.1) decodes.
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".mp3", ".opus", ".aiff", ".aif")

MIN_SAMPLE_RATE = 1000  # below: not speech audio (a 1 Hz header would turn 3 KB into 64M samples at 16 kHz)
MAX_SAMPLE_RATE = 768_000
MAX_ABS_SAMPLE = 100.0  # float audio is nominally in [-1, 1]; far beyond is integer-scale PCM or garbage
# torchaudio's sinc kernel has new * (orig + 2 * width) elements for the gcd-reduced rates (a few copies are live
# at once); up to this many it is used (44.1 kHz -> 16 kHz: 76k), beyond it a bounded polyphase filter is.
MAX_SINC_KERNEL_ELEMENTS = 4_000_000
# WAV subtypes whose data chunk size gives the frame count: bytes per sample.
_WAV_SAMPLE_BYTES = {
    "PCM_U8": 1,
    "PCM_S8": 1,
    "ULAW": 1,
    "ALAW": 1,
    "PCM_16": 2,
    "PCM_24": 3,
    "PCM_32": 4,
    "FLOAT": 4,
    "DOUBLE": 8,
}


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


@contextlib.contextmanager
def _decoding(path: Path, problem: str, remedy: str) -> Iterator[None]:
    """soundfile's errors while decoding ``path`` as one :class:`AudioError`: ``problem`` (formatted with the
    error as ``{err}``) and ``remedy``; a permission error says so."""
    try:
        yield
    except PermissionError as err:
        raise AudioError(path, f"permission denied ({err})", "fix the file permissions (chmod a+r)") from err
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise AudioError(path, problem.format(err=err), remedy) from err


def _open_info(path: Path) -> sf._SoundFileInfo:
    _check_file(path)
    with _decoding(
        path,
        "cannot decode audio header ({err})",
        "the file is corrupt or not audio; convert it to FLAC/WAV (e.g. with ffmpeg) or remove it",
    ):
        return sf.info(str(path))


def _wav_declared_frames(path: Path, channels: int, subtype: str) -> int | None:
    """Frames the WAV ``data`` chunk header declares, or None when unknown (streamed WAVs write 0 / 0xFFFFFFFF)."""
    sample_bytes = _WAV_SAMPLE_BYTES.get(subtype)
    if sample_bytes is None:
        return None
    with path.open("rb") as handle:
        riff = handle.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None  # RF64 / W64 / other containers: libsndfile's count is all we have
        for _ in range(64):  # a WAV has a handful of chunks before its data
            chunk = handle.read(8)
            if len(chunk) < 8:
                return None
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                return None if size in (0, 0xFFFFFFFF) else size // (sample_bytes * channels)
            handle.seek(size + (size & 1), os.SEEK_CUR)
    return None


def check_header(path: str | os.PathLike, info: sf._SoundFileInfo) -> None:
    """Refuse a header that is not trustworthy audio: rate outside the bounds, no channels, a cut-short WAV.

    Raises:
        AudioError: naming the file, what the header says and what to do.
    """
    rate, channels = int(info.samplerate), int(info.channels)
    if channels <= 0 or rate <= 0:
        raise AudioError(path, f"invalid header (rate={rate}, channels={channels})", "re-encode it")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            path,
            f"header sample rate {rate} Hz is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz; the header is "
            "corrupt or the file is not speech audio",
            "re-encode it with its true rate (e.g. ffmpeg -i in -ar 16000 out.flac) or drop it",
        )
    if info.format in ("WAV", "WAVEX"):
        declared = _wav_declared_frames(Path(path), channels, info.subtype)
        if declared is not None and declared > info.frames:
            raise AudioError(
                path,
                f"the WAV header declares {declared} frames but the file holds {info.frames}; it is truncated",
                "re-create or re-download the file, or remove it from the manifest",
            )


READ_BLOCK_FRAMES = 1 << 22  # 4M frames (~4 min at 16 kHz) per read of a long file


def _read_frames(path: Path, start: int, frames: int) -> np.ndarray:
    """(frames_read, channels) float32 from ``start``. soundfile allocates what it is asked for up front, and a
    corrupt header can promise days of audio in a few KB (a FLAC STREAMINFO of 2^35 samples -> 137 GB), so long
    reads go block by block and stop where the data ends: memory follows the audio actually present."""
    if frames <= READ_BLOCK_FRAMES:
        return sf.read(str(path), start=start, frames=frames, dtype="float32", always_2d=True)[0]
    blocks = []
    with sf.SoundFile(str(path)) as handle:
        if start:
            handle.seek(start)
        while frames > 0:
            block = handle.read(min(frames, READ_BLOCK_FRAMES), dtype="float32", always_2d=True)
            blocks.append(block)
            frames -= block.shape[0]
            if block.shape[0] < min(frames + block.shape[0], READ_BLOCK_FRAMES):
                break  # the data ended before the header said it would
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]


def list_audio_files(folder: str | os.PathLike, extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> list[Path]:
    """Every audio file under ``folder`` (recursive, sorted; the suffix compared case-insensitively).

    Raises ``FileNotFoundError`` naming the folder when it does not exist or holds no such file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(f"{folder}: no audio files ({', '.join(extensions)}) in this folder")
    return files


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Header-only metadata of an audio file.

    Returns:
        (sample_rate, num_frames, channels).

    Raises:
        AudioError: missing, empty, unreadable or non-audio file, or a header :func:`check_header` refuses.
    """
    info = _open_info(Path(path))
    check_header(path, info)
    return int(info.samplerate), int(info.frames), int(info.channels)


def sinc_kernel_elements(orig_rate: int, new_rate: int) -> int:
    """Elements of torchaudio's sinc resampling kernel for this rate pair (default width 6, rolloff 0.99)."""
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))
    return new * (orig + 2 * width)


def resample(samples: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """samples: (..., time) float -> (..., time * new_rate / orig_rate) at ``new_rate``, with bounded memory.

    ``torchaudio.functional.resample`` for the usual rate pairs. Its kernel grows with the gcd-reduced rates
    (16001 -> 16000 Hz: 16000 x 16013, ~5 GB of temporaries), so beyond ``MAX_SINC_KERNEL_ELEMENTS`` a polyphase
    FIR (``scipy.signal.resample_poly``, about ``20 * max(up, down)`` taps) is used: exact ratio, memory linear in
    the rates.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return samples
    if sinc_kernel_elements(orig_rate, new_rate) <= MAX_SINC_KERNEL_ELEMENTS:
        return AF.resample(samples, orig_rate, new_rate)
    from scipy.signal import resample_poly

    g = math.gcd(orig_rate, new_rate)
    out = resample_poly(samples.detach().cpu().numpy(), new_rate // g, orig_rate // g, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(samples.device)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    offset: float = 0.0,
    duration: float | None = None,
) -> torch.Tensor:
    """Read a file (or a segment of it) as mono float32 at ``sample_rate``.

    Only the requested segment is decoded (soundfile ``start``/``frames``). Multichannel audio is mixed down by
    the mean over channels; a file at another rate is resampled with :func:`resample`.

    Args:
        path: FLAC, WAV, OGG or any other format libsndfile decodes.
        sample_rate: output rate in Hz.
        offset: start of the segment, seconds from the beginning of the file.
        duration: length of the segment in seconds; ``None`` reads to the end of the file. A segment that runs
            past the end of the file is cut at the end (the manifest reader flags such durations).

    Returns:
        samples: (samples,) float32, nominally in [-1, 1].

    Raises:
        AudioError: missing, empty, unreadable, corrupt or truncated file, non-audio bytes, a header
            :func:`check_header` refuses, NaN/inf samples or samples beyond ``MAX_ABS_SAMPLE``, an offset at or
            beyond the end of the file, or a segment with no samples.
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
    check_header(path, info)
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
    with _decoding(
        path,
        "cannot decode audio data ({err}); the file is probably truncated or corrupt",
        "re-create or re-download the file, or remove it from the manifest",
    ):
        data = _read_frames(path, start, (num_frames - start) if frames < 0 else frames)
    expected = (num_frames - start) if frames < 0 else frames
    if data.shape[0] < expected:
        raise AudioError(
            path,
            f"decoded {data.shape[0]} samples but the header promises {expected}; the file is truncated",
            "re-create or re-download the file, or remove it from the manifest",
        )
    peak = float(max(data.max(), -data.min()))  # no copy; NaN when any sample is NaN, inf when any is inf
    if not math.isfinite(peak):
        bad = int((~np.isfinite(data)).sum())
        raise AudioError(path, f"{bad} NaN/inf samples", "re-export the audio; it cannot be trained on")
    if peak > MAX_ABS_SAMPLE:
        bad = int((np.abs(data) > MAX_ABS_SAMPLE).sum())
        raise AudioError(
            path,
            f"{bad} samples beyond +-{MAX_ABS_SAMPLE:g} (peak {peak:.3g}); float audio should lie in [-1, 1]",
            "the file holds integer-scale or corrupt float samples: re-export it normalised (or as 16-bit PCM)",
        )
    samples = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    return resample(samples, file_rate, sample_rate).contiguous()


def as_waveform(
    item: str | os.PathLike | torch.Tensor | np.ndarray, index: int, sample_rate: int, target_rate: int
) -> torch.Tensor:
    """One API input -> a 1-D float32 CPU waveform at ``target_rate``: a path is read with :func:`load_audio`, an
    array or tensor (``sample_rate``) is checked to be 1-D and resampled with :func:`resample` (bounded memory
    for any rate pair). ``index`` names the input in errors."""
    if isinstance(item, str | os.PathLike):
        return load_audio(item, sample_rate=target_rate)
    wave = torch.as_tensor(item)
    if wave.dim() != 1:
        raise ValueError(f"input {index}: expected a 1-D waveform, got shape {tuple(wave.shape)}")
    return resample(wave.detach().to("cpu", torch.float32), sample_rate, target_rate)


def mfcc_features(audio: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """39-d MFCC + deltas at 100 Hz. audio: (samples,) float32 -> (frames_100hz, 39) float32.

    13 Kaldi-compatible MFCCs (``torchaudio.compliance.kaldi.mfcc``: 25 ms window, 10 ms shift, 23 mel bins,
    ``use_energy=False``, no dither) + deltas + delta-deltas: HuBERT's iteration-1 k-means features (Hsu et al.
    2021, §IV-B). Frame ``k`` sees samples ``[160 k, 160 k + 400)`` (``snip_edges``); under 400 samples, no frame.
    """
    if audio.numel() < 400:
        return audio.new_zeros(0, 39)
    mfcc = torchaudio.compliance.kaldi.mfcc(
        audio.reshape(1, -1).float(), sample_frequency=sample_rate, use_energy=False, dither=0.0
    )  # (frames, 13)
    static = mfcc.transpose(0, 1)  # (13, frames)
    delta = AF.compute_deltas(static)
    delta2 = AF.compute_deltas(delta)
    return torch.cat([static, delta, delta2], dim=0).transpose(0, 1).contiguous()
