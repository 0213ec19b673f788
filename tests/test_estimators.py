"""Estimators against closed forms and basic invariants."""

import math

import pytest
import torch

from entrodrop import estimators
from entrodrop.estimators import (
    angular_distance,
    angular_distance_matrix,
    bucket_entropy,
    cosine_importance,
    entropy,
    entropy_with_subset,
    knn_entropy,
    norm_ratio_to_median,
    renyi_entropy,
    token_cosine,
)


def released_knn_entropy(z, k=25):
    """The released scorer's formula, verbatim: no special case for repeated tokens."""
    n, d = z.shape
    dist = torch.cdist(z.double(), z.double())
    dist.fill_diagonal_(float("inf"))
    r = dist.topk(k, dim=1, largest=False).values[:, -1]
    const = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1) + math.log(n) - math.log(k)
    return (d * torch.log(r + 1e-10).mean() + const).item()


def test_bucket_entropy_of_uniform_data_is_d_log_bins():
    torch.manual_seed(0)
    z = torch.rand(20000, 8)  # uniform on every dimension
    assert bucket_entropy(z, bins=20).item() == pytest.approx(8 * math.log(20), rel=0.005)
    assert bucket_entropy(z, bins=10).item() == pytest.approx(8 * math.log(10), rel=0.005)


def test_bucket_entropy_of_constant_dimensions_is_zero():
    z = torch.ones(50, 6)
    assert bucket_entropy(z).item() == 0.0


def test_bucket_entropy_is_scale_and_shift_invariant_per_dimension():
    torch.manual_seed(0)
    z = torch.randn(500, 5)
    scaled = z * torch.tensor([1.0, 10.0, 0.1, 3.0, 7.0]) + 5
    assert bucket_entropy(scaled).item() == pytest.approx(bucket_entropy(z).item(), rel=1e-4)


@pytest.mark.parametrize("d,sigma", [(4, 1.0), (8, 2.0)])
def test_knn_entropy_of_isotropic_gaussian_matches_closed_form(d, sigma):
    torch.manual_seed(0)
    z = torch.randn(3000, d) * sigma
    expected = d / 2 * math.log(2 * math.pi * math.e * sigma**2)
    assert knn_entropy(z, k=25).item() == pytest.approx(expected, rel=0.04)


def test_knn_entropy_needs_more_tokens_than_k():
    with pytest.raises(ValueError, match="more than 25 tokens"):
        knn_entropy(torch.randn(25, 4), k=25)


def test_knn_entropy_without_repeated_tokens_is_the_released_formula():
    torch.manual_seed(0)
    z = torch.randn(200, 64) * 30 + 5
    assert knn_entropy(z).item() == pytest.approx(released_knn_entropy(z), rel=1e-6)
    # a token repeated k - 1 times keeps a positive k-th radius: still the released formula exactly
    few = torch.cat([z, z[:1].repeat(23, 1)])
    assert knn_entropy(few).item() == pytest.approx(released_knn_entropy(few), rel=1e-6)


def test_knn_entropy_of_a_window_that_repeats_one_token_stays_near_the_window_without_repeats():
    torch.manual_seed(0)
    z = torch.randn(200, 64) * 30 + 5  # residual-stream-like scale and offset
    repeated = torch.cat([z, z[:1].repeat(100, 1)])[torch.randperm(300)]  # one token 101 times
    released = released_knn_entropy(repeated)
    fixed = knn_entropy(repeated).item()
    assert released < knn_entropy(z).item() - 500  # the degeneracy: d * log(1e-10) for a third of the tokens
    assert fixed == pytest.approx(knn_entropy(z).item(), rel=0.01)
    # batched streams with and without the repeats are handled row by row
    both = torch.stack([torch.cat([z, z[:100]]), repeated])
    assert knn_entropy(both)[1].item() == pytest.approx(fixed, rel=1e-9)
    assert knn_entropy(both)[0].item() == pytest.approx(knn_entropy(both[0]).item(), rel=1e-9)


def test_knn_entropy_of_one_token_repeated_everywhere_is_the_released_value():
    z = torch.randn(1, 16).repeat(40, 1)
    assert knn_entropy(z).item() == pytest.approx(released_knn_entropy(z), rel=1e-6)


@pytest.mark.parametrize("estimator", ["bucket", "knn", "renyi"])
def test_entropy_with_subset_equals_the_entropy_of_the_subset(estimator):
    torch.manual_seed(0)
    z = torch.randn(3, 80, 16)
    z[1:, 0] *= 300  # a sink: the nearest neighbour of nobody, the farthest of everybody
    z[:, 40:70] = z[:, 40:41]  # and a token repeated 31 times (zero k-th radius for knn)
    keep = torch.ones(80, dtype=torch.bool)
    keep[[0, 7, 41]] = False  # the sink, an ordinary token and one of the copies
    h_all, h_keep = entropy_with_subset(z, estimator, keep)
    torch.testing.assert_close(h_all, entropy(z, estimator))
    torch.testing.assert_close(h_keep, entropy(z[:, keep], estimator), rtol=1e-5, atol=1e-4)


def test_norm_ratio_to_median_finds_one_massive_token():
    torch.manual_seed(0)
    z = torch.randn(2, 50, 32)
    z[1, 0] *= 300  # a sink in the second stream only
    ratio = norm_ratio_to_median(z.norm(dim=-1))
    assert ratio.shape == (2, 50)
    assert ratio[0].max().item() < 3
    assert ratio[1, 0].item() > 100 and ratio[1, 1:].max().item() < 3
    assert norm_ratio_to_median(torch.zeros(5, 8).norm(dim=-1)).max().item() == 0.0


def test_renyi_entropy_is_lower_for_clustered_than_spread_data():
    torch.manual_seed(0)
    clustered = torch.cat([torch.randn(150, 8) * 0.05 + 3, torch.randn(150, 8) * 0.05 - 3])
    spread = torch.randn(300, 8)
    assert renyi_entropy(clustered).item() < renyi_entropy(spread).item()


def test_batched_estimators_equal_one_at_a_time():
    torch.manual_seed(0)
    z = torch.randn(3, 64, 16)
    for name in ("bucket", "knn", "renyi"):
        batched = entropy(z, name)
        single = torch.stack([entropy(z[i], name) for i in range(3)])
        assert batched.shape == (3,)
        torch.testing.assert_close(batched, single)


def test_estimators_compute_in_float32_whatever_the_input_dtype():
    torch.manual_seed(0)
    z = torch.randn(128, 16)
    assert bucket_entropy(z.bfloat16()).dtype == torch.float64
    assert knn_entropy(z.half()).item() == pytest.approx(knn_entropy(z.half().float()).item(), rel=1e-5)


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="bucket, knn, renyi"):
        entropy(torch.randn(30, 4), "shannon")


def test_cosine_importance_and_angular_distance_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    assert cosine_importance(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_importance(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    assert cosine_importance(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert angular_distance(x, x).item() == pytest.approx(0.0, abs=2e-3)
    e1, e2 = torch.eye(2)[0].expand(5, 2), torch.eye(2)[1].expand(5, 2)
    assert angular_distance(e1, e2).item() == pytest.approx(0.5, abs=1e-6)  # orthogonal = 90 degrees


def test_angular_distance_matrix_is_symmetric_with_zero_diagonal():
    torch.manual_seed(0)
    streams = torch.randn(5, 30, 8)
    m = angular_distance_matrix(streams)
    assert m.shape == (5, 5)
    torch.testing.assert_close(m, m.T)
    assert m.diagonal().abs().max().item() < 2e-3
    assert m[1, 3].item() == pytest.approx(angular_distance(streams[1], streams[3]).item(), abs=1e-5)


@pytest.mark.parametrize("estimator", ["bucket", "knn", "renyi"])
def test_measuring_a_stream_per_pass_gives_what_one_pass_over_all_streams_gives(monkeypatch, estimator):
    # on the CPU the estimators measure as many streams per pass as fit CPU_PASS_BYTES; a budget of 1 byte
    # forces one stream per pass, a huge one every stream in one pass; 16 KiB makes passes of 2 streams here
    torch.manual_seed(0)
    z = torch.randn(2, 3, 40, 16)
    z[:, 1:, 0] *= 300
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 7]] = False
    b = torch.randn(2, 3, 40, 16)
    results = {}
    for budget in (1, 16 * 2**10, 2**40):
        monkeypatch.setattr(estimators, "CPU_PASS_BYTES", budget)
        results[budget] = (entropy(z, estimator), *entropy_with_subset(z, estimator, keep), token_cosine(z, b))
    for budget in (1, 16 * 2**10):
        for in_passes, one_pass in zip(results[budget], results[2**40], strict=True):
            assert in_passes.shape == one_pass.shape and in_passes.dtype == one_pass.dtype
            if estimator == "renyi":  # its float64 mean may be reduced in another order
                torch.testing.assert_close(in_passes, one_pass, rtol=1e-15, atol=0)
            else:
                assert torch.equal(in_passes, one_pass)
    assert results[1][0].shape == (2, 3)


def test_estimators_take_one_stream_without_leading_dimensions_and_one_token_cosines():
    torch.manual_seed(0)
    z = torch.randn(40, 16)
    assert entropy(z, "bucket").shape == () and entropy(z, "knn").shape == ()
    assert token_cosine(z[0], z[0]).item() == pytest.approx(1.0)  # one token: a scalar
    assert token_cosine(torch.randn(3, 0, 16), torch.randn(3, 0, 16)).shape == (3, 0)
    with pytest.raises(ValueError, match="bucket, knn, renyi"):
        entropy_with_subset(z, "kde", torch.ones(40, dtype=torch.bool))
