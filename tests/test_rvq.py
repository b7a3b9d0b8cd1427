"""Residual VQ: k-means init, EMA convergence, dead-code replacement, padding-aware statistics, quantizer dropout."""

from __future__ import annotations

import pytest
import torch

from speechlab.nn.kmeans import lloyd_kmeans
from speechlab.nn.rvq import CodebookLevel, ResidualVectorQuantizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: two threads spin-wait on each other (40x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered(centres: torch.Tensor, per_cluster: int, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    points = centres.repeat_interleave(per_cluster, 0)
    return points + noise * torch.randn(points.shape, generator=g)


def nearest_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For every row of a, distance to the closest row of b."""
    return torch.cdist(a, b).min(dim=1).values


def test_kmeans_recovers_cluster_centres():
    torch.manual_seed(0)
    centres = torch.randn(4, 3) * 5
    found = lloyd_kmeans(clustered(centres, 50), 4, 20, generator=torch.Generator().manual_seed(1))
    assert nearest_distance(centres, found).max() < 0.05


def test_first_training_batch_kmeans_initialises_then_ema_converges_to_cluster_centres():
    torch.manual_seed(0)
    centres = torch.randn(8, 4) * 3
    rvq = ResidualVectorQuantizer(
        4, num_quantizers=1, codebook_size=8, kmeans_iters=30, quantizer_dropout=0.0
    )
    level = rvq.levels[0]
    assert not bool(level.initialized)
    for step in range(60):
        x = clustered(centres, 40, noise=0.05, seed=step)  # (320, 4)
        x = x[torch.randperm(x.shape[0])].T.reshape(1, 4, -1)  # (B=1, D, T)
        rvq.train()(x)
    assert bool(level.initialized)
    assert nearest_distance(centres, level.embed).max() < 0.1
    # every centre owns one code and the EMA counts agree with the 40 points per cluster per batch
    assert torch.allclose(level.cluster_size.sort().values, torch.full((8,), 40.0), atol=2.0)


def test_dead_code_is_replaced_by_a_batch_vector():
    torch.manual_seed(0)
    level = CodebookLevel(2, codebook_size=4, dead_code_threshold=2.0)
    level.initialized.fill_(True)
    level.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]))
    level.embed_avg.copy_(level.embed * 10)
    level.cluster_size.fill_(10.0)
    batch = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, -5.0]]).repeat(20, 1)
    replaced = 0
    for _ in range(200):  # code 3 is never chosen: its EMA count decays below the threshold
        codes = level.nearest(batch)
        assert not (codes == 3).any() or replaced
        replaced += int(level.update(batch, codes))
        if replaced:
            break
    assert replaced == 1
    assert level.cluster_size[3] == 2.0
    # the new vector is one of the batch's vectors (here the far point [5, -5] or a used one)
    assert (torch.cdist(level.embed[3:4], batch).min() < 1e-6).item()


def test_padded_frames_never_update_codebooks():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10)
    padded = x.clone()
    padded[1, :, 6:] = 1e3  # garbage in the padded tail
    lengths = torch.tensor([10, 6])
    a = ResidualVectorQuantizer(3, num_quantizers=2, codebook_size=4, kmeans_iters=5, quantizer_dropout=0.0)
    b = ResidualVectorQuantizer(3, num_quantizers=2, codebook_size=4, kmeans_iters=5, quantizer_dropout=0.0)
    b.load_state_dict(a.state_dict())
    clean = x.clone()
    clean[1, :, 6:] = 0.0
    torch.manual_seed(1)
    out_a = a.train()(clean, lengths)
    torch.manual_seed(1)
    out_b = b.train()(padded, lengths)
    for key, tensor in a.state_dict().items():
        assert torch.allclose(tensor.float(), b.state_dict()[key].float(), atol=1e-5), key
    assert torch.allclose(out_a.commitment_loss, out_b.commitment_loss)
    assert torch.equal(out_a.codes[1, :, :6], out_b.codes[1, :, :6])
    assert out_b.quantized[1, :, 6:].abs().sum() == 0


def test_any_prefix_of_levels_decodes_and_more_levels_reconstruct_better():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(
        6, num_quantizers=4, codebook_size=16, kmeans_iters=10, quantizer_dropout=0.0
    )
    x = torch.randn(2, 6, 200)
    rvq.train()(x)
    rvq.eval()
    errors = []
    codes = rvq.encode(x)
    for n_q in range(1, 5):
        prefix = rvq.encode(x, n_q=n_q)
        assert torch.equal(prefix, codes[:, :n_q])
        decoded = rvq.decode(prefix)
        assert decoded.shape == x.shape
        errors.append(float((decoded - x).pow(2).mean()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]
    # eval forward == encode + decode
    out = rvq(x)
    assert torch.equal(out.codes, codes) and torch.allclose(out.quantized, rvq.decode(codes), atol=1e-6)


def test_quantizer_dropout_gives_per_item_budgets_and_straight_through_gradients():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(4, num_quantizers=4, codebook_size=8, kmeans_iters=2, quantizer_dropout=0.5)
    x = torch.randn(8, 4, 30, requires_grad=True)
    out = rvq.train()(x)
    budgets = out.level_mask.sum(1)
    assert (budgets[4:] == 4).all()  # the second half keeps every level (DAC)
    assert out.level_mask[:, 0].all()
    # straight-through: d(sum quantized)/dx == 1 everywhere
    out.quantized.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_factorized_codebook_uses_cosine_lookup_and_trains_by_gradient():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(
        16, num_quantizers=2, codebook_size=8, codebook_dim=4, kmeans_iters=3, quantizer_dropout=0.0
    )
    x = torch.randn(2, 16, 40, requires_grad=True)
    out = rvq.train()(x)
    assert out.codebook_loss > 0 and out.commitment_loss > 0
    (out.quantized.pow(2).mean() + out.codebook_loss + out.commitment_loss).backward()
    level = rvq.levels[0]
    assert level.codebook.grad is not None and level.codebook.grad.abs().sum() > 0
    assert level.in_proj.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    # cosine lookup: scaling the projected input does not change the code
    z = level.project_in(x.detach().transpose(1, 2).reshape(-1, 16))
    assert torch.equal(level.nearest(z), level.nearest(3.0 * z))


def test_batch_statistics_report_usage_perplexity_and_replacements():
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(2, num_quantizers=2, codebook_size=4, kmeans_iters=5, quantizer_dropout=0.0)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
    x = clustered(centres, 25).T[None]  # (1, 2, 100): uniform over 4 clusters
    out = rvq.train()(x)
    assert out.usage.shape == (2,) and out.perplexity.shape == (2,) and out.replaced.shape == (2,)
    assert out.usage[0] == 1.0
    assert abs(float(out.perplexity[0]) - 4.0) < 0.05


def test_relative_dead_code_threshold_does_not_redraw_a_uniformly_used_codebook_of_a_small_batch():
    """Fewer frames per batch than 2 per code: EnCodec's absolute threshold 2 calls a uniformly used codebook dead
    and re-draws codes every step; Mimi's relative one (0.1 x the uniform count) leaves it alone."""
    centres = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * 3
    replaced = {}
    for ratio in (None, 0.1):
        torch.manual_seed(0)
        rvq = ResidualVectorQuantizer(
            4,
            num_quantizers=1,
            codebook_size=32,
            kmeans_iters=10,
            quantizer_dropout=0.0,
            dead_code_ratio=ratio,
        ).train()
        total = 0.0
        for step in range(40):
            x = clustered(centres, 1, noise=0.05, seed=step)  # 32 frames, one per cluster: uniform count 1
            out = rvq(x.T[None])
            total += float(out.replaced[0]) if step >= 20 else 0.0
        replaced[ratio] = total
        codes = rvq.eval().encode(clustered(centres, 1, noise=0.05, seed=99).T[None])
        if ratio is not None:
            assert codes.unique().numel() >= 28  # the k-means codebook survives
    assert replaced[None] > 100 and replaced[0.1] == 0
