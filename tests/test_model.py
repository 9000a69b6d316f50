"""cluster_glip.model beyond the notebook's examples (nbs/01_model.ipynb holds the single-example tests: checkpoints across
resolutions and precisions, real open_clip architectures, every strategy's dropped patches, padding, plans re-used and
refused, the error messages, FLOP counts): torch.compile, slow on a CPU, and a property search over arbitrary kept sets."""
import torch
from hypothesis import given, settings, strategies as st

from cluster_glip.masking import Kept, PatchMasker, all_patches
from cluster_glip.model import compile_model, create_model, patch_slice

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


# --- property search ------------------------------------------------------------------------------------------------

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
