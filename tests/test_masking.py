"""Property tests for cluster_glip.masking: the contract every strategy keeps, on random shapes, ratios and seeds.

The notebook (nbs/00_masking.ipynb) shows each property on examples, and holds the single-example tests (the masker's
state dict and evaluation identity, ratio 0, the error messages, calibration once); here hypothesis searches for
counter-examples, and one test needs a GPU.
"""
import math

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from cluster_glip.masking import (Kept, anchor_count, bisect_threshold, count_components, gaussian_prior, keep_count,
                                  keep_indices, keep_top, mask_patches, masked_fraction, paper_budget, trim_clusters,
                                  uniform_noise, visible_mask)
from cluster_glip.pgs import cosine_matrix, edge_map, sinkhorn

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ratios = st.floats(0, 0.999, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


def images(batch, grid_h, grid_w, patch, seed):
    "Smooth random images with some structure, so clusters form."
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, max(1, grid_h // 2), max(1, grid_w // 2), generator=g)
    pixels = torch.nn.functional.interpolate(coarse, size=(grid_h * patch, grid_w * patch), mode='bilinear')
    return pixels + 0.1 * torch.randn(pixels.shape, generator=g)


EXACT = {  # strategy configs with an exact budget, each needing at least this many patches
    'random': ({}, 1), 'gaussian': ({'sigma': 0.2}, 1), 'cluster': ({}, 2),
    'cluster-fused': ({'features': 'fused', 'progress': 0.3}, 2), 'cluster-tau': ({'threshold': 0.6}, 2),
    'cluster-calibrated': ({'threshold': 'calibrated', 'normalize': 'image'}, 2), 'cluster-none': ({'normalize': 'none'}, 2),
    'kmeans': ({'n_clusters': 2, 'steps': 3}, 2), 'attention': ({}, 1), 'block': ({'min_block': 2}, 1),
    'pgs': ({}, 2), 'pgs-rgb': ({'features': 'rgb', 'edge_ratio': 0.1}, 2), 'pgs-fused': ({'progress': 0.3}, 2)}


def run(config, pixels, ratio, patch, seed, **extra):
    params, _ = EXACT[config]
    b, n = pixels.shape[0], (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, 8, generator=torch.Generator().manual_seed(1))
    attention = torch.rand(b, n, generator=torch.Generator().manual_seed(2))
    return mask_patches(pixels, config.split('-')[0], ratio, patch, tokens=tokens, generator=g,
                        cls_attention=lambda: attention, **{**params, **extra})


@SETTINGS
@given(st.integers(1, 10_000), ratios)
def test_keep_count_formula(n, ratio):
    k = keep_count(n, ratio)
    assert k == max(1, math.floor(n * (1 - ratio))) and 1 <= k <= n
    assert keep_count(n, min(0.999, ratio + 0.1)) <= k


@SETTINGS
@given(st.sampled_from(sorted(EXACT)), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), ratios, seeds)
def test_every_strategy_keeps_exactly_k_unique_sorted_patches(config, batch, gh, gw, ratio, seed):
    assume(gh * gw >= EXACT[config][1])
    pixels = images(batch, gh, gw, 4, seed)
    kept = run(config, pixels, ratio, 4, seed)
    n = gh * gw
    assert isinstance(kept, Kept) and kept.padding is None
    assert kept.indices.shape == (batch, keep_count(n, ratio)) and kept.indices.dtype == torch.int64
    assert (kept.indices.diff(dim=1) > 0).all() and kept.indices.min() >= 0 and kept.indices.max() < n
    assert kept.stats['drop_fraction'].ndim == 0
    assert abs(kept.stats['drop_fraction'].item() - (n - keep_count(n, ratio)) / n) < 1e-6
    assert (run(config, pixels, ratio, 4, seed).indices == kept.indices).all()  # deterministic
    if ratio == 0: assert (kept.indices == torch.arange(n)).all()


@SETTINGS
@given(st.sampled_from(sorted(EXACT)), seeds)
def test_masks_vary_across_generators(config, seed):
    assume(config != 'attention')  # a function of the given attention only
    pixels = images(4, 8, 8, 4, 0)
    assert (run(config, pixels, 0.5, 4, seed).indices != run(config, pixels, 0.5, 4, seed + 1).indices).any()


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9), st.floats(0, 1), seeds)
def test_count_components_matches_scipy(batch, gh, gw, density, seed):
    hidden = torch.rand(batch, gh, gw, generator=torch.Generator().manual_seed(seed)) < density
    expected = [ndimage.label(h.numpy())[1] for h in hidden]  # default structure: 4-neighbour
    assert count_components(hidden).tolist() == expected
    counts = hidden.flatten(1).sum(1)
    if (counts == counts[0]).all():
        assert count_components(hidden, int(counts[0])).tolist() == expected


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 60), st.floats(0, 1), st.floats(0, 0.9), st.integers(0, 20), seeds)
def test_paper_budget_pads_exactly_the_readded_clustered_patches(batch, n, density, min_drop, extra, seed):
    g = torch.Generator().manual_seed(seed)
    clustered = torch.rand(batch, n, generator=g) < density
    indices, padding = paper_budget(clustered, min_drop, uniform_noise((batch, n), 'cpu', g), torch.tensor(float(extra)))
    visible = n - clustered.sum(1)
    lk = max(1, min(math.floor(n * (1 - min_drop)), int(visible.max()) + extra))  # extra: the PGS release's edge mass
    assert indices.shape == padding.shape == (batch, lk) and (indices.diff(dim=1) > 0).all()
    assert (padding == clustered.gather(1, indices)).all()
    assert ((~padding).sum(1) == visible.clamp(max=lk)).all()
    assert (padding.sum(1) == (lk - visible).clamp(min=0)).all()


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 40), st.integers(1, 5), st.floats(-0.5, 0.9), ratios, seeds)
def test_trim_clusters_drops_whole_clusters_in_order(batch, n, n_anchors, tau, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    similarity = torch.rand(batch, n_anchors, n, generator=g) * 2 - 1
    k = keep_count(n, ratio)
    indices = trim_clusters(similarity, tau, k, uniform_noise((batch, n), 'cpu', g))
    assert indices.shape == (batch, k) and (indices.diff(dim=1) > 0).all()
    hidden = torch.ones(batch, n, dtype=torch.bool).scatter(1, indices, False)
    member = similarity > tau
    for b in range(batch):
        union = torch.zeros(n, dtype=torch.bool)
        for a in range(n_anchors):  # the hidden set is a prefix of clusters, the last one maybe partial
            before, union = union.clone(), union | member[b, a]
            if hidden[b][union].all(): continue
            assert (hidden[b] & ~union).sum() == 0  # nothing hidden beyond the partially dropped cluster
            partial = member[b, a] & ~before
            sims = similarity[b, a][partial]
            dropped = hidden[b][partial]
            if dropped.any() and (~dropped).any():  # the most similar patches of the partial cluster go first
                assert sims[dropped].min() >= sims[~dropped].max()
            break
        else:
            assert hidden[b][union].all()  # all clusters dropped, topped up with random visible patches


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 7), st.integers(2, 7), ratios, seeds)
def test_adaptive_threshold_hides_the_patches_most_similar_to_any_anchor(batch, gh, gw, ratio, seed):
    pixels = images(batch, gh, gw, 4, seed)
    n = gh * gw
    n_anchors = anchor_count(n, 0.2)
    kept = mask_patches(pixels, 'cluster', ratio, 4, generator=torch.Generator().manual_seed(seed), anchor_ratio=0.2)
    # recompute the similarities independently: per-patch standardised patches, full L × L cosine with numpy
    g = torch.Generator().manual_seed(seed)
    anchors = uniform_noise((batch, n), 'cpu', g).topk(n_anchors, dim=1).indices.numpy()
    patches = pixels.reshape(batch, 3, gh, 4, gw, 4).permute(0, 2, 4, 3, 5, 1).reshape(batch, n, 48).double().numpy()
    z = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    unit = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    for b in range(batch):
        cosine = unit[b] @ unit[b].T
        cosine[anchors[b], anchors[b]] = 1.0
        best = np.clip(cosine[anchors[b]], -1, 1).max(0)
        seen = visible_mask(kept, n)[b].numpy()
        if (~seen).any() and seen.any():
            assert best[~seen].min() >= best[seen].max() - 1e-5


@SETTINGS
@given(st.integers(1, 20), st.integers(2, 50), st.floats(0.05, 0.95), st.sampled_from(['exact', 'paper']), seeds)
def test_bisection_hits_its_target(batch, n, target, budget, seed):
    best = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    min_drop = 0.0
    tau = bisect_threshold(best, target, budget, min_drop)
    assert -1 <= tau <= 1
    ties = int(torch.unique(best, return_counts=True)[1].max())  # equal similarities cross τ together
    step = ties / n if budget == 'paper' else ties / (batch * n)  # the largest jump of the masked fraction
    assert abs(masked_fraction(best, tau, budget, min_drop).item() - target) <= max(1e-3, step) + 1e-6


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 8), st.floats(0.01, 5), ratios, seeds)
def test_gaussian_is_noise_plus_the_unnormalised_prior(gh, gw, sigma, ratio, seed):
    pixels = torch.zeros(2, 3, gh * 4, gw * 4)
    kept = keep_indices(pixels, 'gaussian', ratio, 4, generator=torch.Generator().manual_seed(seed), sigma=sigma)
    noise = torch.rand(2, gh * gw, generator=torch.Generator().manual_seed(seed)).double().numpy()
    ci, cj = np.linspace(-1, 1, gh), np.linspace(-1, 1, gw)
    prior = np.exp(-(ci[:, None] ** 2 + cj[None, :] ** 2) / (2 * sigma)) / (2 * np.pi * sigma)
    np.testing.assert_allclose(gaussian_prior(gh, gw, sigma).numpy(), prior, rtol=1e-5, atol=1e-7)
    k = keep_count(gh * gw, ratio)
    scores = noise + prior.ravel()
    for b in range(2):
        expected = np.sort(np.argsort(-scores[b], kind='stable')[:k])
        margin = np.sort(scores[b])[::-1]
        if k < len(margin) and margin[k - 1] - margin[k] < 1e-5: continue  # float32 vs float64 near-tie
        assert kept[b].tolist() == expected.tolist()


@SETTINGS
@given(st.integers(1, 5), st.integers(2, 30), st.integers(1, 30), seeds)
def test_keep_top_is_a_lexicographic_top_k(batch, n, k, seed):
    assume(k <= n)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (batch, n), generator=g).float()  # many ties
    tiebreak = torch.rand(batch, n, generator=g)
    kept = keep_top(scores, k, tiebreak)
    for b in range(batch):
        order = sorted(range(n), key=lambda i: (-scores[b, i].item(), -tiebreak[b, i].item()))
        assert kept[b].tolist() == sorted(order[:k])


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 7), st.integers(2, 7), ratios, st.floats(0, 0.9), seeds)
def test_pgs_drops_an_edge_patch_only_when_no_other_is_left(batch, gh, gw, ratio, edge_ratio, seed):
    pixels = images(batch, gh, gw, 4, seed)
    n, n_edges = gh * gw, math.floor(gh * gw * edge_ratio)
    kept = mask_patches(pixels, 'pgs', ratio, 4, generator=torch.Generator().manual_seed(seed), features='rgb',
                        edge_ratio=edge_ratio)
    hidden = ~visible_mask(kept, n)                                                        # [B, L]
    edges = edge_map(pixels, 4)                                                            # [B, L]
    for b in range(batch):
        order = edges[b].argsort(descending=True)
        top, rest = order[:n_edges], order[n_edges:]
        if edges[b][top].numel() and rest.numel() and edges[b][top].min() == edges[b][rest].max(): continue  # a tie
        if hidden[b][top].any(): assert hidden[b][rest].all()                              # edges go last
        assert hidden[b].sum() == n - keep_count(n, ratio)


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 40), st.integers(1, 64), st.floats(0.1, 1.0), seeds)
def test_sinkhorn_makes_cosine_similarities_doubly_stochastic(batch, n, dim, epsilon, seed):
    features = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed))
    plan = sinkhorn(cosine_matrix(features), epsilon, 200)
    assert (plan > 0).all() and torch.isfinite(plan).all()
    assert (plan.sum(1) - 1).abs().max() < 1e-4                                            # the last step: columns
    assert (plan.sum(2) - 1).abs().max() < 1e-3                                            # rows, up to the tolerance


@pytest.mark.parametrize('strategy', ['pgs', 'pgs_released'])
def test_pgs_strategies_go_through_a_training_step(strategy, one_thread):
    "A tiny masked CLIP takes two optimiser steps with each PGS strategy, fused features (the tokens) included."
    from cluster_glip.masking import PatchMasker
    from cluster_glip.model import create_model
    from cluster_glip.step import make_optimizer, train_step
    torch.manual_seed(0)
    model = create_model('tiny-vit-32', masker=PatchMasker(strategy, 0.5, patch_size=8))
    assert model.masker.needs_tokens                                                       # fused by default
    model.masker.progress = 0.5
    images, texts = torch.randn(8, 3, 32, 32), torch.randint(1, 49408, (8, 77))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_optimizer(model, 1e-3)
    for s in range(2):
        out = train_step(model, [(images, texts)], optimizer, generator=torch.Generator().manual_seed(s))
        assert torch.isfinite(out['loss']) and not out['skipped']
        assert 0 < out['mask']['drop_fraction'] < 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pgs_fields_are_config_fields_checked_before_a_run():
    from cluster_glip.config import ConfigError, load_config
    cfg = load_config('tiny', train_data='-', masking={'strategy': 'pgs_released', 'ratio': 0.5, 'min_drop': 0.5})
    assert cfg.masking['min_drop'] == 0.5
    for masking, says in [({'strategy': 'pgs', 'ratio': 0.5, 'edge_ratio': 1.5}, 'edge_ratio must be'),
                          ({'strategy': 'pgs', 'ratio': 0.5, 'epsilon': 0}, 'epsilon must be'),
                          ({'strategy': 'pgs_released', 'ratio': 0.5, 'tau': 0.5}, 'has no parameter tau')]:
        with pytest.raises(ConfigError, match=says) as error:
            load_config('tiny', train_data='-', masking=masking)
        assert "config field 'masking'" in str(error.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_masks_stay_on_the_device_without_host_syncs():
    pixels = images(8, 14, 14, 16, 0).cuda()
    generator = torch.Generator('cuda').manual_seed(0)
    mask_patches(pixels, 'random', 0.5, 16, generator=generator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for config in EXACT:
            if config == 'cluster-calibrated': continue  # the one-off bisection reads the host by design
            params, _ = EXACT[config]
            kept = mask_patches(pixels, config.split('-')[0], 0.5, 16, generator=generator,
                                tokens=torch.randn(8, 196, 8, device='cuda'),
                                cls_attention=lambda: torch.rand(8, 196, device='cuda'), **params)
            assert kept.indices.is_cuda and all(v.is_cuda for v in kept.stats.values())
    finally:
        torch.cuda.set_sync_debug_mode('default')
