"""Evaluation tests that do not belong in the notebooks: property searches (hypothesis), DataLoader workers, and end-to-end
runs of `cluster_glip eval` and of the synthetic suite.

The agreement checks with LAION-AI/CLIP_benchmark and RAIVNLab/sugar-crepe (their formulas restated in plain loops), the
chance levels on small fixtures, the readers and the suite behaviour are examples in the notebooks, next to what they
check: `nbs/07_evaluate.ipynb`, `nbs/07b_probe.ipynb`, `nbs/02_formats.ipynb`.
"""
import json, math, os, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from fastcore.script import anno_parser
from hypothesis import given, settings, strategies as st
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from cluster_glip import evaluate as ev
from cluster_glip import formats as fmt


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


# ------------------------------------------------------------------------------------------ property searches
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


# ---------------------------------------------------------------------------------- DataLoader workers
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
             '--out', str(tmp_path / 'rows.jsonl'), '--device', 'cpu', '--workers', '0', '--batch_size', '25', '--skip_missing'])
    rows = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
    assert [(r['dataset'], r['status']) for r in rows] == [('nouns', 'ok'), ('elsewhere', 'missing')]
    assert rows[0]['checkpoint'] == str(tmp_path / 'plain.pt') and rows[0]['suite'] == 'suite'
    expected = ev.zeroshot_classification(net.eval(), fmt.read_wds(classification_root, 'test', ev.model_transform(net)),
                                          ev.model_tokenizer(net, 'eval-test-tiny'))
    assert rows[0]['top1'] == expected['top1'] and rows[0]['mean_per_class_recall'] == expected['mean_per_class_recall']
    printed = capsys.readouterr().out
    assert 'zeroshot_classification' in printed and 'zero-shot mean top-1 over 1 sets' in printed
    with pytest.raises(SystemExit, match='--masked needs a masking: a random init records none'):
        run_cli(['--model', 'eval-test-tiny', '--suite', str(tmp_path / 'suite.yaml'), '--masked'])
    with pytest.raises(SystemExit, match="cluster_glip eval: --set lr=0.1: only masking.. can be set here.*not field 'lr'"):
        run_cli(['--model', 'eval-test-tiny', '--suite', str(tmp_path / 'suite.yaml'), '--set', 'lr=0.1'])
    with pytest.raises(SystemExit, match="cluster_glip eval: config field 'masking'"):
        run_cli(['--model', 'eval-test-tiny', '--suite', str(tmp_path / 'suite.yaml'), '--set', 'masking.strategy=nope'])


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


def test_eval_cli_masks_as_the_checkpoint_trained_and_never_calibrates_on_eval_data(tmp_path, classification_root,
                                                                                   monkeypatch):
    "A calibrated cluster run evaluated `--masked` with no --set: its strategy, parameters, τ and progress; no calibration."
    from cluster_glip.config import load_config
    from cluster_glip.masking import PatchMasker
    from cluster_glip.rundir import load_checkpoint
    from cluster_glip.synthetic import write_synthetic_shards
    from cluster_glip.train import train
    masking = {'strategy': 'cluster', 'ratio': 0.5, 'threshold': 'calibrated', 'budget': 'paper', 'min_drop': 0.3,
               'features': 'fused'}
    shards = write_synthetic_shards(tmp_path / 'shards', 64, shard_size=64, processes=1)['shards']
    summary = train(load_config('tiny', model='tiny-vit-32', train_data=shards, batch_size=16, steps=6, warmup=1, workers=0,
                                tune_steps=0, progress_bar=False, device='cpu', masking=masking, output_dir=str(tmp_path / 'run')))
    saved = load_checkpoint(summary['checkpoint'])
    assert saved['mask_threshold'] is not None and saved['mask_progress'] > 0
    (tmp_path / 'suite.yaml').write_text(json.dumps({'root': str(classification_root.parent), 'tasks': [
        {'task': 'zeroshot_classification', 'dataset': 'nouns', 'path': classification_root.name}]}))
    argv = ['--checkpoint', summary['checkpoint'], '--suite', str(tmp_path / 'suite.yaml'), '--masked', '--device', 'cpu',
            '--workers', '0']
    # the installed command, end to end
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, '-c', 'import sys; from cluster_glip.cli import main; sys.exit(main())', 'eval',
                             *argv, '--out', str(tmp_path / 'command.jsonl')], capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'PYTHONPATH': str(root), 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr
    row, = [json.loads(line) for line in (tmp_path / 'command.jsonl').read_text().splitlines()]
    assert (row['status'], row['masked'], row['mask_strategy'], row['mask_ratio'], row['mask_threshold']) == \
        ('ok', True, 'cluster', 0.5, saved['mask_threshold'])
    # the same in this process, counting calibrations
    calls, calibrate = [], PatchMasker.calibrate
    monkeypatch.setattr(PatchMasker, 'calibrate', lambda self, *a, **k: calls.append(1) or calibrate(self, *a, **k))
    run_cli(argv + ['--out', str(tmp_path / 'rows.jsonl')])
    again, = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
    assert again['top1'] == row['top1'] and again['mask_threshold'] == saved['mask_threshold'] and calls == []
    with pytest.raises(SystemExit, match="no cluster threshold τ .threshold 'calibrated'.: it is calibrated on training data"):
        run_cli(argv + ['--set', 'masking.ratio=0.7'])               # another ratio: the saved τ does not apply
    assert calls == []
    torch.save(load_checkpoint(summary['checkpoint'])['state_dict'], tmp_path / 'stock.pt')
    with pytest.raises(SystemExit, match='--masked needs a masking: .*stock.pt records none'):
        run_cli(['--checkpoint', str(tmp_path / 'stock.pt'), '--model', 'tiny-vit-32', *argv[2:]])


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


def test_eval_cli_takes_the_architecture_from_a_cluster_glip_checkpoint(tmp_path, classification_root):
    "Our checkpoints record their model (`model_name`, `config['model']`): no --model needed, a contradicting one refused."
    from cluster_glip.model import create_model
    net = create_model('tiny-vit-32')
    torch.save({'step': 2, 'model_name': 'tiny-vit-32', 'config': {'model': 'tiny-vit-32'}, 'state_dict': net.state_dict()},
               tmp_path / 'step_00000002.pt')
    torch.save({'step': 2, 'config': {'model': 'tiny-vit-32'}, 'state_dict': net.state_dict()}, tmp_path / 'config_only.pt')
    (tmp_path / 'suite.yaml').write_text(json.dumps({'root': str(classification_root.parent), 'tasks': [
        {'task': 'zeroshot_classification', 'dataset': 'nouns', 'path': classification_root.name}]}))
    common = ['--suite', str(tmp_path / 'suite.yaml'), '--device', 'cpu', '--workers', '0']
    for name in ('step_00000002.pt', 'config_only.pt'):
        run_cli(['--checkpoint', str(tmp_path / name), '--out', str(tmp_path / f'{name}.jsonl'), *common])
        row, = [json.loads(line) for line in (tmp_path / f'{name}.jsonl').read_text().splitlines()]
        assert row['status'] == 'ok' and row['n_classes'] == len(NOUNS)
    with pytest.raises(SystemExit, match="cluster_glip eval: .*step_00000002.pt holds a 'tiny-vit-32' model, not 'ViT-B-16'"):
        run_cli(['--checkpoint', str(tmp_path / 'step_00000002.pt'), '--model', 'ViT-B-16', *common])
    torch.save(net.state_dict(), tmp_path / 'stock.pt')                 # a stock checkpoint records nothing
    with pytest.raises(SystemExit, match='does not record its architecture .* --model ViT-B-16'):
        run_cli(['--checkpoint', str(tmp_path / 'stock.pt'), *common])
    with pytest.raises(SystemExit, match='no model: name an open_clip architecture'):
        run_cli(common)
    assert ev.checkpoint_model(tmp_path / 'stock.pt', 'tiny-vit-32') == 'tiny-vit-32'
    assert type(ev.load_model(checkpoint=tmp_path / 'step_00000002.pt', device='cpu')) is open_clip.CLIP


def test_a_missing_suite_root_or_dataset_is_an_error_unless_skipped(tmp_path, classification_root):
    "Named in one line, before anything runs, with a non-zero exit; `--skip_missing` reports the set and runs the rest."
    from cluster_glip.model import create_model
    torch.save({'model_name': 'tiny-vit-32', 'state_dict': create_model('tiny-vit-32').state_dict()}, tmp_path / 'ours.pt')
    (tmp_path / 'suite.yaml').write_text(json.dumps({'root': str(classification_root.parent), 'tasks': [
        {'task': 'zeroshot_classification', 'dataset': 'nouns', 'path': classification_root.name},
        {'task': 'zeroshot_classification', 'dataset': 'elsewhere', 'path': 'not_here'}]}))
    argv = ['--checkpoint', str(tmp_path / 'ours.pt'), '--suite', str(tmp_path / 'suite.yaml'), '--device', 'cpu',
            '--workers', '0', '--out', str(tmp_path / 'rows.jsonl')]
    with pytest.raises(SystemExit, match=f"1 data path.s. missing under {classification_root.parent}: elsewhere "
                                         f"\\(zeroshot_classification\\): {classification_root.parent / 'not_here'}"):
        run_cli(argv)
    assert not (tmp_path / 'rows.jsonl').exists()                        # stopped before the first set
    with pytest.raises(SystemExit, match=f"its root {tmp_path / 'nowhere'} does not exist .*--skip_missing"):
        run_cli([*argv, '--root', str(tmp_path / 'nowhere')])
    run_cli([*argv, '--skip_missing'])
    rows = [json.loads(line) for line in (tmp_path / 'rows.jsonl').read_text().splitlines()]
    assert [(r['dataset'], r['status']) for r in rows] == [('nouns', 'ok'), ('elsewhere', 'missing')]
    # the same through the installed command: one line on stderr, exit status 1
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, '-c', 'import sys; from cluster_glip.cli import main; sys.exit(main())', 'eval',
                             *argv, '--root', str(tmp_path / 'nowhere')], capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'PYTHONPATH': str(root), 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("cluster_glip eval: suite 'suite': its root")
    # the API: evaluate_suite raises the same MissingDataset, or returns the missing row with skip_missing
    model = ev.load_model(checkpoint=tmp_path / 'ours.pt', device='cpu')
    with pytest.raises(fmt.MissingDataset, match='elsewhere'):
        ev.evaluate_suite(model, str(tmp_path / 'suite.yaml'), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        skipped = ev.evaluate_suite(model, str(tmp_path / 'suite.yaml'), progress=False, skip_missing=True)
    assert [r['status'] for r in skipped] == ['ok', 'missing']


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
