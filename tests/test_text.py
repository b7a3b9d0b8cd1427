"""speechlab.data.text: tokenizers round-trip, reserve id 0 for the CTC blank, save/load, report unknown units."""

import pickle

import pytest

from speechlab.data.manifest import read_manifest
from speechlab.data.text import (
    BLANK,
    CharTokenizer,
    PhonemeTokenizer,
    SentencePieceTokenizer,
    UnknownUnitError,
    build_tokenizer,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def lj_items(ljspeech_manifest):
    return read_manifest(ljspeech_manifest, check_audio="none")


@pytest.fixture(scope="module")
def espeak_items(espeak_manifest):
    return read_manifest(espeak_manifest, check_audio="none")


@pytest.fixture(scope="module")
def spm_tokenizer(lj_items):
    return build_tokenizer("sentencepiece", lj_items, vocab_size=64)


def _normalized(text):
    return " ".join(text.lower().split())


def test_char_tokenizer_round_trips_every_transcript(lj_items):
    tokenizer = build_tokenizer("char", lj_items)
    assert tokenizer.units[:2] == [BLANK, "|"] and tokenizer.blank_id == 0 and tokenizer.field == "text"
    for item in lj_items:
        ids = tokenizer.encode(item["text"])
        assert 0 not in ids and max(ids) < tokenizer.vocab_size
        assert tokenizer.decode(ids) == _normalized(item["text"])


def test_char_tokenizer_maps_whitespace_runs_to_one_word_delimiter():
    tokenizer = CharTokenizer.build(["ab ba"])
    assert tokenizer.encode("  ab \t ba ") == tokenizer.encode("ab ba")
    assert tokenizer.encode("ab ba")[2] == 1  # "|"


def test_char_tokenizer_lowercase_option():
    assert CharTokenizer.build(["Ab"]).encode("AB") == CharTokenizer.build(["Ab"]).encode("ab")
    cased = CharTokenizer.build(["Ab"], lowercase=False)
    assert set(cased.units) == {BLANK, "|", "A", "b"}
    with pytest.raises(UnknownUnitError):
        cased.encode("ab")


def test_unknown_character_error_names_the_unit_and_the_text():
    tokenizer = CharTokenizer.build(["hello world"])
    with pytest.raises(UnknownUnitError) as err:
        tokenizer.encode("hello wörld")
    assert err.value.unit == "ö" and err.value.text == "hello wörld" and err.value.field == "text"
    assert "'ö'" in str(err.value) and "hello wörld" in str(err.value)
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.unit, again.field) == ("ö", "text")


def test_unknown_skip_policy_drops_unknown_units():
    tokenizer = CharTokenizer.build(["hello world"], unknown="skip")
    assert tokenizer.decode(tokenizer.encode("hello wörld!")) == "hello wrld"


def test_the_reserved_word_delimiter_in_a_text_is_an_unknown_unit():
    with pytest.raises(UnknownUnitError, match="'\\|'"):
        CharTokenizer.build(["a b"]).encode("a|b")


def test_decode_ignores_blank_and_padding_ids():
    tokenizer = CharTokenizer.build(["ab"])
    ids = tokenizer.encode("ab")
    assert tokenizer.decode([0, ids[0], 0, ids[1], -100, -100]) == "ab"
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([tokenizer.vocab_size])


def test_phoneme_tokenizer_round_trips_espeak_phonemes(espeak_items):
    tokenizer = build_tokenizer("phoneme", espeak_items)
    assert tokenizer.field == "phonemes" and tokenizer.units[0] == BLANK
    assert "tʃ" in tokenizer.units  # multi-character phones are single units
    for item in espeak_items:
        ids = tokenizer.encode(item["phonemes"])
        assert len(ids) == len(item["phonemes"].split()) and 0 not in ids
        assert tokenizer.decode(ids) == " ".join(item["phonemes"].split())
    with pytest.raises(UnknownUnitError, match="'Q'"):
        tokenizer.encode("s t Q")


def test_sentencepiece_tokenizer_round_trips_and_shifts_ids_past_the_blank(spm_tokenizer, lj_items):
    assert spm_tokenizer.units[0] == BLANK and spm_tokenizer.vocab_size <= 65
    lengths = []
    for item in lj_items:
        ids = spm_tokenizer.encode(item["text"])
        assert 0 not in ids and max(ids) < spm_tokenizer.vocab_size
        assert spm_tokenizer.decode(ids) == _normalized(item["text"])
        lengths.append(len(ids) / len(item["text"]))
    assert sum(lengths) / len(lengths) < 0.9  # pieces, not just characters


def test_sentencepiece_small_corpus_gives_fewer_pieces_instead_of_failing():
    tokenizer = SentencePieceTokenizer.build(["a b c", "abc cab"], vocab_size=1000)
    assert tokenizer.vocab_size < 1000
    assert tokenizer.decode(tokenizer.encode("cab abc")) == "cab abc"


def test_sentencepiece_unknown_character_is_reported(spm_tokenizer):
    with pytest.raises(UnknownUnitError, match="'ж'"):
        spm_tokenizer.encode("the жpress")
    skipping = SentencePieceTokenizer(spm_tokenizer.model_proto, unknown="skip")
    assert skipping.decode(skipping.encode("the жpress")) == spm_tokenizer.decode(
        spm_tokenizer.encode("the press")
    )


@pytest.mark.parametrize("kind", ["char", "phoneme", "sentencepiece"])
def test_save_and_load_give_the_same_tokenizer(tmp_path, kind, lj_items, espeak_items, spm_tokenizer):
    items = espeak_items if kind == "phoneme" else lj_items
    tokenizer = spm_tokenizer if kind == "sentencepiece" else build_tokenizer(kind, items)
    tokenizer.save(tmp_path / "tok")
    expected = {"units.json", "spm.model"} if kind == "sentencepiece" else {"units.json"}
    assert {p.name for p in (tmp_path / "tok").iterdir()} == expected
    loaded = load_tokenizer(tmp_path / "tok")
    assert (
        type(loaded) is type(tokenizer)
        and loaded.units == tokenizer.units
        and loaded.field == tokenizer.field
    )
    for item in items[:20]:
        assert loaded.encode(item[tokenizer.field]) == tokenizer.encode(item[tokenizer.field])


def test_build_ignores_items_without_text_and_fails_clearly_when_none_has_it(noise_manifest, lj_items):
    noise = read_manifest(noise_manifest, check_audio="none")
    assert build_tokenizer("char", noise + lj_items).units == build_tokenizer("char", lj_items).units
    with pytest.raises(ValueError, match="no item has a non-empty 'text'"):
        build_tokenizer("char", noise)
    with pytest.raises(ValueError, match="kind"):
        build_tokenizer("bpe", lj_items)


def test_loading_from_a_folder_without_units_json_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="units.json"):
        load_tokenizer(tmp_path)


def test_phoneme_tokenizer_from_plain_strings():
    tokenizer = PhonemeTokenizer.build(["a b", "b c"])
    assert tokenizer.units == [BLANK, "a", "b", "c"] and tokenizer.encode("c a") == [3, 1]


def test_tokenizers_pickle_for_dataloader_workers(spm_tokenizer, lj_items):
    text = lj_items[0]["text"]
    for tokenizer in (spm_tokenizer, build_tokenizer("char", lj_items)):
        copy = pickle.loads(pickle.dumps(tokenizer))
        assert copy.encode(text) == tokenizer.encode(text) and copy.units == tokenizer.units
