"""Text units for CTC: characters, sentencepiece pieces, phonemes. Id 0 is always the CTC blank.

All tokenizers share one protocol:

- ``encode(text) -> list[int]`` and ``decode(ids) -> str`` (``decode`` drops blanks and negative padding ids;
  it does not collapse repeats: that is the CTC decoder's job);
- ``vocab_size`` (including the blank), ``blank_id == 0``, ``units`` (``units[i]`` is the string of id ``i``),
  ``field`` (the manifest field the tokenizer reads: ``"text"`` or ``"phonemes"``);
- ``save(directory)`` writes ``units.json`` (plus ``spm.model`` for sentencepiece); :func:`load_tokenizer`
  reads it back, so a pretrained model directory can carry its tokenizer. :func:`tokenizer_to_files` /
  :func:`tokenizer_from_files` are the same files as bytes in memory: what a Lightning checkpoint stores. Restoring
  from a checkpoint writes nothing to disk and accepts only those two names, so a crafted checkpoint cannot name
  a path (``../../x``, ``/etc/x``) to write or read.

Unknown units: by default (``unknown="error"``) ``encode`` raises :class:`UnknownUnitError` naming the unit and
the text, because silently dropping characters corrupts CTC targets. ``unknown="skip"`` drops them instead.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from speechlab.atomic import write_bytes, write_text

__all__ = [
    "BLANK",
    "CharTokenizer",
    "PhonemeTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "UnknownUnitError",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_from_files",
    "tokenizer_to_files",
]

BLANK = "<blank>"
WORD_DELIMITER = "|"
UNITS_FILE = "units.json"
SPM_FILE = "spm.model"
_WHITESPACE = re.compile(r"\s+")


class UnknownUnitError(ValueError):
    """``encode`` met a unit outside the inventory. ``field`` is the manifest field the text came from."""

    reason = "unknown_unit"

    def __init__(self, unit: str, text: str, kind: str = "", field: str | None = None) -> None:
        self.unit, self.text, self.kind, self.field = unit, text, kind, field
        codepoints = " ".join(f"U+{ord(c):04X}" for c in unit)
        self.detail = f"unit {unit!r} ({codepoints}) is not in the {kind} inventory; text: {text[:120]!r}"
        self.remedy = (
            "normalise the text, rebuild the tokenizer from data that contains the unit, "
            "or use unknown='skip' to drop unknown units"
        )
        super().__init__(f"{self.detail} -> {self.remedy}")

    def __reduce__(self):
        return (type(self), (self.unit, self.text, self.kind, self.field))


def _check_unknown(unknown: str) -> str:
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    return unknown


class Tokenizer:
    """Shared part: a unit inventory with the blank at id 0."""

    kind: str = ""
    field: str = "text"
    blank_id: int = 0

    def __init__(self, units: Sequence[str], unknown: str = "error") -> None:
        units = list(units)
        if not units or units[0] != BLANK:
            units = [BLANK, *[u for u in units if u != BLANK]]
        if len(set(units)) != len(units):
            raise ValueError("tokenizer units must be unique")
        self.units = units
        self.unknown = _check_unknown(unknown)
        self._index = {u: i for i, u in enumerate(units)}

    @property
    def vocab_size(self) -> int:
        return len(self.units)

    def _ids(self, tokens: Iterable[str], text: str) -> list[int]:
        ids = []
        for token in tokens:
            idx = self._index.get(token)
            if idx is None or idx == self.blank_id:
                if self.unknown == "error":
                    raise UnknownUnitError(token, text, self.kind, self.field)
                continue
            ids.append(idx)
        return ids

    def _units_of(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if i <= self.blank_id:  # blank, or negative padding (-100)
                continue
            if i >= len(self.units):
                raise ValueError(f"id {i} is outside the vocabulary (size {len(self.units)})")
            out.append(self.units[i])
        return out

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {"kind": self.kind, "field": self.field, "unknown": self.unknown, "units": self.units}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``units.json`` (and model files) into ``directory``; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / UNITS_FILE, json.dumps(self._config(), ensure_ascii=False, indent=1) + "\n")
        return directory

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, field={self.field!r})"


class CharTokenizer(Tokenizer):
    """Characters; a run of whitespace becomes the word delimiter ``"|"`` (id 1).

    ``lowercase=True`` lowercases before encoding (and building). ``"|"`` itself is reserved and never a
    character unit.
    """

    kind = "char"
    field = "text"

    def __init__(self, units: Sequence[str], *, lowercase: bool = True, unknown: str = "error") -> None:
        super().__init__(units, unknown)
        self.lowercase = lowercase

    @classmethod
    def build(cls, texts: Iterable[str], *, lowercase: bool = True, unknown: str = "error") -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(cls._normalize(text, lowercase))
        chars.discard(WORD_DELIMITER)
        chars.discard(" ")
        if not chars:
            raise ValueError("no characters to build a CharTokenizer from (all texts empty?)")
        return cls([BLANK, WORD_DELIMITER, *sorted(chars)], lowercase=lowercase, unknown=unknown)

    @staticmethod
    def _normalize(text: str, lowercase: bool) -> str:
        text = _WHITESPACE.sub(" ", text).strip()
        return text.lower() if lowercase else text

    def encode(self, text: str) -> list[int]:
        normalized = self._normalize(text, self.lowercase)
        if WORD_DELIMITER in normalized:  # reserved: would decode as a space
            if self.unknown == "error":
                raise UnknownUnitError(WORD_DELIMITER, text, self.kind, self.field)
            normalized = normalized.replace(WORD_DELIMITER, "")
        return self._ids((WORD_DELIMITER if c == " " else c for c in normalized), text)

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(" " if u == WORD_DELIMITER else u for u in self._units_of(ids))
        return _WHITESPACE.sub(" ", text).strip()

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "lowercase": self.lowercase}


class PhonemeTokenizer(Tokenizer):
    """Space-separated phone tokens (the manifest's ``phonemes`` field), e.g. ``"s t eɪ ʃ ə n"``."""

    kind = "phoneme"
    field = "phonemes"

    @classmethod
    def build(cls, texts: Iterable[str], *, unknown: str = "error") -> PhonemeTokenizer:
        phones: set[str] = set()
        for text in texts:
            phones.update(text.split())
        if not phones:
            raise ValueError("no phones to build a PhonemeTokenizer from (all 'phonemes' empty?)")
        return cls([BLANK, *sorted(phones)], unknown=unknown)

    def encode(self, text: str) -> list[int]:
        return self._ids(text.split(), text)

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self._units_of(ids))


class SentencePieceTokenizer(Tokenizer):
    """Sentencepiece pieces, ids shifted by one so that 0 is the CTC blank (sentencepiece id ``k`` -> ``k + 1``).

    The sentencepiece model has no BOS/EOS; its ``<unk>`` (our id 1) stands for unknown characters, which
    ``unknown="error"`` reports as :class:`UnknownUnitError` instead.
    """

    kind = "sentencepiece"
    field = "text"

    def __init__(self, model_proto: bytes, *, lowercase: bool = True, unknown: str = "error") -> None:
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.processor = spm.SentencePieceProcessor(model_proto=self.model_proto)
        pieces = [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]
        super().__init__([BLANK, *pieces], unknown)
        self.lowercase = lowercase
        self._unk = self.processor.unk_id()

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 256,
        lowercase: bool = True,
        model_type: str = "unigram",
        unknown: str = "error",
        seed: int = 0,
    ) -> SentencePieceTokenizer:
        """Train a sentencepiece model on ``texts``.

        ``vocab_size`` counts sentencepiece pieces (our ``vocab_size`` is one more, for the blank); it is an upper
        bound (``hard_vocab_limit=False``): a small corpus gives fewer pieces rather than an error.
        """
        import sentencepiece as spm

        sentences = [CharTokenizer._normalize(t, lowercase) for t in texts]
        sentences = [s for s in sentences if s]
        if not sentences:
            raise ValueError("no text to train a SentencePieceTokenizer on (all texts empty?)")
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            hard_vocab_limit=False,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        return cls(model.getvalue(), lowercase=lowercase, unknown=unknown)

    def encode(self, text: str) -> list[int]:
        normalized = CharTokenizer._normalize(text, self.lowercase)
        pieces = self.processor.encode(normalized, out_type=int)
        if self._unk in pieces:
            if self.unknown == "error":
                unknown = next(
                    (c for c in normalized if self.processor.piece_to_id(c) == self._unk and c != " "), "?"
                )
                raise UnknownUnitError(unknown, text, self.kind, self.field)
            pieces = [p for p in pieces if p != self._unk]
        return [p + 1 for p in pieces]

    def decode(self, ids: Iterable[int]) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if i <= self.blank_id:
                continue
            if i >= self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary (size {self.vocab_size})")
            pieces.append(i - 1)
        return self.processor.decode(pieces)

    def __getstate__(self) -> dict[str, Any]:  # the C++ processor does not pickle; rebuild it from the proto
        state = dict(self.__dict__)
        state.pop("processor")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import sentencepiece as spm

        self.__dict__.update(state)
        self.processor = spm.SentencePieceProcessor(model_proto=self.model_proto)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "lowercase": self.lowercase, "model": SPM_FILE}

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes(directory / SPM_FILE, self.model_proto)
        return super().save(directory)


_KINDS = {"char": CharTokenizer, "sentencepiece": SentencePieceTokenizer, "phoneme": PhonemeTokenizer}


def build_tokenizer(kind: str, items: Iterable[dict | str], **options: Any) -> Tokenizer:
    """Build a tokenizer of ``kind`` ("char" | "sentencepiece" | "phoneme") from manifest items or strings.

    Items are dicts (the tokenizer's ``field`` is read; items where it is missing or empty, e.g. noise clips, are
    ignored) or plain strings. ``options`` go to the class's ``build`` (``lowercase``, ``vocab_size``,
    ``unknown``, ...).
    """
    if kind not in _KINDS:
        raise ValueError(f"tokenizer kind must be one of {sorted(_KINDS)}, got {kind!r}")
    cls = _KINDS[kind]
    texts = []
    for item in items:
        text = item if isinstance(item, str) else item.get(cls.field)
        if isinstance(text, str) and text.strip():
            texts.append(text)
    if not texts:
        raise ValueError(f"cannot build a {kind} tokenizer: no item has a non-empty '{cls.field}' field")
    return cls.build(texts, **options)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved with ``save(directory)``."""
    directory = Path(directory)
    path = directory / UNITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist -> point tokenizer_dir at a folder written by save()")
    config = json.loads(path.read_text(encoding="utf-8"))

    def read_model(name: str) -> bytes:
        model = directory / name
        if not model.is_file():
            raise FileNotFoundError(f"{model} (the sentencepiece model named by {path}) does not exist")
        return model.read_bytes()

    return _from_config(config, read_model, str(path))


def tokenizer_to_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """``{file name: bytes}`` of what ``tokenizer.save`` writes (``units.json``, ``spm.model``), built in memory."""
    files = {
        UNITS_FILE: (json.dumps(tokenizer._config(), ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    }
    if isinstance(tokenizer, SentencePieceTokenizer):
        files[SPM_FILE] = tokenizer.model_proto
    return files


def tokenizer_from_files(files: Any, source: str = "checkpoint") -> Tokenizer:
    """The tokenizer of :func:`tokenizer_to_files` output (e.g. a checkpoint's ``tokenizer_files``), from memory.

    Nothing is written to or read from disk. Only ``units.json`` and ``spm.model`` are accepted: any other name
    (a path such as ``../../x`` or ``/etc/x`` in a crafted checkpoint) is refused with a ``ValueError``.
    """
    if not isinstance(files, dict) or not all(isinstance(v, bytes | bytearray) for v in files.values()):
        raise ValueError(f"{source}: tokenizer_files must map file names to bytes -> re-save the checkpoint")
    unexpected = sorted(str(name) for name in files if name not in (UNITS_FILE, SPM_FILE))
    if unexpected:
        raise ValueError(
            f"{source}: tokenizer_files holds unexpected entries {unexpected[:5]} (only {UNITS_FILE!r} and "
            f"{SPM_FILE!r} are read) -> the checkpoint is corrupt or crafted; do not use it"
        )
    if UNITS_FILE not in files:
        raise ValueError(f"{source}: tokenizer_files has no {UNITS_FILE!r} -> re-save the checkpoint")
    try:
        config = json.loads(bytes(files[UNITS_FILE]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source}: tokenizer_files[{UNITS_FILE!r}] is not valid JSON ({err})") from err

    def read_model(name: str) -> bytes:
        if name not in files:
            raise ValueError(f"{source}: tokenizer_files has no {name!r} (named by {UNITS_FILE})")
        return bytes(files[name])

    return _from_config(config, read_model, f"{source}: tokenizer_files[{UNITS_FILE!r}]")


def _from_config(config: Any, read_model: Any, where: str) -> Tokenizer:
    """Build the tokenizer a ``units.json`` describes; ``read_model(name)`` gives the sentencepiece model bytes."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object")
    kind = config.get("kind")
    unknown = config.get("unknown", "error")
    if kind == "char":
        return CharTokenizer(config["units"], lowercase=config.get("lowercase", True), unknown=unknown)
    if kind == "phoneme":
        return PhonemeTokenizer(config["units"], unknown=unknown)
    if kind == "sentencepiece":
        name = config.get("model", SPM_FILE)
        if name != SPM_FILE:  # a name is a path: '../x' or '/etc/x' would read outside the folder
            raise ValueError(
                f"{where}: model file must be {SPM_FILE!r}, got {name!r}; save the tokenizer again"
            )
        tokenizer = SentencePieceTokenizer(
            read_model(name), lowercase=config.get("lowercase", True), unknown=unknown
        )
        if tokenizer.units != config["units"]:
            raise ValueError(f"{where}: units do not match {name}; save the tokenizer again")
        return tokenizer
    raise ValueError(f"{where}: unknown tokenizer kind {kind!r} (expected one of {sorted(_KINDS)})")
