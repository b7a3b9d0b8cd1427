"""speechlab.Transcriber and ``speechlab transcribe``: greedy and beam search (with an n-gram LM and lexicon),
batches equal to one utterance at a time, unit start times, error rates against manifest references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import speechlab
from speechlab import cli
from speechlab.audio import load_audio
from speechlab.checkpoints.pretrained_dir import save_pretrained
from speechlab.commands import transcribe
from speechlab.data.text import CharTokenizer, PhonemeTokenizer
from speechlab.inference.transcriber import Transcriber
from speechlab.models.ctc import CTCConfig, CTCModel
from speechlab.models.registry import build_config

REPO = Path(__file__).resolve().parents[1]
ESPEAK = REPO / "data" / "espeak"
ROWS = [json.loads(line) for line in (ESPEAK / "manifest.jsonl").read_text().splitlines()]
EN = [r for r in ROWS if r["language"] == "en"][:3]


def ctc_model(tokenizer, conv_norm: str = "layer") -> CTCModel:
    """A random tiny CTC model: its greedy output is a long, varied unit string (a strict test of decoding)."""
    torch.manual_seed(0)
    config = build_config("ssl_encoder", "wavlm_tiny", {"num_layers": 1, "conv_norm": conv_norm})
    model = CTCModel(CTCConfig(config, tokenizer.vocab_size, 0.0)).eval()
    model.tokenizer = tokenizer
    return model


def phoneme_tokenizer() -> PhonemeTokenizer:
    return PhonemeTokenizer.build([r["phonemes"] for r in ROWS if r["language"] == "en"])


def files() -> list[str]:
    return [str(ESPEAK / r["audio"]) for r in EN]


def test_transcriber_is_exported_lazily_from_speechlab():
    assert speechlab.Transcriber is Transcriber


@pytest.mark.parametrize("conv_norm", ["layer", "group"])
def test_a_batch_gives_exactly_what_each_file_gives_alone(conv_norm):
    model = ctc_model(phoneme_tokenizer(), conv_norm)
    transcriber = Transcriber(model, batch_seconds=600)
    waves = [load_audio(f) for f in files()]
    waves.append(waves[0].clone())  # two of equal length: GroupNorm models batch those together
    assert len({w.numel() for w in waves}) == 3
    together = transcriber(waves)
    alone = [transcriber(w)[0] for w in waves]
    assert [t.text for t in together] == [t.text for t in alone]
    assert [t.frames for t in together] == [t.frames for t in alone]
    assert all(t.text for t in together)
    for batched, single in zip(
        transcriber.log_probs(waves), [transcriber.log_probs(w)[0] for w in waves], strict=True
    ):
        assert batched.shape == single.shape and (batched - single).abs().max() < 1e-4
    groups = transcriber._groups([w.numel() for w in waves])
    if conv_norm == "group":  # padding would change GroupNorm statistics: only equal lengths share a forward
        assert sorted(map(len, groups)) == [1, 1, 2]
    else:
        assert len(groups) == 1


def test_greedy_decoding_merges_repeats_drops_blanks_and_times_each_unit():
    tokenizer = CharTokenizer(["<blank>", "|", "a", "b"])
    transcriber = Transcriber(ctc_model(tokenizer))
    best = [2, 2, 0, 2, 1, 1, 3, 0, 0, 3]  # a a _ a | | b _ _ b
    log_probs = torch.full((len(best), 4), -10.0)
    log_probs[torch.arange(len(best)), torch.tensor(best)] = 0.0
    result = transcriber.decode(log_probs)
    assert result.units == ["a", "a", "|", "b", "b"]
    assert result.frames == [0, 3, 4, 6, 9]
    assert result.start_seconds == [0.0, 0.06, 0.08, 0.12, 0.18]  # 20 ms frames
    assert result.text == "aa bb"
    assert result.to_dict() == {"text": "aa bb", "units": result.units, "start": result.start_seconds}


def _ambiguous_log_probs() -> torch.Tensor:
    """Frames: (a 0.55 | b 0.45), blank, (b 0.55 | a 0.45), blank, word delimiter: acoustically 'ab' > 'ba'."""
    probs = torch.full((5, 4), 1e-3)
    probs[0, 2], probs[0, 3] = 0.55, 0.45
    probs[1, 0] = 1.0
    probs[2, 3], probs[2, 2] = 0.55, 0.45
    probs[3, 0] = 1.0
    probs[4, 1] = 1.0
    return (probs / probs.sum(-1, keepdim=True)).log()


ARPA = """\\data\\
ngram 1=5
ngram 2=2

\\1-grams:
-99\t<s>\t-0.3
-1.0\t</s>
-3.0\tab\t-0.3
-0.05\tba\t-0.3
-5.0\t<unk>

\\2-grams:
-3.0\t<s> ab
-0.05\t<s> ba

\\end\\
"""


def test_beam_search_with_an_ngram_lm_and_lexicon_follows_the_lm(tmp_path):
    (tmp_path / "lm.arpa").write_text(ARPA)
    (tmp_path / "lexicon.txt").write_text("ab a b |\nba b a |\n")
    model = ctc_model(CharTokenizer(["<blank>", "|", "a", "b"]))
    log_probs = _ambiguous_log_probs()
    greedy = Transcriber(model).decode(log_probs)
    beam = Transcriber(model, decoder="beam", beam_size=10).decode(log_probs)
    lexicon_only = Transcriber(model, decoder="beam", lexicon=tmp_path / "lexicon.txt").decode(log_probs)
    with_lm = Transcriber(model, decoder="beam", lexicon=tmp_path / "lexicon.txt", lm=tmp_path / "lm.arpa")
    assert greedy.text == beam.text == lexicon_only.text == "ab"
    assert beam.frames == greedy.frames == [0, 2, 4]  # the beam search's time steps on the same frame grid
    result = with_lm.decode(log_probs)
    assert result.text == "ba" and result.words == ["ba"]  # the LM outweighs the small acoustic preference
    assert result.frames == [0, 2, 4] and result.score < beam.score


def test_lexicon_free_beam_search_on_a_real_model_matches_greedy_on_peaky_output():
    model = ctc_model(phoneme_tokenizer())
    greedy, beam = Transcriber(model), Transcriber(model, decoder="beam", beam_size=20)
    for log_probs in greedy.log_probs(files()):
        # sharpened: the best path is far better than any other, so the beam search must find its units
        peaky = (20 * log_probs).log_softmax(-1)
        expected, found = greedy.decode(peaky), beam.decode(peaky)
        assert found.text == expected.text and found.text
        assert found.frames == expected.frames and found.score is not None


def test_clear_errors_for_wrong_models_and_settings(tmp_path):
    from speechlab.models.ssl_encoder import SSLEncoder

    with pytest.raises(TypeError, match="needs a CTC model.*SSLEncoder"):
        Transcriber(SSLEncoder(build_config("ssl_encoder", "wavlm_tiny", {"num_layers": 1})))
    model = ctc_model(CharTokenizer(["<blank>", "|", "a", "b"]))
    with pytest.raises(ValueError, match="needs a lexicon"):
        Transcriber(model, decoder="beam", lm=tmp_path / "lm.arpa")
    with pytest.raises(FileNotFoundError, match="lexicon.txt"):
        Transcriber(model, decoder="beam", lexicon=tmp_path / "lexicon.txt")
    with pytest.raises(ValueError, match="too short"):
        Transcriber(model)(torch.zeros(100))


def test_command_transcribes_files_folders_and_manifests_with_error_rates(tmp_path, capsys):
    model = ctc_model(phoneme_tokenizer())
    save_pretrained(model, tmp_path / "model", family="ctc")
    manifest = tmp_path / "refs.jsonl"
    manifest.write_text("".join(json.dumps({**r, "audio": str(ESPEAK / r["audio"])}) + "\n" for r in EN))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "one.flac").write_bytes(Path(files()[0]).read_bytes())

    out = tmp_path / "out.jsonl"
    argv = ["--model", str(tmp_path / "model"), str(manifest), str(folder), files()[1], "--format", "jsonl",
            "--output", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(["transcribe", *argv]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in EN] + ["one", Path(files()[1]).stem]
    expected = Transcriber(model)(files())
    assert [r["text"] for r in records[:3]] == [t.text for t in expected]
    assert records[3]["text"] == expected[0].text and records[4]["text"] == expected[1].text
    assert records[0]["start"] == expected[0].start_seconds and records[0]["reference"] == EN[0]["phonemes"]
    err = capsys.readouterr().err
    from speechlab.inference.transcriber import error_rates

    per = error_rates([r["phonemes"] for r in EN], [t.text for t in expected], phonemes=True)["per"]
    assert f"PER {100 * per:.2f}% over 3 utterances" in err

    assert cli.main(["transcribe", "--model", str(tmp_path / "model"), files()[0], "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{Path(files()[0]).stem}\t{expected[0].text}\n"


def test_command_is_registered_with_the_documented_options():
    from speechlab.cli import _tool_parser

    parser = _tool_parser()
    args = parser.parse_args(["transcribe", "--model", "m", "a.wav", "--decoder", "beam", "--lm", "x.arpa"])
    assert args.func is transcribe.run and args.decoder == "beam" and args.inputs == ["a.wav"]
    help_text = parser._subparsers._group_actions[0].choices["transcribe"].format_help()
    for option in ("--decoder", "--beam-size", "--lm", "--lexicon", "--format", "--output", "--ckpt"):
        assert option in help_text


def test_long_input_in_windows_equals_unchunked_when_context_covers_the_receptive_field():
    # no attention layers: each frame depends on a bounded window (conv encoder + 16-frame positional conv), so
    # frame-exact stitching must reproduce the unchunked log-probabilities, whole-file normalisation included
    tokenizer = phoneme_tokenizer()
    config = build_config("ssl_encoder", "wavlm_tiny", {"num_layers": 0, "normalize_waveform": True})
    torch.manual_seed(0)
    model = CTCModel(CTCConfig(config, tokenizer.vocab_size, 0.0)).eval()
    model.tokenizer = tokenizer
    audio = torch.cat([load_audio(f) for f in files()] * 2)
    full = Transcriber(model, chunk_seconds=None)
    chunked = Transcriber(model, chunk_seconds=1.0, context_seconds=0.4)
    assert audio.numel() > 3 * chunked.chunk_threshold
    expected, found = full.log_probs(audio)[0], chunked.log_probs(audio)[0]
    assert found.shape == expected.shape and (found - expected).abs().max() < 1e-4
    assert chunked(audio)[0].units == full(audio)[0].units


def test_long_input_with_attention_keeps_the_exact_frame_count():
    model = ctc_model(phoneme_tokenizer())
    audio = torch.cat([load_audio(f) for f in files()] * 2)
    full = Transcriber(model, chunk_seconds=None).log_probs(audio)[0]
    chunked = Transcriber(model, chunk_seconds=1.0, context_seconds=1.0).log_probs(audio)[0]
    assert chunked.shape == full.shape
    assert torch.allclose(chunked.exp().sum(-1), torch.ones(chunked.shape[0]))


def test_error_rates_are_wer_and_cer_for_text_and_per_for_phonemes():
    from speechlab.inference.transcriber import error_rates

    rates = error_rates(["a cat sat", "dog"], ["a bat sat", "dog"], phonemes=False)
    assert rates == pytest.approx({"wer": 1 / 4, "cer": 1 / 12})  # one word of 4; one char of 9 + 3
    assert error_rates(["s iː t", "k æ t"], ["s t", "k æ t"], phonemes=True) == pytest.approx({"per": 1 / 6})
