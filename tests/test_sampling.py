"""Tests for offload_runtime.sampling: warping identical to transformers, multinomial, Gumbel-top-k."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from offload_runtime.spec.sampling import gumbel_top_k, make_generator, warp_probs

from helpers import ALPHA, chi_square_pvalue

NAN = float("nan")


def test_chi_square_pvalue_sanity() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    assert chi_square_pvalue(torch.tensor([500, 300, 200, 0]), probs) == pytest.approx(1.0)
    assert chi_square_pvalue(torch.tensor([400, 400, 200, 0]), probs) < 1e-6
    assert chi_square_pvalue(torch.tensor([500, 300, 199, 1]), probs) == 0.0


# --- warp_probs


def _transformers_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What generate(do_sample=True, top_k=0) samples from: the warpers it adds, then a softmax."""
    scores = logits
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


def _logits_with_ties(seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = make_generator(seed)
    smooth = torch.randn(6, 40, generator=gen, dtype=torch.float64) * 2
    # rows 3-5 are quantised to a coarse grid so many logits tie, also across the top-p boundary
    smooth[3:] = torch.round(smooth[3:])
    return smooth.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.6])
@pytest.mark.parametrize("top_p", [0.5, 0.8, 0.9, 1.0])
def test_warp_probs_equals_transformers(dtype: torch.dtype, temperature: float, top_p: float) -> None:
    for seed in range(3):
        logits = _logits_with_ties(seed, dtype)
        ours = warp_probs(logits, temperature, top_p)
        theirs = _transformers_probs(logits, temperature, top_p)
        assert ours.dtype == dtype
        # same operations in the same order: identical bits, zeros (top-p cut) included
        assert torch.equal(ours, theirs)


def test_top_p_boundary_is_inclusive_and_keeps_one() -> None:
    # four equal logits: the tail masses 0.25, 0.5, 0.75 are exact, so `<=` versus `<` matters
    logits = torch.zeros(1, 4, dtype=torch.float64)
    for top_p, kept in [(0.5, 2), (0.75, 3), (0.76, 4), (0.74, 3), (0.25, 1), (1e-6, 1)]:
        probs = warp_probs(logits, 1.0, top_p)
        assert int((probs > 0).sum()) == kept, top_p
        assert torch.allclose(probs[probs > 0], torch.full((kept,), 1 / kept, dtype=torch.float64))
        assert torch.equal(probs, _transformers_probs(logits, 1.0, top_p))
    # in float32, 1 - 1e-9 rounds to 1.0 >= every tail mass: only the min-tokens-to-keep rule
    # leaves the most likely token standing
    logits = torch.randn(8, 30, generator=make_generator(4))
    probs = warp_probs(logits, 1.0, 1e-9)
    assert torch.equal(probs, warp_probs(logits, 0.0, 1.0))
    assert torch.equal(probs, _transformers_probs(logits, 1.0, 1e-9))


def test_warp_probs_keeps_leading_shape_and_upcasts_half() -> None:
    logits = torch.randn(2, 3, 17, generator=make_generator(1)).to(torch.float16)
    probs = warp_probs(logits, 0.8, 0.9)
    assert probs.shape == (2, 3, 17) and probs.dtype == torch.float32
    flat = _transformers_probs(logits.float().reshape(6, 17), 0.8, 0.9)
    assert torch.equal(probs.reshape(6, 17), flat)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3))


def test_greedy_is_one_hot_on_first_argmax() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [5.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.0, 7.0]])
    for top_p in (0.3, 1.0):
        probs = warp_probs(logits, 0.0, top_p)
        expected = torch.zeros(3, 4)
        expected[0, 1] = expected[1, 0] = expected[2, 3] = 1.0
        assert torch.equal(probs, expected)
    assert warp_probs(logits.double()[None], 0, 1.0).shape == (1, 3, 4)


@pytest.mark.parametrize(
    "temperature, top_p",
    [(-0.1, 1.0), (NAN, 1.0), (float("inf"), 1.0), (1.0, 0.0), (1.0, 1.5), (1.0, -0.2), (1.0, NAN)],
)
def test_warp_probs_rejects_bad_settings(temperature: float, top_p: float) -> None:
    with pytest.raises(ValueError, match="temperature|top_p"):
        warp_probs(torch.zeros(3), temperature, top_p)


# --- gumbel_top_k


def test_gumbel_top_k_distinct_nonzero_and_capped_by_support() -> None:
    gen = make_generator(5)
    probs = torch.tensor([0.0, 0.3, 0.0, 0.5, 0.2, 0.0])
    for _ in range(50):
        drawn = gumbel_top_k(probs, 4, gen)
        assert drawn.shape == (3,)
        assert sorted(drawn.tolist()) == [1, 3, 4]
    assert gumbel_top_k(probs, 2, gen).unique().numel() == 2
    assert gumbel_top_k(probs, 0, gen).shape == (0,)
    # tiny but positive mass (a float32 denormal) still counts as support
    tiny = torch.tensor([1.0, 1e-42, 0.0])
    assert sorted(gumbel_top_k(tiny, 3, gen).tolist()) == [0, 1]


def test_gumbel_top_k_batch_per_row_k_pads_with_minus_one() -> None:
    gen = make_generator(6)
    probs = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2], [0.0, 0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]])
    for _ in range(20):
        drawn = gumbel_top_k(probs, [3, 3, 1], gen)
        assert drawn.shape == (3, 3)
        assert len(set(drawn[0].tolist())) == 3 and bool((drawn[0] >= 0).all())
        assert sorted(drawn[1, :2].tolist()) == [1, 2] and drawn[1, 2] == -1
        assert drawn[2, 0] in (0, 1, 2, 3) and drawn[2, 1:].tolist() == [-1, -1]
    wide = gumbel_top_k(probs, 7, gen)  # more than V: padded to k columns
    assert wide.shape == (3, 7) and (wide[1] >= 0).sum() == 2 and (wide[2] >= 0).sum() == 4
    filled = gumbel_top_k(probs, torch.tensor([2, 0, 1]), gen) >= 0
    assert filled.tolist() == [[True, True], [False, False], [True, False]]
    with pytest.raises(ValueError, match="k must be >= 0"):
        gumbel_top_k(probs, -1, gen)


def test_gumbel_top_k_is_seeded() -> None:
    probs = torch.softmax(torch.randn(4, 50, generator=make_generator(0)), -1)
    assert torch.equal(gumbel_top_k(probs, 5, make_generator(9)), gumbel_top_k(probs, 5, make_generator(9)))
    other_seed = gumbel_top_k(probs, 5, make_generator(10))
    assert not torch.equal(gumbel_top_k(probs, 5, make_generator(9)), other_seed)


def _perturbed_probs_top_2(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A plausible bug: Gumbel noise added to probabilities instead of log-probabilities."""
    noise = -torch.empty_like(probs).exponential_(generator=gen).log()
    return torch.topk(probs + noise, 2, dim=-1).indices


def _pair_counts(pairs: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab).reshape(vocab, vocab)


def test_gumbel_top_k_draws_in_without_replacement_law() -> None:
    # With p = [0.4, 0.25, 0.2, 0.1, 0.05] and N = 40000 the chi-square of the pair law has 19 dof
    # (critical value ~ 50 at ALPHA) and resolves cell errors of ~1% of a cell's mass; the
    # probability-perturbing bug below flattens the law far more (its p-value underflows to 0 at
    # this N) and the with-replacement law differs by ~10% in the large cells (p ~ 1e-200), while a
    # correct sampler passes with probability 1 - ALPHA (p = 0.24 and 0.62 with these seeds).
    p = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05], dtype=torch.float64)
    vocab, n = p.numel(), 40_000
    rows = p.expand(n, vocab)
    pairs = gumbel_top_k(rows, 2, make_generator(11))
    assert bool((pairs[:, 0] != pairs[:, 1]).all())

    first_counts = torch.bincount(pairs[:, 0], minlength=vocab)
    assert chi_square_pvalue(first_counts, p) > ALPHA
    pair_law = p[:, None] * p[None, :] / (1 - p[:, None])
    pair_law.fill_diagonal_(0.0)
    assert chi_square_pvalue(_pair_counts(pairs, vocab), pair_law) > ALPHA

    wrong = _perturbed_probs_top_2(rows, make_generator(11))
    assert chi_square_pvalue(_pair_counts(wrong, vocab), pair_law) < ALPHA
    # the law with replacement conditioned on distinctness is also rejected for the real sampler
    with_replacement_law = p[:, None] * p[None, :]
    with_replacement_law.fill_diagonal_(0.0)
    assert chi_square_pvalue(_pair_counts(pairs, vocab), with_replacement_law) < ALPHA


def test_gumbel_top_k_first_draw_has_probs_law_with_zeros() -> None:
    p = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.2], dtype=torch.float32)
    drawn = gumbel_top_k(p.expand(20_000, 5), 3, make_generator(12))
    assert bool((drawn >= 0).all())
    for first, second, third in itertools.islice(drawn.tolist(), 200):
        assert {first, second, third} == {1, 2, 4}
    assert chi_square_pvalue(torch.bincount(drawn[:, 0], minlength=5), p) > ALPHA


def test_warped_rows_equal_warp_probs_row_by_row() -> None:
    from offload_runtime.spec.sampling import WarpedRows

    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lazy = WarpedRows(logits, 0.7, 0.8)
    full = warp_probs(logits, 0.7, 0.8)
    assert lazy.shape == full.shape and lazy.dim() == 2
    for i in (3, 0, 3):
        assert torch.equal(lazy[i], full[i])
    assert sorted(lazy._rows) == [0, 3]  # rows never read are never warped
