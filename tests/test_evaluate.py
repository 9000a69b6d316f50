"""Evaluation against CLIP_benchmark's and SugarCrepe's definitions, chance levels, formats and the command line.

The reference functions below restate, in plain loops, the formulas of LAION-AI/CLIP_benchmark
(`clip_benchmark/metrics/zeroshot_classification.py`, `zeroshot_retrieval.py`, `linear_probe.py`) and of
RAIVNLab/sugar-crepe (`main_eval.py`), as read from their sources; `cluster_glip.evaluate` must give the same numbers
on the same features.
"""
import json, math, warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from fastcore.script import anno_parser
from hypothesis import given, settings, strategies as st
from PIL import Image

from cluster_glip.config import packaged_configs
from sklearn.metrics import balanced_accuracy_score

from cluster_glip import evaluate as ev
from cluster_glip import formats as fmt
from cluster_glip.probe import WEIGHT_DECAYS, search_weight_decay, train_probe


# ---------------------------------------------------------------------------------------------------------- fixtures
def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=32,
                          vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
                          text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)).eval()


def flat_image(rgb, rng, size=32):
    pixels = np.array(rgb, np.int16) + rng.integers(-10, 11, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


NOUNS = ['apple', 'boat', 'chair', 'dog', 'engine', 'fork', 'guitar', 'house', 'island', 'jacket', 'kite', 'lamp',
         'mountain', 'needle', 'owl', 'piano', 'queen', 'river', 'spoon', 'tiger']


@pytest.fixture(scope='module')
def model(): return tiny_clip()


@pytest.fixture(scope='module')
def tokenizer(model): return ev.model_tokenizer(model)


@pytest.fixture(scope='module')
def transform(model): return ev.model_transform(model)


@pytest.fixture(scope='module')
def classification_root(tmp_path_factory):
    "20 classes, one random colour each, 5 images per class, two shards: CLIP_benchmark's layout."
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (len(NOUNS), 3))
    labels = [c for c in range(len(NOUNS)) for _ in range(5)]
    root = tmp_path_factory.mktemp('wds') / 'wds_nouns'
    fmt.write_wds(root, [flat_image(colours[c], rng) for c in labels], labels, classnames=NOUNS, shard_size=60,
                 templates=['a photo of a {c}.', 'a drawing of the {c}.', 'itap of a {c}.'], ext='jpg')
    return root


@pytest.fixture(scope='module')
def retrieval_set(tmp_path_factory):
    "40 images of random colours with 1 to 3 captions each, as a Karpathy JSON."
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp('karpathy')
    captions = [[f'a {NOUNS[(i + j) % 20]} next to a {NOUNS[(3 * i + j) % 20]}.' for j in range(1 + i % 3)] for i in range(40)]
    fmt.write_karpathy(root / 'dataset_x.json', root / 'images', [flat_image(rng.integers(0, 256, 3), rng) for _ in captions],
                      captions)
    return root


# ------------------------------------------------------------------------------- CLIP_benchmark, restated as references
def reference_zero_shot_classifier(model, tokenizer, classnames, templates):
    "CLIP_benchmark: per class, mean of L2-normalised prompt embeddings, renormalised; stacked as [E, C]."
    columns = []
    with torch.no_grad():
        for name in classnames:
            embedded = model.encode_text(tokenizer([t.format(c=name) for t in templates]))
            mean = F.normalize(embedded, dim=-1).mean(dim=0)
            columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


def reference_accuracy(output, target, topk=(1,)):
    "CLIP_benchmark's `accuracy`: the fraction of rows whose target is in the top k."
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def reference_recall_at_k(scores, positive_pairs, k):
    "CLIP_benchmark's `recall_at_k`: per query, true positives among the top k over the number of positives."
    n_queries, n_candidates = scores.shape
    topk = torch.topk(scores, k, dim=1)[1]
    onehot = F.one_hot(topk, num_classes=n_candidates)                       # [Q, k, N]
    true_positive = (onehot * positive_pairs.view(n_queries, 1, n_candidates)).sum(dim=(1, 2))
    return true_positive / positive_pairs.sum(dim=1)


def reference_retrieval(images_emb, texts_emb, texts_image_index, ks, batch_size=7):
    "CLIP_benchmark's retrieval metrics: scores = texts @ images.T, recall > 0 per query, batched over queries."
    scores = texts_emb @ images_emb.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), texts_image_index] = True
    def batched(s, p, k): return torch.cat([reference_recall_at_k(s[i:i + batch_size], p[i:i + batch_size], k)
                                            for i in range(0, len(s), batch_size)])
    metrics = {}
    for k in ks:
        metrics[f'image_retrieval_recall@{k}'] = (batched(scores, positive, k) > 0).float().mean().item()
        metrics[f'text_retrieval_recall@{k}'] = (batched(scores.T, positive.T, k) > 0).float().mean().item()
    return metrics


def reference_cosine_lr(optimizer, base_lr, warmup, steps):
    "CLIP_benchmark's `cosine_lr` (warm-up 0 in the probe)."
    def adjust(step):
        for group in optimizer.param_groups:
            group['lr'] = base_lr * (step + 1) / warmup if step < warmup else \
                0.5 * (1 + np.cos(np.pi * (step - warmup) / (steps - warmup))) * base_lr
    return adjust


def reference_train_probe(features, labels, n_classes, weight_decay, lr, epochs, batch_size, init, orders):
    "CLIP_benchmark's probe `train` loop, with the initial weights and each epoch's shuffling order supplied."
    probe = torch.nn.Linear(features.shape[1], n_classes)
    probe.load_state_dict(init)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    batches_per_epoch = math.ceil(len(features) / batch_size)
    scheduler = reference_cosine_lr(optimizer, lr, 0., epochs * batches_per_epoch)
    for epoch in range(epochs):
        for i in range(batches_per_epoch):
            index = orders[epoch][i * batch_size:(i + 1) * batch_size]
            scheduler(i + epoch * batches_per_epoch)
            optimizer.zero_grad()
            loss = criterion(probe(features[index]), labels[index])
            loss.backward()
            optimizer.step()
    return probe


def reference_find_peak_search(accuracy_of):
    "CLIP_benchmark's weight-decay sweep: `find_peak` over 7 points, then spans 8, 4, 2, 1 around the peak."
    wd_list = np.logspace(-6, 2, num=97).tolist()
    wd_list_init = np.logspace(-6, 2, num=7).tolist()
    def find_peak(idxs):
        best_idx, max_acc = 0, 0
        for idx in idxs:
            acc = accuracy_of(wd_list[idx])
            if max_acc < acc: best_idx, max_acc = idx, acc
        return best_idx
    peak = find_peak([i for i, v in enumerate(wd_list) if v in wd_list_init])
    span = 8
    while span > 0:
        peak = find_peak([max(peak - span, 0), peak, min(peak + span, len(wd_list) - 1)])
        span //= 2
    return wd_list[peak]


def reference_sugarcrepe(model, tokenizer, transform, image_root, subset):
    "SugarCrepe's `main_eval.py`: per item, 1 if the caption's score is strictly above the negative's."
    correct = 0
    with torch.no_grad():
        for item in subset.values():
            image = model.encode_image(transform(Image.open(image_root / item['filename'])).unsqueeze(0), normalize=True)
            positive = model.encode_text(tokenizer(item['caption']), normalize=True) @ image.t()
            negative = model.encode_text(tokenizer(item['negative_caption']), normalize=True) @ image.t()
            correct += 1 if positive.item() > negative.item() else 0
    return correct / len(subset)


# ------------------------------------------------------------------------------------------- agreement on a fixture
def test_zeroshot_classification_agrees_with_clip_benchmark(model, tokenizer, transform, classification_root):
    evalset = fmt.read_wds(classification_root, 'test', transform)
    ours = ev.zeroshot_classification(model, evalset, tokenizer, batch_size=32)
    classifier = reference_zero_shot_classifier(model, tokenizer, evalset.classnames, evalset.templates)  # [E, C]
    torch.testing.assert_close(ev.class_embeddings(model, tokenizer, evalset.classnames, evalset.templates, batch_size=8),
                               classifier.T, atol=1e-5, rtol=0)
    logits, targets = [], []
    with torch.no_grad():
        for images, target in torch.utils.data.DataLoader(evalset.data, batch_size=32):
            logits.append(100. * F.normalize(model.encode_image(images), dim=-1) @ classifier)
            targets.append(target)
    logits, targets = torch.cat(logits), torch.cat(targets)
    acc1, acc5 = reference_accuracy(logits, targets, topk=(1, 5))
    assert ours['top1'] == pytest.approx(acc1, abs=1e-7) and ours['top5'] == pytest.approx(acc5, abs=1e-7)  # ours: a float32 mean
    assert ours['mean_per_class_recall'] == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)), abs=1e-9)
    assert (ours['n_images'], ours['n_classes']) == (100, 20)


def test_retrieval_metrics_agree_with_clip_benchmark():
    generator = torch.Generator().manual_seed(0)
    n_captions = torch.randint(1, 6, (37,), generator=generator)
    texts_image_index = torch.repeat_interleave(torch.arange(37), n_captions)
    images = F.normalize(torch.randn(37, 16, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(len(texts_image_index), 16, generator=generator), dim=-1)
    ref = reference_retrieval(images, texts, texts_image_index, ks=(1, 5, 10))
    ours = ev.retrieval_metrics(images, texts, texts_image_index, ks=(1, 5, 10), chunk_size=5)
    for k in (1, 5, 10):
        assert ours[f'text_to_image_R@{k}'] == pytest.approx(ref[f'image_retrieval_recall@{k}'], abs=1e-9)
        assert ours[f'image_to_text_R@{k}'] == pytest.approx(ref[f'text_retrieval_recall@{k}'], abs=1e-9)


def test_zeroshot_retrieval_pipeline_agrees_with_clip_benchmark(model, tokenizer, transform, retrieval_set):
    evalset = fmt.read_karpathy(retrieval_set / 'dataset_x.json', retrieval_set / 'images', 'test', transform)
    ours = ev.zeroshot_retrieval(model, evalset, tokenizer, batch_size=16)
    images_emb, texts_emb, index = [], [], []
    with torch.no_grad():                                      # CLIP_benchmark's loop: captions flattened per batch
        for start in range(0, len(evalset.data), 16):
            batch = [evalset.data[i] for i in range(start, min(start + 16, len(evalset.data)))]
            images_emb.append(F.normalize(model.encode_image(torch.stack([b[0] for b in batch])), dim=-1))
            texts_emb.append(F.normalize(model.encode_text(tokenizer([t for b in batch for t in b[1]])), dim=-1))
            index += [start + i for i, b in enumerate(batch) for _ in b[1]]
    ref = reference_retrieval(torch.cat(images_emb), torch.cat(texts_emb), torch.tensor(index), ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert ours[f'text_to_image_R@{k}'] == pytest.approx(ref[f'image_retrieval_recall@{k}'], abs=1e-9)
        assert ours[f'image_to_text_R@{k}'] == pytest.approx(ref[f'text_retrieval_recall@{k}'], abs=1e-9)
    assert (ours['n_images'], ours['n_texts']) == (40, 79)   # 1 + i % 3 captions for image i


def test_linear_probe_training_agrees_with_clip_benchmark():
    generator = torch.Generator().manual_seed(3)
    features = F.normalize(torch.randn(150, 12, generator=generator), dim=-1)
    labels = torch.randint(0, 5, (150,), generator=generator)
    ours = train_probe(features, labels, 5, weight_decay=1e-3, lr=0.1, epochs=4, batch_size=64, seed=7)
    # the same random draws as train_probe makes: the initial weights, then one permutation per epoch
    draws = torch.Generator().manual_seed(7)
    bound = 1 / math.sqrt(12)
    init = {'weight': torch.empty(5, 12).uniform_(-bound, bound, generator=draws),
            'bias': torch.empty(5).uniform_(-bound, bound, generator=draws)}
    orders = [torch.randperm(150, generator=draws) for _ in range(4)]
    ref = reference_train_probe(features, labels, 5, 1e-3, 0.1, 4, 64, init, orders)
    torch.testing.assert_close(ours.weight, ref.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.bias, ref.bias, atol=1e-6, rtol=0)


def test_probe_initialisation_is_nn_linear_default():
    "Our generator-driven initialisation has nn.Linear's default distribution: uniform on ±1/sqrt(fan_in)."
    probe = train_probe(torch.zeros(1, 400), torch.zeros(1, dtype=torch.long), 300, epochs=0)
    default = torch.nn.Linear(400, 300)
    for ours, theirs in ((probe.weight, default.weight), (probe.bias, default.bias)):
        assert ours.abs().max() <= 1 / 20 and theirs.abs().max() <= 1 / 20
        assert abs(ours.std().item() - theirs.std().item()) < 0.1 * theirs.std().item()


@pytest.mark.parametrize('curve', ['peaked', 'plateau', 'zero', 'noisy'])
def test_weight_decay_search_agrees_with_clip_benchmark(curve):
    rng = np.random.default_rng(0)
    noise = {round(math.log10(w), 6): rng.random() for w in WEIGHT_DECAYS}
    accuracy_of = {'peaked': lambda w: 1 - abs(math.log10(w) + 1.3) / 10,
                   'plateau': lambda w: 0.5 if w < 1e-2 else 0.4,     # ties: the first strictly better one wins
                   'zero': lambda w: 0.0,                              # CLIP_benchmark then falls back to index 0
                   'noisy': lambda w: noise[round(math.log10(w), 6)]}[curve]
    assert search_weight_decay(accuracy_of) == reference_find_peak_search(accuracy_of)


def test_sugarcrepe_agrees_with_sugarcrepe_main_eval(model, tokenizer, transform, tmp_path):
    rng = np.random.default_rng(4)
    images = [flat_image(rng.integers(0, 256, 3), rng) for _ in range(12)]
    items = {name: [(i, f'a {NOUNS[i]} on a {NOUNS[(i + 1) % 20]}', f'a {NOUNS[(i + 1) % 20]} on a {NOUNS[i]}')
                    for i in range(12)] for name in ('swap_obj', 'replace_rel')}
    fmt.write_sugarcrepe(tmp_path / 'sc', tmp_path / 'val2017', images, items)
    with pytest.warns(UserWarning, match='subsets missing'):
        subsets = fmt.read_sugarcrepe(tmp_path / 'sc', tmp_path / 'val2017', transform)
    ours = ev.sugarcrepe(model, subsets, tokenizer, batch_size=5)
    for name in items:
        subset = json.loads((tmp_path / 'sc' / f'{name}.json').read_text())
        assert ours[f'acc_{name}'] == pytest.approx(reference_sugarcrepe(model, tokenizer, transform,
                                                                         tmp_path / 'val2017', subset), abs=1e-6)
    assert ours['acc_obj'] == ours['acc_swap_obj'] and ours['acc_rel'] == ours['acc_replace_rel']
    assert 'acc_att' not in ours


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_mean_per_class_recall_is_balanced_accuracy(n, n_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, n_classes, (n,), generator=generator)
    predictions = torch.randint(0, n_classes, (n,), generator=generator)
    with warnings.catch_warnings():               # scikit-learn warns when a predicted class never occurs
        warnings.simplefilter('ignore')
        expected = balanced_accuracy_score(targets, predictions)
    assert ev.mean_per_class_recall(predictions, targets, n_classes) == pytest.approx(expected, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_topk_accuracy_matches_a_direct_count(n, n_classes, seed):
    generator = torch.Generator().manual_seed(seed)
    logits, targets = torch.randn(n, n_classes, generator=generator), torch.randint(0, n_classes, (n,), generator=generator)
    for k, value in ev.topk_accuracy(logits, targets, (1, 2, 5)).items():
        rank = (logits > logits[torch.arange(n), targets][:, None]).sum(1)   # classes strictly better than the truth
        assert value == pytest.approx((rank < k).float().mean().item(), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 15), st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_recall_grows_with_k_and_is_one_when_k_covers_everything(n_images, seed, chunk_size):
    generator = torch.Generator().manual_seed(seed)
    text_image = torch.repeat_interleave(torch.arange(n_images), torch.randint(1, 4, (n_images,), generator=generator))
    images = F.normalize(torch.randn(n_images, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(len(text_image), 8, generator=generator), dim=-1)
    ks = (1, 2, 5, 100)
    metrics = ev.retrieval_metrics(images, texts, text_image, ks, chunk_size=chunk_size)
    assert metrics == ev.retrieval_metrics(images, texts, text_image, ks)
    for direction in ('image_to_text', 'text_to_image'):
        values = [metrics[f'{direction}_R@{k}'] for k in ks]
        assert values == sorted(values) and values[-1] == 1.0


# ------------------------------------------------------------------------------------------------- chance levels
def test_random_model_scores_at_chance_on_zero_shot_classification(model, tokenizer, transform, classification_root):
    """Chance is 1/20. Images of a class share a colour, so a random model effectively draws one guess per class: the
    number of classes it gets right is about Poisson(1), and 6 or more (top-1 >= 0.3) has probability below 1e-3."""
    for seed in (0, 1):
        net = tiny_clip(seed)
        metrics = ev.zeroshot_classification(net, fmt.read_wds(classification_root, 'test', transform), tokenizer,
                                             batch_size=50)
        assert metrics['top1'] < 0.3 and metrics['mean_per_class_recall'] < 0.3, metrics


def test_random_model_scores_at_chance_on_retrieval(model, tokenizer, transform, retrieval_set):
    """40 images, 79 captions: R@5 chance is 5/40 = 0.125 for caption queries and about 0.19 for image queries (1 to 3
    own captions among 79); 0.45 is more than four binomial standard deviations above either."""
    evalset = fmt.read_karpathy(retrieval_set / 'dataset_x.json', retrieval_set / 'images', 'test', transform)
    metrics = ev.zeroshot_retrieval(model, evalset, tokenizer)
    assert metrics['text_to_image_R@5'] < 0.45 and metrics['image_to_text_R@5'] < 0.45, metrics


def test_random_model_scores_at_chance_on_a_balanced_composition_set(model, tokenizer, transform, tmp_path):
    "Every (caption, negative) pair also appears the other way round, so chance is exactly 1/2."
    rng = np.random.default_rng(5)
    colours = rng.integers(0, 256, (10, 3))
    images = [flat_image(c, rng) for c in colours]
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    items = {name: [(a, f'a {NOUNS[a]} by the sea', f'a {NOUNS[b]} by the sea') for a, b in pairs]
             for name in fmt.SUGARCREPE_SUBSETS}
    fmt.write_sugarcrepe(tmp_path / 'sc', tmp_path / 'images', images, items)
    metrics = ev.sugarcrepe(model, fmt.read_sugarcrepe(tmp_path / 'sc', tmp_path / 'images', transform), tokenizer,
                            batch_size=90)
    assert all(0.35 < metrics[f'acc_{g}'] < 0.65 for g in ('obj', 'att', 'rel')), metrics


# ---------------------------------------------------------------------------------------------- formats and suites
def test_wds_retrieval_layout_and_workers(model, tokenizer, transform, tmp_path):
    "CLIP_benchmark's retrieval webdataset (`.txt`, one caption per line) read with 0 and 2 workers gives one answer."
    rng = np.random.default_rng(6)
    captions = [[f'the {NOUNS[i]}', f'one {NOUNS[i]} here'] for i in range(20)]
    fmt.write_wds(tmp_path / 'wds_caps', [flat_image(rng.integers(0, 256, 3), rng) for _ in captions], captions,
                 shard_size=6)
    assert (tmp_path / 'wds_caps' / 'dataset_type.txt').read_text().strip() == 'retrieval'
    evalset = fmt.read_wds(tmp_path / 'wds_caps', 'test', transform, kind='retrieval')
    assert next(iter(evalset.data))[1] == captions[0]
    serial = ev.zeroshot_retrieval(model, evalset, tokenizer, batch_size=4)
    parallel = ev.zeroshot_retrieval(model, evalset, tokenizer, batch_size=4, num_workers=2)
    assert serial == parallel and serial['n_texts'] == 40


def test_image_folder_reader_with_and_without_classnames(tmp_path, transform):
    rng = np.random.default_rng(7)
    folders = ['n001_tench', 'n002_goldfish', 'n003_shark']
    images = [flat_image(rng.integers(0, 256, 3), rng) for _ in range(6)]
    fmt.write_image_folder(tmp_path / 'tree', images, [0, 0, 1, 1, 2, 2], folders, ext='png')
    plain = fmt.read_image_folder(tmp_path / 'tree', transform)
    assert plain.classnames == ['n001 tench', 'n002 goldfish', 'n003 shark']
    assert [label for _, label in plain.data] == [0, 0, 1, 1, 2, 2]
    (tmp_path / 'tree' / 'classnames.txt').write_text('tench\ngoldfish\ngreat white shark\n')
    assert fmt.read_image_folder(tmp_path / 'tree', transform).classnames == ['tench', 'goldfish', 'great white shark']
    with pytest.raises(ValueError, match='3 class folders but 2 class names'):
        fmt.read_image_folder(tmp_path / 'tree', transform, classnames=['a', 'b'])


def test_suite_with_imagefolder_probe_cache_and_builtin_names(model, tokenizer, transform, tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    colours = rng.integers(0, 256, (3, 3))
    for split, per_class in (('train', 6), ('test', 3)):
        labels = [c for c in range(3) for _ in range(per_class)]
        fmt.write_image_folder(tmp_path / 'data' / 'tree' / split, [flat_image(colours[c], rng) for c in labels], labels,
                              ['a', 'b', 'c'])
    (tmp_path / 'names.txt').write_text('tench\ngoldfish\ngreat white shark\n')
    suite = {'name': 'tree', 'tasks': [
        {'task': 'zeroshot_classification', 'dataset': 'tree', 'format': 'imagefolder', 'path': 'tree', 'split': 'test',
         'classnames': str(tmp_path / 'names.txt'), 'templates': 'simple'},
        {'task': 'linear_probe', 'dataset': 'tree', 'format': 'imagefolder', 'path': 'tree', 'val_proportion': 0.34,
         'epochs': 2}]}
    monkeypatch.setenv(ev.ROOT_VARIABLE, str(tmp_path / 'data'))   # the root comes from the environment
    cache = tmp_path / 'features'
    first = ev.evaluate_suite(model, suite, feature_cache=cache, progress=False)
    assert [r['status'] for r in first] == ['ok', 'ok'] and first[0]['n_classes'] == 3
    assert first[1]['n_test'] == 9 and first[1]['weight_decay'] in WEIGHT_DECAYS
    assert len(list(cache.glob('*-tree-*.pt'))) == 2                # train and test features cached
    again = ev.evaluate_suite(model, suite, feature_cache=cache, progress=False)
    assert {k: v for k, v in again[1].items() if k != 'seconds'} == {k: v for k, v in first[1].items() if k != 'seconds'}


def test_shipped_suites_load_and_skip_missing_data(model, tmp_path):
    assert {'cluster_paper', 'glip', 'synthetic'} <= set(packaged_configs('eval'))
    for name in packaged_configs('eval'):
        with pytest.warns(UserWarning, match='skipped') as reports:   # each missing set is reported, none is fatal
            rows = ev.evaluate_suite(model, name, root=tmp_path, progress=False)
        assert rows and all(r['status'] in ('missing', 'skipped') for r in rows)
        assert len(reports) == sum(r['status'] == 'missing' for r in rows)
    with pytest.warns(UserWarning):
        glip = ev.evaluate_suite(model, 'glip', root=tmp_path, progress=False)
    assert [(r['masked'], r['status']) for r in glip if r['dataset'] == 'imagenet1k'] == [(False, 'missing'), (True, 'skipped')]


def test_suite_root_precedence(monkeypatch, tmp_path):
    suite = {'root': '~/somewhere'}
    monkeypatch.delenv(ev.ROOT_VARIABLE, raising=False)
    assert ev.suite_root(suite) == Path('~/somewhere').expanduser()
    monkeypatch.setenv(ev.ROOT_VARIABLE, str(tmp_path))
    assert ev.suite_root(suite) == tmp_path
    assert ev.suite_root(suite, '/explicit') == Path('/explicit')
    assert ev.suite_root({'root': '$NOT_A_SET_VARIABLE_XYZ/x'}, None) == tmp_path


# ------------------------------------------------------------------------------------------------- the command line
def run_cli(argv):
    "Parse `argv` exactly as fastcore's call_parse parses `cluster_glip eval ...`, then run eval_cli."
    args = vars(anno_parser(ev.eval_cli.__wrapped__, 'cluster_glip eval').parse_args(argv))
    args.pop('pdb'); args.pop('xtra')
    return ev.eval_cli(**args)


def test_eval_cli_on_a_stock_open_clip_checkpoint(tmp_path, classification_root, capsys):
    (tmp_path / 'configs').mkdir()
    (tmp_path / 'configs' / 'eval-test-tiny.json').write_text(json.dumps({'embed_dim': 32,
        'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'head_width': 32, 'patch_size': 8},
        'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 32, 'heads': 2, 'layers': 1}}))
    open_clip.add_model_config(tmp_path / 'configs')
    net = open_clip.create_model('eval-test-tiny')
    torch.save(net.state_dict(), tmp_path / 'plain.pt')              # a bare state dict, as open_clip exports
    (tmp_path / 'suite.yaml').write_text(json.dumps({'root': str(classification_root.parent), 'tasks': [
        {'task': 'zeroshot_classification', 'dataset': 'nouns', 'path': classification_root.name},
        {'task': 'zeroshot_classification', 'dataset': 'elsewhere', 'path': 'not_here'}]}))
    run_cli(['--checkpoint', str(tmp_path / 'plain.pt'), '--model', 'eval-test-tiny', '--suite', str(tmp_path / 'suite.yaml'),
             '--out', str(tmp_path / 'rows.jsonl'), '--device', 'cpu', '--workers', '0', '--batch_size', '25'])
    rows = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
    assert [(r['dataset'], r['status']) for r in rows] == [('nouns', 'ok'), ('elsewhere', 'missing')]
    assert rows[0]['checkpoint'] == str(tmp_path / 'plain.pt') and rows[0]['suite'] == 'suite'
    expected = ev.zeroshot_classification(net.eval(), fmt.read_wds(classification_root, 'test', ev.model_transform(net)),
                                          ev.model_tokenizer(net, 'eval-test-tiny'))
    assert rows[0]['top1'] == expected['top1'] and rows[0]['mean_per_class_recall'] == expected['mean_per_class_recall']
    printed = capsys.readouterr().out
    assert 'zeroshot_classification' in printed and 'zero-shot mean top-1 over 1 sets' in printed
    with pytest.raises(SystemExit, match='--masked needs --set masking.strategy'):
        run_cli(['--model', 'eval-test-tiny', '--suite', str(tmp_path / 'suite.yaml'), '--masked'])
    with pytest.raises(SystemExit, match="cluster_glip eval: --set lr=0.1: only masking.. can be set here.*not field 'lr'"):
        run_cli(['--model', 'eval-test-tiny', '--suite', str(tmp_path / 'suite.yaml'), '--set', 'lr=0.1'])
    with pytest.raises(SystemExit, match="cluster_glip eval: config field 'masking'"):
        run_cli(['--model', 'eval-test-tiny', '--suite', str(tmp_path / 'suite.yaml'), '--set', 'masking.strategy=nope'])


def test_masked_inference_is_refused_for_stock_models(model, classification_root, transform, tokenizer):
    evalset = fmt.read_wds(classification_root, 'test', transform)
    with pytest.raises(ValueError, match='stock open_clip model'):
        ev.zeroshot_classification(model, evalset, tokenizer, masked=True)
    with pytest.raises(ValueError, match='needs a model that masks'):
        ev.evaluate_suite(model, 'synthetic', masked='both', progress=False)


def test_eval_cli_masked_on_a_cluster_glip_checkpoint(tmp_path, classification_root):
    from cluster_glip.model import create_model
    net = create_model('tiny-vit-32')
    torch.save({'epoch': 3, 'state_dict': net.state_dict()}, tmp_path / 'ours.pt')
    (tmp_path / 'suite.yaml').write_text(json.dumps({'root': str(classification_root.parent), 'tasks': [
        {'task': 'zeroshot_classification', 'dataset': 'nouns', 'path': classification_root.name}]}))
    run_cli(['--checkpoint', str(tmp_path / 'ours.pt'), '--model', 'tiny-vit-32', '--suite', str(tmp_path / 'suite.yaml'),
             '--masked', '--set', 'masking.strategy=gaussian', '--set', 'masking.ratio=0.5', '--out', str(tmp_path / 'rows.jsonl'),
             '--device', 'cpu', '--workers', '0', '--seed', '5'])
    row, = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
    assert (row['status'], row['masked'], row['mask_strategy'], row['mask_ratio']) == ('ok', True, 'gaussian', 0.5)
    loaded = ev.load_model('tiny-vit-32', tmp_path / 'ours.pt', device='cpu', masking={'strategy': 'gaussian', 'ratio': 0.5})
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in net.state_dict().items())
    assert loaded.masker.masked_inference is False                      # switched on only inside a masked task
    evalset = fmt.read_wds(classification_root, 'test', ev.model_transform(loaded))
    tokenizer = ev.model_tokenizer(loaded, 'tiny-vit-32')
    direct = ev.zeroshot_classification(loaded, evalset, tokenizer, masked=True, seed=5)
    assert row['top1'] == direct['top1'] and row['mean_per_class_recall'] == direct['mean_per_class_recall']
    full = ev.image_features(loaded, evalset)[0]
    assert not torch.allclose(full, ev.image_features(loaded, evalset, masked=True, seed=5)[0], atol=1e-3)


def test_masked_inference_refuses_a_masker_that_does_not_mask(classification_root):
    from cluster_glip.model import create_model
    net = create_model('tiny-vit-32').eval()                                 # default masker: strategy 'none'
    with pytest.raises(ValueError, match="does not mask \\(strategy 'none'"):
        ev.image_features(net, fmt.read_wds(classification_root, 'test', ev.model_transform(net)), masked=True)


def test_eval_cli_mask_strategy_gives_both_columns_where_the_suite_asks(tmp_path, classification_root):
    "GLIP's row: an entry marked `masked: both` is evaluated full and masked when the model is given a masker."
    from cluster_glip.model import create_model
    torch.save(create_model('tiny-vit-32').state_dict(), tmp_path / 'ours.pt')
    (tmp_path / 'suite.yaml').write_text(json.dumps({'root': str(classification_root.parent), 'tasks': [
        {'task': 'zeroshot_classification', 'dataset': 'nouns', 'path': classification_root.name, 'masked': 'both'},
        {'task': 'zeroshot_classification', 'dataset': 'nouns_full', 'path': classification_root.name}]}))
    argv = ['--checkpoint', str(tmp_path / 'ours.pt'), '--model', 'tiny-vit-32', '--suite', str(tmp_path / 'suite.yaml'),
            '--device', 'cpu', '--workers', '0']
    run_cli(argv + ['--set', 'masking.strategy=random', '--set', 'masking.ratio=0.75', '--out', str(tmp_path / 'both.jsonl')])
    rows = [json.loads(line) for line in (tmp_path / 'both.jsonl').read_text().splitlines()]
    assert [(r['dataset'], r['masked'], r['status']) for r in rows] == \
        [('nouns', False, 'ok'), ('nouns', True, 'ok'), ('nouns_full', False, 'ok')]
    run_cli(argv + ['--out', str(tmp_path / 'stock.jsonl')])          # no masker: open_clip's own model, masked pass skipped
    stock = [json.loads(line) for line in (tmp_path / 'stock.jsonl').read_text().splitlines()]
    assert [(r['masked'], r['status']) for r in stock] == [(False, 'ok'), (True, 'skipped'), (False, 'ok')]
    assert type(ev.load_model('tiny-vit-32', tmp_path / 'ours.pt', device='cpu')) is open_clip.CLIP


@pytest.fixture(scope='module')
def synthetic_bundle(tmp_path_factory):
    "A small bundle from the data module: its held-out sets are what the `synthetic` suite reads."
    from cluster_glip.synthetic import write_synthetic_bundle
    root = tmp_path_factory.mktemp('bundle') / 'synthetic'
    write_synthetic_bundle(root, n_train=8, n_zeroshot=96, n_retrieval=40, n_sugarcrepe=24, shard_size=8,
                           processes=1, image_size=32)
    return root


def test_synthetic_suite_reads_the_data_modules_sets_and_a_random_model_is_at_chance(synthetic_bundle):
    from cluster_glip.model import create_model
    rows = ev.evaluate_suite(create_model('tiny-vit-32'), 'synthetic', root=synthetic_bundle, progress=False)
    assert [(r['task'], r['status']) for r in rows] == [('zeroshot_classification', 'ok'), ('zeroshot_retrieval', 'ok'),
                                                        ('zeroshot_retrieval', 'ok'), ('sugarcrepe', 'ok')]
    zeroshot, karpathy, wds_layout, crepe = rows
    assert (zeroshot['n_images'], zeroshot['n_classes']) == (96, 24)
    assert (karpathy['n_images'], karpathy['n_texts']) == (wds_layout['n_images'], wds_layout['n_texts']) == (40, 200)
    assert all(crepe[f'n_{s}'] == 24 for s in fmt.SUGARCREPE_SUBSETS)
    # chance: 1/24 top-1 (one guess per class: at most 5 of 24 classes right, p < 1e-3); R@5 5/40 (caption queries)
    # and about 0.50 (image queries, 5 own captions among 200); four standard deviations of 40 queries above them
    assert zeroshot['top1'] < 0.25
    assert karpathy['text_to_image_R@5'] < 0.125 + 4 * math.sqrt(0.125 * 0.875 / 40)
    assert karpathy['image_to_text_R@5'] < ev.chance_levels(karpathy)['image_to_text_R@5'] + 4 * math.sqrt(0.25 / 40)
