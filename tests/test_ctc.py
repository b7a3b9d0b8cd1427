import torch

from speechlab.models.ctc import ctc_greedy_decode
from speechlab.tasks.ctc import error_counts


def _logits(paths: list[list[int]], vocab: int = 5) -> torch.Tensor:
    longest = max(len(p) for p in paths)
    logits = torch.full((len(paths), longest, vocab), -10.0)
    for b, path in enumerate(paths):
        for t, unit in enumerate(path):
            logits[b, t, unit] = 10.0
    return logits


def test_greedy_decode_merges_repeats_drops_blanks_and_ignores_padding():
    logits = _logits([[1, 1, 0, 1, 2, 2, 0, 3], [4, 0, 4, 4, 3, 3, 3, 3]])
    lengths = torch.tensor([8, 4])
    assert ctc_greedy_decode(logits, lengths) == [[1, 1, 2, 3], [4, 4]]


def test_error_counts_match_jiwer_definitions():
    counts = error_counts(["a b c d", "x y"], ["a c d e", "x y"])
    # words: 1 deletion (b) + 1 insertion (e) over 6 reference words
    assert counts[0].item() == 2 and counts[1].item() == 6
    # characters including spaces: "a b c d" -> "a c d e" is 4 edits over 7 + 3 characters
    assert counts[3].item() == 10
    assert counts[2].item() > 0


def test_error_counts_skip_empty_references():
    assert error_counts(["", "a"], ["x", "a"]).tolist() == [0.0, 1.0, 0.0, 1.0]
