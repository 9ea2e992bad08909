"""The step-indexed data order: epochs are permutations, chunks of a step are disjoint slices,
and the order is a pure function of (seed, step, chunk)."""
from __future__ import annotations

from tmd_train.engine.data import StepBatches, StepSampler


def test_step_sampler_covers_epochs():
    sampler = StepSampler(10, chunk_size=3, num_chunks=2, seed=0)
    seen = [i for step in (1, 2, 3) for c in (0, 1) for i in sampler.indices(step, c)]
    assert sorted(seen[:10]) == list(range(10))                 # epoch 0 is a permutation
    assert sampler.indices(2, 1) == StepSampler(10, 3, 2, 0).indices(2, 1)
    assert sampler.indices(1, 0) != StepSampler(10, 3, 2, 1).indices(1, 0)


def test_one_process_with_accumulation_sees_what_two_processes_see():
    """4 chunks of 2: one process taking chunks 0..3 gets the union of what ranks 0 and 1 take."""
    sampler = StepSampler(7, chunk_size=2, num_chunks=4, seed=5)
    whole = list(StepBatches(sampler, 2, 3, [0, 1, 2, 3]))
    rank0, rank1 = list(StepBatches(sampler, 2, 3, [0, 1])), list(StepBatches(sampler, 2, 3, [2, 3]))
    assert whole == [*rank0[:2], *rank1[:2], *rank0[2:], *rank1[2:]]
    assert len(StepBatches(sampler, 2, 3, [0, 1])) == 4
    assert list(StepBatches(sampler, 4, 3, [0])) == []
