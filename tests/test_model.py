"""cluster_glip.model beyond the notebook's examples: torch.compile, checkpoints across resolutions and precisions, every
strategy's dropped patches, property tests on arbitrary kept sets, real open_clip architectures, and the error messages."""
import tempfile

import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from open_clip.model import CLIP

from cluster_glip.masking import STRATEGIES, Kept, PatchMasker, all_patches, keep_count
from cluster_glip.model import class_attention, compile_model, create_model, forward_gflops, kept_rows, patch_slice

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))   # tiny-vit-32: 4×4 patches of 8 px
TEXTS = torch.randint(1, 49407, (3, 77), generator=torch.Generator().manual_seed(1))


def tiny(masker=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_model('tiny-vit-32', masker=masker, **kwargs)


def perturbed(images, image, patches, patch=8, grid=4):
    "`images` with the given patches of image `image` replaced by fresh noise."
    changed = images.clone()
    for index in patches: changed[image, :, *patch_slice(index, grid, patch)] = torch.randn(3, patch, patch) * 3
    return changed


# --- torch.compile -------------------------------------------------------------------------------------------------

def test_compiled_training_step_matches_eager():
    "One graph (fullgraph) with a planned `kept`; forward features and every gradient equal eager's."
    model = tiny(PatchMasker('random', 0.5, patch_size=8)).train()
    kept = model.plan_mask(IMAGES, torch.Generator().manual_seed(0))
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')

    def step(m):
        model.zero_grad()
        out = m(IMAGES, TEXTS, kept=kept)
        (out['logit_scale'] * out['image_features'] @ out['text_features'].T).logsumexp(1).sum().backward()
        return out['image_features'].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (eager_features, eager_grads), (compiled_features, compiled_grads) = step(model), step(compiled)
    assert torch.allclose(compiled_features, eager_features, atol=1e-6)
    assert eager_grads.keys() == compiled_grads.keys() and 'visual.conv1.weight' in eager_grads
    for name in eager_grads: assert torch.allclose(compiled_grads[name], eager_grads[name], atol=1e-5), name


def test_inductor_image_forward_matches_eager():
    "The real CPU compiler (inductor) on the masked image forward, one graph."
    model = tiny(PatchMasker('gaussian', 0.75, patch_size=8)).train()
    kept = model.plan_mask(IMAGES, torch.Generator().manual_seed(0))
    compiled = torch.compile(model.encode_image, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(IMAGES, kept=kept), model.encode_image(IMAGES, kept=kept), atol=1e-5)


def test_compiled_model_plans_eagerly_with_a_generator():
    "Without `kept`, the plan runs eagerly (generator draws) and the compiled rest gives eager's result for the same seed."
    model = tiny(PatchMasker('random', 0.5, patch_size=8)).train()
    compiled = torch.compile(model, backend='aot_eager')
    with torch.no_grad():
        ours = compiled(IMAGES, TEXTS, generator=torch.Generator().manual_seed(3))
        eager = model(IMAGES, TEXTS, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours['kept'].indices, eager['kept'].indices)
    assert torch.allclose(ours['image_features'], eager['image_features'], atol=1e-6)



def test_compile_model_follows_token_count_changes_with_static_graphs():
    """The order that broke inductor's dynamic shapes on a GPU (unmasked, then masked: the token count changes) gives
    eager's features each time, through one static graph per count."""
    model = tiny().train()
    compiled = compile_model(model, backend='aot_eager')
    assert torch._dynamo.config.recompile_limit >= 64
    for masker, tokens in ((None, 17), (PatchMasker('random', 0.5, patch_size=8), 9), (None, 17)):
        model.masker = masker or PatchMasker(patch_size=8)
        with torch.no_grad():
            ours = compiled(IMAGES, TEXTS, generator=torch.Generator().manual_seed(3))
            eager = model(IMAGES, TEXTS, generator=torch.Generator().manual_seed(3))
        assert 1 + ours['kept'].indices.shape[1] == tokens
        assert torch.allclose(ours['image_features'], eager['image_features'], atol=1e-6)

# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_checkpoint_loads_at_another_resolution_as_open_clip_does(tmp_path):
    "A 32 px checkpoint into a 64 px model: open_clip's load_checkpoint resizes the positional embedding, same as stock."
    torch.save(tiny().state_dict(), tmp_path / 'small.pt')
    ours = create_model('tiny-vit-32', image_size=64, pretrained=str(tmp_path / 'small.pt')).eval()
    stock = open_clip.create_model('tiny-vit-32', force_image_size=64, pretrained=str(tmp_path / 'small.pt')).eval()
    assert ours.visual.positional_embedding.shape == (1 + 64, 64)
    assert all(torch.equal(v, stock.state_dict()[k]) for k, v in ours.state_dict().items())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert torch.allclose(ours.encode_image(images), stock.encode_image(images), atol=1e-5)


def test_low_precision_models_match_open_clip(tmp_path):
    "open_clip's 'bf16' precision (weights bf16, LayerNorm fp32) gives open_clip's features and keeps the key set."
    torch.save(tiny().state_dict(), tmp_path / 'w.pt')
    ours = create_model('tiny-vit-32', pretrained=str(tmp_path / 'w.pt'), precision='bf16').eval()
    stock = open_clip.create_model('tiny-vit-32', pretrained=str(tmp_path / 'w.pt'), precision='bf16').eval()
    assert {k: (v.dtype, v.shape) for k, v in ours.state_dict().items()} == \
           {k: (v.dtype, v.shape) for k, v in stock.state_dict().items()}
    images = IMAGES.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images).float(), stock.encode_image(images).float(), atol=2e-2)


@pytest.mark.parametrize('name', ['ViT-B-16', 'ViT-B-32-quickgelu', 'ViT-L-14-336', 'ViT-H-14-CLIPA', 'ViT-M-16-alt'])
def test_state_dict_is_open_clips_for_real_configs(name):
    "Keys, order and shapes equal open_clip's for open_clip's own configs (built on the meta device: no memory)."
    with torch.device('meta'):
        ours = create_model(name, masker=PatchMasker('random', 0.5, patch_size=int(name.split('-')[2][:2])))
        stock = open_clip.model.CLIP(**open_clip.get_model_config(name))
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in stock.state_dict().items()]


def test_unmasked_vit_b16_equals_open_clip():
    "The real ViT-B/16 architecture (random weights): all tokens kept = open_clip's encode_image; masked = 1 + 98 tokens."
    torch.manual_seed(0)
    model = create_model('ViT-B-16', masker=PatchMasker('random', 0.5, patch_size=16)).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), CLIP.encode_image(model, images), atol=1e-4)
        model.train()
        assert model(images, None, generator=torch.Generator().manual_seed(0))['kept'].indices.shape == (1, 98)


# --- masking through the model -------------------------------------------------------------------------------------

VARIANTS = [(name, {}) for name in sorted(STRATEGIES)] + [
    ('cluster', dict(features='embed')), ('cluster', dict(features='fused', fusion='cbrt')),
    ('cluster', dict(threshold=0.5, budget='exact')), ('cluster', dict(threshold='calibrated', budget='paper')),
    ('kmeans', dict(features='embed', n_clusters=4))]


def seen_patches(kept: Kept, n_patches: int) -> torch.Tensor:
    "[B, L] bool: the patches the transformer attends to (kept and not padding)."
    seen = torch.ones_like(kept.indices, dtype=torch.bool) if kept.padding is None else ~kept.padding
    return torch.zeros(kept.indices.shape[0], n_patches, dtype=torch.bool).scatter(1, kept.indices, seen)


@pytest.mark.parametrize('strategy, params', VARIANTS, ids=[f'{n}-{p}' if p else n for n, p in VARIANTS])
@pytest.mark.parametrize('ratio', [0.5, 0.75])
def test_dropped_patches_have_no_influence(strategy, params, ratio):
    "Every strategy: perturbing every patch the plan left out (or padded) leaves all features unchanged."
    model = tiny(PatchMasker(strategy, ratio, patch_size=8, **params)).train()
    model.masker.progress = 0.5
    kept = model.plan_mask(IMAGES, torch.Generator().manual_seed(0))
    L = 16
    if strategy != 'none' and kept.padding is None: assert kept.indices.shape == (3, keep_count(L, ratio))
    seen = seen_patches(kept, L)
    with torch.no_grad():
        base = model.encode_image(IMAGES, kept=kept)
        for image in range(3):
            unseen = [i for i in range(L) if not seen[image, i]]
            assert torch.allclose(model.encode_image(perturbed(IMAGES, image, unseen), kept=kept), base, atol=1e-6)


def structured_images():
    "Image 0: 12 identical patches (one big cluster) and 4 noise patches; images 1-2: noise (few clusters)."
    images = IMAGES.clone()
    tile = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(5))
    for index in range(12): images[0, :, *patch_slice(index, 4, 8)] = tile
    return images


@pytest.mark.parametrize('strategy, params', [('released', {}), ('cluster', dict(threshold=0.9, budget='paper'))])
def test_paper_budget_padding_is_hidden(strategy, params):
    "A real paper-budget plan pads image 0; its padding patches do not matter, and would if they were not masked."
    model = tiny(PatchMasker(strategy, 0.5, patch_size=8, **params)).train()
    images = structured_images()
    kept = next(k for seed in range(20) if (k := model.plan_mask(images, torch.Generator().manual_seed(seed))).padding[0].any())
    padded = kept.indices[0][kept.padding[0]].tolist()
    assert kept.padding.shape == kept.indices.shape and not kept.padding[1:].any()
    with torch.no_grad():
        base = model.encode_image(images, kept=kept)
        assert torch.allclose(model.encode_image(perturbed(images, 0, padded), kept=kept), base, atol=1e-6)
        unmasked = Kept(kept.indices, None, {})
        changed = model.encode_image(perturbed(images, 0, padded), kept=unmasked)
        assert not torch.allclose(changed[0], model.encode_image(images, kept=unmasked)[0], atol=1e-4)


def test_gradient_accumulation_reuses_the_plan():
    "Two passes with the same `kept` compute the same function; micro-batches are slices of the batch's plan."
    model = tiny(PatchMasker('gaussian', 0.5, patch_size=8)).train()
    kept = model.plan_mask(IMAGES, torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.encode_image(IMAGES, kept=kept)
        part = model.encode_image(IMAGES[:2], kept=kept_rows(kept, slice(0, 2)))
        assert torch.equal(model.encode_image(IMAGES, kept=kept), whole)
    assert torch.allclose(part, whole[:2], atol=1e-6)


UNMASKED = tiny(seed=1).eval()

@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_kept_set_any_order(data):
    "Property: for any kept subset in any order, dropped patches do not matter and the order of kept ones does not either."
    model = UNMASKED
    k = data.draw(st.integers(1, 16))
    order = data.draw(st.permutations(list(range(16))))
    indices = torch.tensor([order[:k]] * 3)                                               # [B, K], unsorted
    kept, reordered = Kept(indices, None, {}), Kept(indices.flip(1), None, {})
    with torch.no_grad():
        base = model.encode_image(IMAGES, kept=kept)
        assert torch.allclose(model.encode_image(IMAGES, kept=reordered), base, atol=1e-5)
        assert torch.allclose(model.encode_image(perturbed(IMAGES, 1, order[k:]), kept=kept), base, atol=1e-6)
        if k == 16: assert torch.allclose(base, model.encode_image(IMAGES, kept=all_patches(len(IMAGES), 16, IMAGES.device)), atol=1e-5)


def test_attention_strategy_gets_the_class_attention_of_a_full_forward():
    "The `attention` strategy keeps the patches the class token attends to most in the model's own full forward."
    model = tiny(PatchMasker('attention', 0.5, patch_size=8)).train()
    kept = model.plan_mask(IMAGES, torch.Generator().manual_seed(0))
    expected = class_attention(model.visual, IMAGES).topk(8, dim=1).indices.sort(1).values
    assert torch.equal(kept.indices.sort(1).values, expected)


# --- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    (dict(name='no-such-model'), 'unknown model'),
    (dict(name='RN50'), 'ResNet image tower'),
    (dict(name='coca_ViT-B-32'), 'attentional pooling'),
    (dict(name='tiny-vit-32', masker=PatchMasker('random', 0.5, patch_size=16)), 'patch_size=8'),
    (dict(name='tiny-vit-32', precision='fp8'), 'precision must be'),
    (dict(name='tiny-vit-32', vision_cfg=dict(open_clip.get_model_config('tiny-vit-32')['vision_cfg'], patch_dropout=0.5)),
     "PatchMasker\\('random', ratio\\)"),
    (dict(name='tiny-vit-32', pretrained='/no/such/file.pt'), 'checkpoint file or an open_clip tag'),
])
def test_errors_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message): create_model(kwargs.pop('name'), **kwargs)


def test_kept_for_another_batch_is_refused():
    model = tiny(PatchMasker('random', 0.5, patch_size=8)).train()
    kept = model.plan_mask(IMAGES[:2])
    with pytest.raises(ValueError, match='plan it with model.plan_mask'): model.encode_image(IMAGES, kept=kept)


def test_forward_gflops_counts_the_kept_tokens_only():
    "The library's FLOP count on a tiny model: 1 + K tokens, the closed form of a ViT, text tower unchanged by masking."
    full, half = forward_gflops('tiny-vit-64'), forward_gflops('tiny-vit-64', ratio=0.5)
    assert (full['tokens'], half['tokens']) == (65, 33) and full['text'] == half['text']
    closed_form = lambda n: (4 * (24 * n * 128 ** 2 + 4 * n ** 2 * 128) + 2 * 64 * 3 * 8 ** 2 * 128 + 2 * 128 * 128) / 1e9
    assert abs(half['image'] - closed_form(33)) < 1e-9 and abs(full['image'] - closed_form(65)) < 1e-9
