import pytest
import torch
import torch.nn.functional as F

from speechlab.nn.contrastive import (
    contrastive_logits,
    contrastive_loss,
    diversity_loss,
    info_nce,
    sample_negatives,
)


def test_negatives_come_from_same_utterance_and_never_hit_positive_or_padding():
    lengths = torch.tensor([12, 5, 9])
    frames = 12
    frame_mask = torch.zeros(3, frames, dtype=torch.bool)
    frame_mask[0, [0, 4, 11]] = True
    frame_mask[1, [0, 2, 4]] = True
    frame_mask[2, [3, 8]] = True
    index, valid = sample_negatives(frame_mask, lengths, 200, generator=torch.Generator().manual_seed(0))
    assert index.shape == (8, 200) and valid.all()
    rows, positions = frame_mask.nonzero(as_tuple=True)
    utterance, frame = index // frames, index % frames
    assert torch.equal(utterance, rows[:, None].expand_as(utterance))
    assert (frame != positions[:, None]).all()
    assert (frame < lengths[rows][:, None]).all()
    # every other valid frame is reachable (uniform over len-1 candidates)
    for m in range(8):
        expected = set(range(int(lengths[rows[m]]))) - {int(positions[m])}
        assert set(frame[m].tolist()) == expected


def test_negatives_for_single_frame_utterance_are_marked_invalid():
    frame_mask = torch.tensor([[True, False], [True, True]])
    index, valid = sample_negatives(frame_mask, torch.tensor([1, 2]), 4)
    assert not valid[0].any() and valid[1:].all()


def test_masking_a_padded_frame_is_an_error():
    frame_mask = torch.tensor([[False, False, True]])
    with pytest.raises(ValueError, match="padded"):
        sample_negatives(frame_mask, torch.tensor([2]), 3)


def test_logits_are_cosine_over_temperature_and_duplicates_of_positive_are_excluded():
    torch.manual_seed(0)
    context, positives = torch.randn(4, 6), torch.randn(4, 6)
    negatives = torch.randn(4, 3, 6)
    negatives[1, 2] = positives[1]
    logits = contrastive_logits(context, positives, negatives, temperature=0.1)
    assert logits.shape == (4, 4)
    torch.testing.assert_close(logits[:, 0], F.cosine_similarity(context, positives, dim=-1) / 0.1)
    torch.testing.assert_close(logits[0, 1:], F.cosine_similarity(context[0], negatives[0], dim=-1) / 0.1)
    assert logits[1, 3] == float("-inf")
    assert torch.isfinite(logits[1, :3]).all()


def test_info_nce_is_zero_when_positive_dominates_and_log_k_plus_one_when_uniform():
    confident = torch.tensor([[100.0, 0.0, 0.0]])
    assert info_nce(confident).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(5, 4)
    assert info_nce(uniform).item() == pytest.approx(5 * torch.log(torch.tensor(4.0)).item())


def test_diversity_loss_range():
    assert diversity_loss(torch.tensor(640.0), 640).item() == 0.0
    assert diversity_loss(torch.tensor(2.0), 640).item() == pytest.approx(638 / 640)


def test_contrastive_loss_ignores_padded_frames_and_rewards_matching_context():
    torch.manual_seed(0)
    targets = torch.randn(2, 10, 8)
    lengths = torch.tensor([10, 6])
    frame_mask = torch.zeros(2, 10, dtype=torch.bool)
    frame_mask[0, 2:5] = True
    frame_mask[1, 1:4] = True
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    good = contrastive_loss(targets.clone(), targets, frame_mask, lengths, num_negatives=5, generator=gen())
    bad = contrastive_loss(
        torch.randn(2, 10, 8), targets, frame_mask, lengths, num_negatives=5, generator=gen()
    )
    assert good.num_frames == 6
    assert good.loss < bad.loss
    assert good.accuracy.item() == 1.0
    # garbage in padded frames of utterance 1 changes nothing
    polluted = targets.clone()
    polluted[1, 6:] = 1e3
    again = contrastive_loss(targets.clone(), polluted, frame_mask, lengths, num_negatives=5, generator=gen())
    torch.testing.assert_close(again.loss, good.loss)


def test_contrastive_loss_gradient_reaches_context_and_targets():
    torch.manual_seed(0)
    context = torch.randn(1, 8, 4, requires_grad=True)
    targets = torch.randn(1, 8, 4, requires_grad=True)
    frame_mask = torch.zeros(1, 8, dtype=torch.bool)
    frame_mask[0, :4] = True
    out = contrastive_loss(context, targets, frame_mask, torch.tensor([8]), num_negatives=3)
    out.loss.backward()
    assert context.grad[0, :4].abs().sum() > 0 and context.grad[0, 4:].abs().sum() == 0
    assert targets.grad.abs().sum() > 0
