"""JSON Lines manifests: schema, validated reading, atomic writing.

One utterance per line. Required: ``id`` (str), ``audio`` (path relative to the manifest's folder, or absolute),
``duration`` (seconds). Optional: ``offset`` (seconds into a longer file), ``sample_rate``, ``num_samples``,
``text``, ``phonemes`` (space-separated), ``language``, ``speaker``, ``units`` (space-separated ints or a list of
ints). Unknown fields are kept as they are.

Every problem is found when the manifest is read, not hours later inside a DataLoader worker: with
``on_error="raise"`` the first one is a :class:`ManifestError` naming ``path:line``, the field, what was found and
what to do; with ``on_error="skip"`` bad lines are dropped, counted per reason in a :class:`SkipReport` and
summarised in one ``logging.warning``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechlab.atomic import atomic_write
from speechlab.audio import AudioError, audio_info, load_audio

__all__ = [
    "ManifestError",
    "SkipReport",
    "output_names",
    "read_manifest",
    "write_manifest",
    "REQUIRED_FIELDS",
]

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "audio", "duration")
_STRING_FIELDS = ("text", "phonemes")
_OPTIONAL_STRING_FIELDS = ("language", "speaker")  # str or null
DEFAULT_DURATION_TOLERANCE = (
    0.05  # seconds; manifests round durations to 1 ms, resamplers shift a few samples
)


class ManifestError(ValueError):
    """A bad manifest line. ``str(err)`` reads ``path:line: field 'x': found ... -> remedy``.

    Attributes:
        path: the manifest file.
        line: 1-based line number (``None`` for a problem with the whole file).
        field: the offending field (``None`` when the whole line is bad).
        reason: short machine-readable kind, e.g. ``"missing_file"``, ``"duplicate_id"`` (keys of SkipReport).
        detail: what was found.
        remedy: what to do.
    """

    def __init__(
        self,
        path: str,
        line: int | None,
        field: str | None,
        reason: str,
        detail: str,
        remedy: str,
    ) -> None:
        self.path, self.line, self.field = str(path), line, field
        self.reason, self.detail, self.remedy = reason, detail, remedy
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f"field '{field}': {detail}" if field else detail
        super().__init__(f"{where}: {what} -> {remedy}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.field, self.reason, self.detail, self.remedy))


@dataclass
class SkipReport:
    """What ``read_manifest(..., on_error="skip")`` dropped.

    Attributes:
        counts: reason -> number of skipped lines (reasons as in :attr:`ManifestError.reason`).
        examples: the first ``max_examples`` error messages, for the log.
        lines: non-blank lines read; ``kept`` of them were returned.
        filtered: well-formed lines left out by the ``where`` predicate (not errors).
    """

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    lines: int = 0
    kept: int = 0
    filtered: int = 0
    max_examples: int = 5

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, err: ManifestError) -> None:
        self.counts[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    def summary(self) -> str:
        reasons = (
            " (" + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) + ")" if self.counts else ""
        )
        filtered = f", filtered out {self.filtered}" if self.filtered else ""
        return f"kept {self.kept} of {self.lines} lines{filtered}, skipped {self.skipped}{reasons}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _LineChecker:
    """Validates one parsed line; raises ManifestError (reason keys are SkipReport's)."""

    def __init__(
        self,
        path: Path,
        require: Sequence[str],
        check_audio: str,
        tolerance: float,
        allow_outside: bool,
        validate: Callable[[dict], None] | None = None,
        where: Callable[[dict], bool] | None = None,
    ):
        self.path, self.require, self.check_audio = path, tuple(require), check_audio
        self.validate, self.where = validate, where
        self.tolerance, self.allow_outside = tolerance, allow_outside
        self.root = os.path.abspath(path.parent)
        self.seen: dict[str, int] = {}

    def error(self, line: int, field: str | None, reason: str, detail: str, remedy: str) -> ManifestError:
        return ManifestError(str(self.path), line, field, reason, detail, remedy)

    def check(self, item: Any, line: int) -> dict | None:
        """The validated item with ``audio`` resolved, or None when ``where`` leaves it out."""
        if not isinstance(item, dict):
            raise self.error(
                line,
                None,
                "not_object",
                f"expected a JSON object, found {type(item).__name__}",
                "write one JSON object per line",
            )
        for name in REQUIRED_FIELDS:
            if name not in item:
                raise self.error(
                    line,
                    name,
                    "missing_field",
                    "required field is missing",
                    f"add '{name}' to every line (required: {', '.join(REQUIRED_FIELDS)})",
                )
        self._check_types(item, line)
        if self.where is not None and not self.where(item):
            return None
        for name in self.require:
            value = item.get(name)
            if (
                value is None
                or (isinstance(value, str) and not value.strip())
                or (isinstance(value, list) and not value)
            ):
                found = "missing" if name not in item else f"empty ({value!r})"
                raise self.error(
                    line,
                    name,
                    "empty_field",
                    f"{found}, but this task needs it",
                    f"fill in '{name}' or drop the line (on_error='skip' drops such lines)",
                )
        if item["id"] in self.seen:
            raise self.error(
                line,
                "id",
                "duplicate_id",
                f"id {item['id']!r} already used on line {self.seen[item['id']]}",
                "make ids unique",
            )
        out = dict(item)
        out["audio"] = self._resolve(item["audio"], line)
        if self.check_audio != "none":
            self._check_file(out, line)
        if self.validate is not None:
            try:
                self.validate(out)
            except ValueError as err:
                raise self.error(
                    line,
                    getattr(err, "field", None),
                    getattr(err, "reason", "invalid_value"),
                    getattr(err, "detail", str(err)),
                    getattr(err, "remedy", "fix the line or drop it (on_error='skip')"),
                ) from err
        self.seen[item["id"]] = line
        return out

    def _check_types(self, item: dict, line: int) -> None:
        def bad(name: str, expected: str) -> ManifestError:
            return self.error(
                line,
                name,
                "wrong_type",
                f"expected {expected}, found {item[name]!r}",
                f"write '{name}' as {expected}",
            )

        if not isinstance(item["id"], str) or not item["id"]:
            raise bad("id", "a non-empty string")
        if not isinstance(item["audio"], str) or not item["audio"]:
            raise bad("audio", "a non-empty path string")
        if not _is_number(item["duration"]) or item["duration"] <= 0:
            raise bad("duration", "a positive number of seconds")
        if "offset" in item and (not _is_number(item["offset"]) or item["offset"] < 0):
            raise bad("offset", "a number of seconds >= 0")
        if "sample_rate" in item and (not _is_int(item["sample_rate"]) or item["sample_rate"] <= 0):
            raise bad("sample_rate", "a positive integer (Hz)")
        if "num_samples" in item and (not _is_int(item["num_samples"]) or item["num_samples"] < 0):
            raise bad("num_samples", "an integer >= 0")
        for name in _STRING_FIELDS:
            if name in item and item[name] is not None and not isinstance(item[name], str):
                raise bad(name, "a string")
        for name in _OPTIONAL_STRING_FIELDS:
            if name in item and item[name] is not None and not isinstance(item[name], str):
                raise bad(name, "a string or null")
        units = item.get("units")
        if units is not None:
            if isinstance(units, str):
                ok = all(tok.lstrip("-").isdigit() for tok in units.split())
            else:
                ok = isinstance(units, list) and all(_is_int(u) for u in units)
            if not ok:
                raise bad("units", "space-separated integers or a list of integers")

    def _resolve(self, audio: str, line: int) -> str:
        if os.path.isabs(audio):
            return os.path.normpath(audio)
        resolved = os.path.normpath(os.path.join(self.root, audio))
        if not self.allow_outside and os.path.commonpath([self.root, resolved]) != self.root:
            raise self.error(
                line,
                "audio",
                "outside_root",
                f"relative path {audio!r} leaves the manifest's folder {self.root}",
                "use an absolute path, move the audio under the manifest's folder, "
                "or pass allow_outside=True",
            )
        return resolved

    def _check_file(self, item: dict, line: int) -> None:
        path = item["audio"]
        if not os.path.isfile(path):
            raise self.error(
                line,
                "audio",
                "missing_file",
                f"file {path} does not exist",
                "fix the path (relative paths resolve against the manifest's folder) or drop the line",
            )
        if not os.access(path, os.R_OK):
            raise self.error(
                line,
                "audio",
                "unreadable_file",
                f"file {path} is not readable (permissions)",
                "fix the permissions (chmod a+r) or drop the line",
            )
        if self.check_audio != "header":
            return
        try:
            rate, frames, _ = audio_info(path)
        except AudioError as err:
            raise self.error(
                line, "audio", "unreadable_audio", err.reason, err.remedy or "drop the line"
            ) from err
        file_seconds = frames / rate
        if "sample_rate" in item and item["sample_rate"] != rate:
            raise self.error(
                line,
                "sample_rate",
                "sample_rate_mismatch",
                f"{item['sample_rate']} but the file is {rate} Hz",
                "correct 'sample_rate' (the file's own rate; resampling happens when loading)",
            )
        offset = float(item.get("offset", 0.0))
        if "offset" not in item and "num_samples" in item and item["num_samples"] != frames:
            raise self.error(
                line,
                "num_samples",
                "duration_mismatch",
                f"{item['num_samples']} but the file has {frames} samples",
                "regenerate the manifest from the audio (or correct 'num_samples')",
            )
        if offset >= file_seconds:
            raise self.error(
                line,
                "offset",
                "duration_mismatch",
                f"{offset} s is beyond the end of the file ({file_seconds:.3f} s)",
                "fix 'offset'",
            )
        end = offset + float(item["duration"])
        if "offset" in item:
            ok = end <= file_seconds + self.tolerance
            detail = f"offset {offset} + duration {item['duration']} runs past the file's end ({file_seconds:.3f} s)"
        else:
            ok = abs(float(item["duration"]) - file_seconds) <= self.tolerance
            detail = f"{item['duration']} s but the file lasts {file_seconds:.3f} s"
        if not ok:
            raise self.error(
                line,
                "duration",
                "duration_mismatch",
                f"{detail} (tolerance {self.tolerance} s)",
                "regenerate the manifest from the audio (durations drive batching and filtering)",
            )


def read_manifest(
    path: str | os.PathLike,
    *,
    require: Sequence[str] = (),
    on_error: str = "raise",
    check_audio: str = "header",
    duration_tolerance: float = DEFAULT_DURATION_TOLERANCE,
    allow_outside: bool = False,
    report: SkipReport | None = None,
    validate: Callable[[dict], None] | None = None,
    where: Callable[[dict], bool] | None = None,
) -> list[dict]:
    """Read and validate a JSON Lines manifest.

    Args:
        path: the manifest file (UTF-8, one JSON object per line; blank lines are ignored).
        require: optional fields that must be present and non-empty for this use (e.g. ``("text",)`` for ASR).
        on_error: ``"raise"`` stops at the first bad line with a :class:`ManifestError`; ``"skip"`` drops bad
            lines, counts them in ``report`` and logs a one-line warning.
        check_audio: ``"header"`` opens every file's header (exists, readable, decodable, duration and rate agree;
            ~0.15 ms per FLAC), ``"exists"`` only checks that the file exists and is readable, ``"none"`` checks
            nothing on disk.
        duration_tolerance: seconds the manifest ``duration`` may differ from the file's.
        allow_outside: accept relative ``audio`` paths that leave the manifest's folder (``../x.flac``).
            Absolute paths are always accepted.
        report: a :class:`SkipReport` to fill (create one to see what was skipped).
        validate: an extra check per item (after the built-in ones), e.g. that a tokenizer can encode the text.
            A ``ValueError`` it raises becomes a ManifestError for that line, with the error's ``field`` and
            ``reason`` attributes when it has them (``UnknownUnitError`` has: reason ``"unknown_unit"``).
        where: a filter (e.g. duration or language): lines for which it returns False are left out before the
            remaining checks (so a filtered-out line may lack fields that ``require`` asks for), and counted in
            ``report.filtered``. It sees the item after the schema and type checks.

    Returns:
        the items, in file order, as dicts with all their fields; ``audio`` is an absolute path.

    Raises:
        ManifestError: with ``on_error="raise"``, the first bad line; in any mode, a missing or unreadable
            manifest file.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if check_audio not in ("header", "exists", "none"):
        raise ValueError(f"check_audio must be 'header', 'exists' or 'none', got {check_audio!r}")
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            str(path),
            None,
            None,
            "missing_manifest",
            "manifest file does not exist",
            "check the path in your config",
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ManifestError(
            str(path), None, None, "unreadable_manifest", f"cannot read it ({err})", "fix permissions"
        ) from err
    report = report if report is not None else SkipReport()
    checker = _LineChecker(path, require, check_audio, duration_tolerance, allow_outside, validate, where)
    items: list[dict] = []
    for number, raw_line in enumerate(raw.splitlines(), start=1):
        if not raw_line.strip():
            continue
        report.lines += 1
        try:
            item = checker.check(_parse_line(path, number, raw_line), number)
        except ManifestError as err:
            if on_error == "raise":
                raise
            report.add(err)
            continue
        if item is None:
            report.filtered += 1
        else:
            items.append(item)
    report.kept = len(items)
    if report.skipped:
        log.warning("manifest %s: %s; first: %s", path, report.summary(), report.examples[0])
    return items


def _parse_line(path: Path, number: int, raw_line: bytes) -> Any:
    try:
        text = raw_line.decode("utf-8-sig" if number == 1 else "utf-8")  # tolerate a BOM (Windows editors)
    except UnicodeDecodeError as err:
        raise ManifestError(
            str(path),
            number,
            None,
            "not_utf8",
            f"bytes that are not UTF-8 at column {err.start + 1} ({raw_line[err.start : err.end]!r})",
            "re-encode the manifest as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ManifestError(
            str(path),
            number,
            None,
            "malformed_json",
            f"invalid JSON ({err.msg} at column {err.colno}): {text[:80]!r}",
            "write exactly one JSON object per line",
        ) from err


def item_segment(item: dict, max_seconds: float | None = None) -> tuple[float, float | None]:
    """``(offset, duration)`` in seconds of the audio a manifest item stands for: an item with an ``offset`` is the
    segment ``[offset, offset + duration)``, one without is its whole file (duration None). ``max_seconds`` crops
    to at most that many seconds (the item's ``duration`` says how long the file is)."""
    offset = float(item.get("offset") or 0.0)
    duration = float(item["duration"]) if "offset" in item else None
    if max_seconds is not None and float(item["duration"]) > max_seconds:
        duration = max_seconds
    return offset, duration


def load_item_audio(item: dict, sample_rate: int, max_seconds: float | None = None) -> Any:
    """The (samples,) float32 waveform of a manifest item (:func:`item_segment`) at ``sample_rate``."""
    offset, duration = item_segment(item, max_seconds)
    return load_audio(item["audio"], sample_rate, offset=offset, duration=duration)


def write_manifest(path: str | os.PathLike, items: Iterable[dict]) -> Path:
    """Write items as JSON Lines, atomically (temp file in the same folder + rename).

    ``audio`` is written relative to the manifest's folder when the file lies under it, absolute otherwise, so a
    corpus folder can be moved as a whole. Items are not modified. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = os.path.abspath(path.parent)
    with atomic_write(path, mode=0o666) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as out:
        for item in items:
            line = dict(item)
            if isinstance(line.get("audio"), (str, os.PathLike)):
                line["audio"] = _relative_if_inside(os.fspath(line["audio"]), root)
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_PART = 200  # bytes; file systems allow 255 per path component, the extension needs a few


def _output_name(item_id: str) -> str:
    if not isinstance(item_id, str) or item_id.startswith("/"):
        raise ValueError(f"id {item_id!r} cannot name an output file (it must be a relative name)")
    parts = []
    for part in item_id.split("/"):
        if part == "..":
            raise ValueError(
                f"id {item_id!r} cannot name an output file ('..' would leave the output folder)"
            )
        part = _UNSAFE_NAME_CHARS.sub("_", part).lstrip(".")  # no hidden files, no '.' / '..' parts
        if len(part) > MAX_NAME_PART:
            raise ValueError(f"id {item_id[:60]!r}...: a part longer than {MAX_NAME_PART} characters")
        if part:
            parts.append(part)
    if not parts:
        raise ValueError(f"id {item_id!r} cannot name an output file (no usable characters)")
    return "/".join(parts)


def output_names(ids: Iterable[str], *, source: str = "input") -> list[str]:
    """Safe, distinct relative output names (no extension) for utterance ids, in order: the one id -> file name map.

    Each ``/``-separated part of an id keeps ``[A-Za-z0-9._-]`` (other runs become ``_``, leading dots are
    dropped) and empty / ``.`` parts disappear, so ``"spk1/utt 1"`` -> ``"spk1/utt_1"`` (a sub-folder). Absolute
    ids and ``..`` parts are refused: nothing is written outside the output folder. Two ids that map to one name
    (``a`` and ``./a``, ``a b`` and ``a_b``) or a repeated id are a ``ValueError`` naming both, before anything is
    written.
    """
    names: list[str] = []
    owner: dict[str, str] = {}
    for item_id in ids:
        try:
            name = _output_name(item_id)
        except ValueError as err:
            raise ValueError(f"{source}: {err} -> rename the item") from None
        if name in owner:
            first = owner[name]
            what = (
                f"id {item_id!r} appears twice"
                if first == item_id
                else f"ids {first!r} and {item_id!r} both map to the output file name {name!r}"
            )
            raise ValueError(
                f"{source}: {what}; one output would overwrite the other -> give the items distinct ids "
                "(letters, digits, '.', '_', '-', and '/' for sub-folders)"
            )
        owner[name] = item_id
        names.append(name)
    return names


def _relative_if_inside(audio: str, root: str) -> str:
    if not os.path.isabs(audio):
        return audio
    audio = os.path.normpath(audio)
    if os.path.commonpath([root, audio]) == root:
        return os.path.relpath(audio, root)
    return audio
