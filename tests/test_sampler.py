"""speechlab.data.sampler.BucketBatchSampler: coverage, budget, rank balance, determinism, exact resume."""

import itertools
import time

import numpy as np
import pytest
from torch.utils.data import DataLoader

from speechlab.data.sampler import BucketBatchSampler, pack_batches


def _durations(n=500, seed=0):
    return np.random.default_rng(seed).uniform(0.3, 12.0, size=n).round(3)


def test_one_rank_covers_every_utterance_exactly_once_per_epoch():
    durations = _durations()
    sampler = BucketBatchSampler(durations, 40.0, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(durations)))


def test_padded_seconds_of_every_batch_stay_within_budget():
    durations = _durations()
    for budget, cap in [(40.0, None), (25.0, 4), (100.0, 16)]:
        sampler = BucketBatchSampler(durations, budget, max_batch_size=cap)
        for batch in sampler:
            assert len(batch) == 1 or durations[batch].max() * len(batch) <= budget
            assert cap is None or len(batch) <= cap


def test_an_utterance_longer_than_the_budget_gets_its_own_batch():
    durations = np.array([1.0, 1.0, 1.0, 1800.0, 2.0])
    batches = list(BucketBatchSampler(durations, 10.0))
    assert [3] in batches
    assert sorted(itertools.chain.from_iterable(batches)) == [0, 1, 2, 3, 4]


def test_batches_group_similar_lengths():
    durations = np.concatenate([np.full(50, 1.0), np.full(50, 10.0)])
    for batch in BucketBatchSampler(durations, 20.0, seed=1):
        assert len(set(durations[batch])) == 1  # short and long never share a batch (no padding waste)


@pytest.mark.parametrize("num_replicas", [2, 3])
def test_ranks_get_equal_batch_counts_and_together_cover_everything(num_replicas):
    durations = _durations(301)
    samplers = [BucketBatchSampler(durations, 30.0, seed=5, num_replicas=num_replicas, rank=r)
                for r in range(num_replicas)]  # fmt: skip
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1 and all(
        len(b) == len(s) for b, s in zip(per_rank, samplers, strict=True)
    )
    seen = set(itertools.chain.from_iterable(itertools.chain.from_iterable(per_rank)))
    assert seen == set(range(len(durations)))


def test_drop_last_gives_equal_counts_without_repeats():
    durations = _durations(301)
    samplers = [BucketBatchSampler(durations, 31.0, num_replicas=3, rank=r, drop_last=True) for r in range(3)]
    assert samplers[0].num_batches_total % 3 != 0  # the case where something must be dropped
    indices = [i for s in samplers for batch in s for i in batch]
    assert len({len(list(s)) for s in samplers}) == 1
    assert len(indices) == len(set(indices)) < len(durations)


def test_more_ranks_than_batches_still_gives_every_rank_a_batch():
    samplers = [BucketBatchSampler([1.0, 1.0, 1.0], 10.0, num_replicas=4, rank=r) for r in range(4)]
    assert [len(list(s)) for s in samplers] == [1, 1, 1, 1]


def test_order_is_deterministic_per_seed_and_epoch_and_changes_across_epochs():
    durations = _durations()
    a, b = BucketBatchSampler(durations, 40.0, seed=7), BucketBatchSampler(durations, 40.0, seed=7)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    assert list(BucketBatchSampler(durations, 40.0, seed=8)) != epoch0


def test_without_shuffle_batches_come_in_ascending_duration_every_epoch():
    durations = _durations()
    sampler = BucketBatchSampler(durations, 40.0, shuffle=False)
    first = list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) == first
    longest = [durations[b].max() for b in first]
    assert longest == sorted(longest)


@pytest.mark.parametrize("num_replicas,rank", [(1, 0), (2, 1)])
def test_state_dict_resume_mid_epoch_yields_exactly_the_remaining_batches(num_replicas, rank):
    durations = _durations()
    sampler = BucketBatchSampler(durations, 40.0, seed=11, num_replicas=num_replicas, rank=rank)
    sampler.set_epoch(2)
    full = list(sampler)
    consumed = list(itertools.islice(iter(sampler), 5))
    state = sampler.state_dict()
    assert state == {"epoch": 2, "seed": 11, "position": 5} and consumed == full[:5]

    resumed = BucketBatchSampler(durations, 40.0, seed=0, num_replicas=num_replicas, rank=rank)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # Lightning calls set_epoch with the resumed epoch before iterating
    assert list(resumed) == full[5:]
    assert resumed.state_dict()["position"] == len(full)
    assert list(resumed) == full  # the resume offset applies once; the same epoch again starts over
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(full)


def test_position_set_by_the_trainer_is_what_gets_saved_and_resumed():
    durations = _durations()
    sampler = BucketBatchSampler(durations, 40.0)
    full = list(sampler)
    it = iter(sampler)
    for _ in range(8):  # a DataLoader prefetched 8 batches ...
        next(it)
    sampler.position = 6  # ... but the trainer only consumed 6
    resumed = BucketBatchSampler(durations, 40.0)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == full[6:]


def test_loading_a_position_beyond_the_epoch_is_an_error():
    sampler = BucketBatchSampler(_durations(), 40.0)
    with pytest.raises(ValueError, match="position"):
        sampler.load_state_dict({"epoch": 0, "seed": 0, "position": len(sampler) + 1})


def test_lightning_reaches_set_epoch_through_the_dataloader():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    sampler = BucketBatchSampler(_durations(), 40.0)
    loader = DataLoader(list(range(500)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)
    assert sampler.epoch == 5


def test_packing_is_linear_time_on_300k_utterances():
    durations = np.random.default_rng(0).uniform(0.5, 20.0, size=300_000)
    start = time.perf_counter()
    sampler = BucketBatchSampler(durations, 300.0)
    batches = sampler.epoch_batches()
    elapsed = time.perf_counter() - start
    assert sum(len(b) for b in batches) == len(durations)
    assert elapsed < 10.0, f"{elapsed:.1f} s"


def test_pack_batches_boundaries():
    starts = pack_batches(np.array([1.0, 1.0, 2.0, 2.0, 2.0, 5.0]), 6.0, None)
    # [1, 1, 2]: 2 s x 3 = 6 fits; adding a 2 would make 8; [2, 2]: adding 5 would make 15; [5] alone
    assert starts.tolist() == [0, 3, 5, 6]


@pytest.mark.parametrize(
    "kwargs",
    [dict(durations=[], max_batch_seconds=1.0), dict(durations=[1.0], max_batch_seconds=0.0),
     dict(durations=[float("nan")], max_batch_seconds=1.0), dict(durations=[1.0], max_batch_seconds=1.0, rank=1)],
)  # fmt: skip
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        BucketBatchSampler(**kwargs)
