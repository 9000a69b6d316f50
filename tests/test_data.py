"""cluster_glip.data beyond the notebook's examples: multi-process epochs (2 ranks × 2 workers), fault fixtures with exact
counts, resumption across workers, source mixing, the synthetic generator's determinism and faithfulness, and the
evaluation sets read the way CLIP_benchmark reads them."""
import io, json, random, socket, tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from fastcore.script import anno_parser
from PIL import Image

from cluster_glip.data import (PALETTE, SUGARCREPE_SUBSETS, SynthConfig, encode_image, folder_to_shards, iter_shard,
                               sample_scene, seed_int, synth_cli, synthetic_sample, train_loader, write_shard_index,
                               write_synthetic_bundle, write_tar)


def caption_of(tokens) -> str:
    "The caption a row of open_clip tokens encodes, without spaces (the BPE splits numbers into digits)."
    return open_clip.decode(tokens).split('<end_of_text>')[0].replace('<start_of_text>', '').replace(' ', '')


def read_all(loader) -> list:
    return [caption_of(t) for _, texts in loader for t in texts]


def picture(i: int, size=(40, 40)) -> bytes:
    return encode_image(Image.new('RGB', size, (37 * i % 256, 91 * i % 256, 53 * i % 256)))


def clean_shards(folder: Path, n_shards: int, per_shard: int, prefix: str = 'sample') -> list:
    "Shards of distinct, valid samples captioned '{prefix} {index}'; returns the captions as the loader decodes them."
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for k in range(n_shards):
        samples = [(f'{k:05d}{i:04d}', {'jpg': picture(k * per_shard + i), 'txt': f'{prefix} {k * per_shard + i}'.encode()})
                   for i in range(per_shard)]
        sizes[f'{k:05d}.tar'] = write_tar(folder / f'{k:05d}.tar', samples)
    write_shard_index(folder, sizes)
    return [f'{prefix}{i}' for i in range(n_shards * per_shard)]


# One fault shard: 8 usable samples (6 needing a conversion) and 5 to skip, the last sample a fault so that the
# loader must read past its final usable sample to count it.
SKIPS_PER_SHARD = dict(corrupt_image=2, missing_caption=1, empty_caption=1, missing_image=1)
CONVERSIONS_PER_SHARD = dict(bad_text=1, converted_mode=4, small_image=1)
USABLE_PER_SHARD = 8


def fault_shard(path: Path, k: int) -> list:
    "Write fault shard `k`; returns the captions of its usable samples as the loader decodes them."
    rgba = Image.new('RGBA', (40, 40), (200, 10, 10, 128))
    palette = Image.new('P', (40, 40), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10])
    palette.info['transparency'] = 0
    good = picture(k)
    files = [
        {'jpg': good, 'txt': f'fine {k} a'.encode()},
        {'jpg': good[:len(good) // 2], 'txt': b'truncated'},                      # corrupt_image
        {'jpg': picture(k + 1), 'txt': f'latin {k} caf\xe9'.encode('latin-1')},    # bad_text (kept)
        {'png': encode_image(Image.new('L', (40, 40), 77), 'png'), 'txt': f'grey {k}'.encode()},  # converted_mode
        {'jpg': b'<html>not found</html>', 'txt': b'garbage'},                   # corrupt_image
        {'png': encode_image(rgba, 'png'), 'txt': f'alpha {k}'.encode()},         # converted_mode
        {'jpg': picture(k + 2)},                                                  # missing_caption
        {'jpg': encode_image(Image.new('CMYK', (40, 40), (0, 200, 200, 0))), 'txt': f'cmyk {k}'.encode()},  # converted_mode
        {'jpg': picture(k + 3), 'txt': b'  \n '},                                 # empty_caption
        {'png': encode_image(palette, 'png'), 'txt': f'palette {k}'.encode()},   # converted_mode
        {'jpg': picture(k + 4, size=(8, 8)), 'txt': f'tiny {k}'.encode()},        # small_image (kept)
        {'jpg': good, 'txt': f'fine {k} b'.encode()},
        {'txt': b'no image here', 'json': b'{}'},                                 # missing_image
    ]
    write_tar(path, [(f'{k:05d}{i:04d}', f) for i, f in enumerate(files)])
    return [c.replace(' ', '') for c in (f'fine {k} a', f'latin {k} caf\ufffd', f'grey {k}', f'alpha {k}', f'cmyk {k}',
                                         f'palette {k}', f'tiny {k}', f'fine {k} b')]


def times(counts: dict, n: int) -> dict: return {k: v * n for k, v in counts.items()}


def nonzero(counts: dict) -> dict: return {k: v for k, v in counts.items() if v}


# ---------------------------------------------------------------- epochs over ranks and workers

def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(tmp_path):
    expected = clean_shards(tmp_path, n_shards=8, per_shard=6)
    loaders = [train_loader(tmp_path, batch_size=3, image_size=32, rank=r, world_size=2, workers=2, seed=5)
               for r in range(2)]
    assert [len(l) for l in loaders] == [4 * 2, 4 * 2] and loaders[0].num_samples == 48
    epochs = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            captions = read_all(loader)
            assert len(captions) == len(loader) * 3
            seen += captions
        assert sorted(seen) == sorted(expected), f'epoch {epoch}: {Counter(seen) - Counter(expected)}'
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new shard deal and shuffle each epoch
    assert all(l.repeated == 0 and not any(l.skipped.values()) for l in loaders)


def test_fault_counts_are_exact_and_aggregated_across_workers(tmp_path):
    expected = []
    for k in range(4): expected += fault_shard(tmp_path / f'{k:05d}.tar', k)
    write_shard_index(tmp_path, {f'{k:05d}.tar': USABLE_PER_SHARD for k in range(4)})  # usable samples per shard
    loader = train_loader(tmp_path, batch_size=4, image_size=32, workers=2, seed=0)
    assert len(loader) == 8
    seen = read_all(loader)
    assert sorted(seen) == sorted(expected)  # every usable sample once, none of the faulty ones
    assert nonzero(loader.skipped) == {**times(SKIPS_PER_SHARD, 4), **times(CONVERSIONS_PER_SHARD, 4)}
    assert loader.repeated == 0


def test_missing_truncated_and_empty_shards_are_counted(tmp_path):
    expected = fault_shard(tmp_path / '00000.tar', 0) + fault_shard(tmp_path / '00001.tar', 1)
    whole = tmp_path / 'whole.tar'
    samples = [(f'000020{i:03d}', {'jpg': picture(i), 'txt': f'kept {i}'.encode()}) for i in range(5)]
    write_tar(whole, samples)
    with tarfile.open(whole) as tar: fourth = tar.getmember('000020003.jpg').offset_data
    (tmp_path / '00002.tar').write_bytes(whole.read_bytes()[:fourth + 100])  # cut inside the 4th sample's image
    whole.unlink()
    expected += [f'kept{i}' for i in range(3)]
    (tmp_path / '00003.tar').write_bytes(b'')  # an empty file: nothing can be read
    shards = [str(tmp_path / f'{k:05d}.tar') for k in range(5)]  # 00004.tar does not exist
    loader = train_loader([shards], batch_size=1, image_size=32, workers=0, num_samples=len(expected), seed=3)
    seen = read_all(loader)
    assert sorted(seen) == sorted(expected)
    assert nonzero(loader.skipped) == {**times(SKIPS_PER_SHARD, 2), **times(CONVERSIONS_PER_SHARD, 2),
                                       'missing_shard': 2, 'corrupt_shard': 1}


def test_uneven_shards_give_equal_epochs_and_count_repeats(tmp_path):
    expected = clean_shards(tmp_path, n_shards=5, per_shard=6)  # 2 workers: one reads 3 shards, the other 2
    loader = train_loader(tmp_path, batch_size=3, image_size=32, workers=2, seed=0)
    assert len(loader) == 10  # 30 // (3 × 2) = 5 batches per worker
    seen = read_all(loader)
    assert len(seen) == 30 and set(seen) <= set(expected)
    assert loader.repeated == 3  # the 2-shard reader re-reads 3 samples; the 3-shard reader leaves 3 for later epochs
    assert sum(Counter(seen).values()) - len(set(seen)) == 3


def test_resume_mid_epoch_with_workers_matches_an_uninterrupted_epoch(tmp_path):
    clean_shards(tmp_path, n_shards=4, per_shard=6)
    uninterrupted = [images for images, _ in train_loader(tmp_path, batch_size=2, image_size=32, workers=2, seed=9)]
    assert len(uninterrupted) == 12
    resumed = train_loader(tmp_path, batch_size=2, image_size=32, workers=2, seed=9)
    resumed.load_state_dict(dict(epoch=0, batch=5, skipped={}, repeated=0))  # an odd batch: worker 1 is next
    tail = [images for images, _ in resumed]
    assert len(tail) == 7 and all(torch.equal(a, b) for a, b in zip(tail, uninterrupted[5:]))
    assert resumed.state_dict()['epoch'] == 1 and resumed.state_dict()['batch'] == 0


def test_resampled_mixes_sources_by_weight_deterministically(tmp_path):
    clean_shards(tmp_path / 'a', n_shards=8, per_shard=1, prefix='alpha')  # one sample per shard: one draw each
    clean_shards(tmp_path / 'b', n_shards=8, per_shard=1, prefix='beta')
    make = lambda rank: train_loader([str(tmp_path / 'a'), str(tmp_path / 'b')], weights=[3, 1], resampled=True,
                                     num_samples=960, batch_size=8, image_size=32, workers=0, seed=1, rank=rank,
                                     world_size=2, shuffle_buffer=10)
    first, again, other = read_all(make(0)), read_all(make(0)), read_all(make(1))
    assert first == again and first != other and len(first) == 480
    share = np.mean([c.startswith('alpha') for c in first + other])
    assert 0.71 < share < 0.79, share  # 3:1 weights -> 75 % from the first source (± 3 standard deviations)


def test_errors_say_what_to_do(tmp_path):
    clean_shards(tmp_path, n_shards=2, per_shard=4)
    with pytest.raises(ValueError, match='cannot feed'): train_loader(tmp_path, batch_size=2, image_size=32, workers=2, world_size=2, rank=0)
    with pytest.raises(ValueError, match='lower batch_size'): train_loader(tmp_path, batch_size=16, image_size=32, workers=0)
    (tmp_path / 'sizes.json').unlink(); (tmp_path / '_info.json').unlink()
    with pytest.raises(ValueError, match='pass num_samples'): train_loader(tmp_path, batch_size=2, image_size=32, workers=0)
    with pytest.raises(ValueError, match=r'rank must be in \[0'): train_loader(tmp_path, batch_size=2, image_size=32, rank=2, world_size=2, num_samples=8)
    (tmp_path / 'junk').mkdir(); (tmp_path / 'junk' / '00000.tar').write_bytes(b'nothing')
    with pytest.raises(RuntimeError, match='no usable sample'):
        list(train_loader(tmp_path / 'junk', batch_size=1, image_size=32, workers=0, num_samples=1))


def test_tokenizer_downloads_nothing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs): raise AssertionError('the data pipeline tried to open a network connection')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    clean_shards(tmp_path, n_shards=1, per_shard=2)
    for tokenizer in (None, 'ViT-B-32', 'ViT-B-16'):
        _, texts = next(iter(train_loader(tmp_path, batch_size=2, image_size=32, workers=0, tokenizer=tokenizer)))
        assert texts.shape == (2, 77) and texts.dtype == torch.int64 and texts[0, 0] == 49406


# ---------------------------------------------------------------- the synthetic generator

def test_bundle_is_deterministic_whatever_the_process_count(tmp_path):
    kwargs = dict(n_train=60, n_zeroshot=24, n_retrieval=3, n_sugarcrepe=1, shard_size=20, seed=4)
    write_synthetic_bundle(tmp_path / 'one', processes=1, **kwargs)
    write_synthetic_bundle(tmp_path / 'two', processes=2, **kwargs)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}
    one, two = files(tmp_path / 'one'), files(tmp_path / 'two')
    assert one.keys() == two.keys() and len(one) > 15
    assert all(one[name] == two[name] for name in one)
    write_synthetic_bundle(tmp_path / 'other', processes=1, **dict(kwargs, seed=5))
    assert (tmp_path / 'other' / 'train' / '00000.tar').read_bytes() != one[Path('train/00000.tar')]


def nearest_colour(pixel, colors) -> str:
    return min(colors, key=lambda c: sum((float(p) - q) ** 2 for p, q in zip(pixel, PALETTE[c])))


def test_captions_and_pixels_agree_with_the_scene():
    cfg = SynthConfig()
    for i in range(300):
        scene, image, caption = synthetic_sample(11, 0, i, cfg)
        image = np.asarray(Image.open(io.BytesIO(encode_image(image))))  # as stored, through JPEG
        objects, words = scene['objects'], caption.replace(',', '').split()
        primary = objects[0]
        assert f"{primary['color']} {primary['shape']}" in caption, (caption, primary)
        assert {w for w in words if w in PALETTE} <= {o['color'] for o in objects}
        assert {w for w in words if w in cfg.shapes} <= {o['shape'] for o in objects}
        if scene['relation'] and scene['relation'] in caption:
            a, b = objects[0], objects[1]
            dx, dy = a['x'] - b['x'], a['y'] - b['y']
            assert {'to the left of': dx < 0, 'to the right of': dx > 0, 'above': dy < 0, 'below': dy > 0}[scene['relation']]
        for obj in objects:
            if obj['shape'] == 'digit': continue
            x, y = int(obj['x']), int(obj['y'])
            centre = np.median(image[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3), axis=0)
            assert nearest_colour(centre, cfg.colors) == obj['color'], (i, obj, centre)


def test_digits_are_scikit_learns():
    from sklearn.datasets import load_digits
    from cluster_glip.data import _digits
    images, labels = _digits()
    assert np.array_equal(images * 16, load_digits().images) and np.array_equal(labels, load_digits().target)


def test_objects_of_each_class_appear_as_primary():
    primaries = Counter()
    for i in range(1200):  # synthetic_sample's scene, without rendering it
        obj = sample_scene(random.Random(seed_int(0, 0, i)))['objects'][0]
        primaries[obj['color'], obj['shape']] += 1
    assert len(primaries) == 24 and min(primaries.values()) > 20  # every zero-shot class is well represented


# ---------------------------------------------------------------- evaluation sets, read as CLIP_benchmark reads them

@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    return write_synthetic_bundle(tmp_path_factory.mktemp('bundle'), n_train=40, n_zeroshot=48, n_retrieval=6,
                                  n_sugarcrepe=5, shard_size=20, processes=1)


def test_zeroshot_set_reads_as_clip_benchmark_reads_wds(bundle):
    root = Path(bundle['zeroshot']['root'])
    assert sorted(p.name for p in root.iterdir()) == ['classnames.txt', 'test', 'zeroshot_classification_templates.txt']
    assert sorted(p.name for p in (root / 'test').iterdir()) == ['0.tar', 'nshards.txt']
    nshards = int((root / 'test' / 'nshards.txt').read_text())
    pattern = str(root / 'test' / ('{0..%d}.tar' % (nshards - 1)))
    dataset = (wds.WebDataset(pattern, shardshuffle=False, nodesplitter=lambda src: src)  # CLIP_benchmark's build_wds_dataset
               .decode(wds.autodecode.ImageHandler('pil', extensions=['webp', 'png', 'jpg', 'jpeg']))
               .to_tuple('webp;png;jpg;jpeg', 'cls'))
    samples = list(dataset)
    classes = [l.strip() for l in (root / 'classnames.txt').read_text().splitlines()]
    templates = [l.strip() for l in (root / 'zeroshot_classification_templates.txt').read_text().splitlines()]
    assert classes == bundle['classes'] and len(classes) == 24 and all('{c}' in t for t in templates)
    assert len(samples) == 48 and [label for _, label in samples] == [i % 24 for i in range(48)]
    assert all(isinstance(label, int) for _, label in samples) and samples[0][0].size == (64, 64)
    with tarfile.open(root / 'test' / '0.tar') as tar:
        names = tar.getnames()
        assert names[:4] == ['s0000000.webp', 's0000000.cls', 's0000001.webp', 's0000001.cls']
        assert all(tar.extractfile(n).read().decode().isdigit() for n in names if n.endswith('.cls'))
    for image, label in samples:  # the one object shows its class's colour (the background is a neutral grey)
        color = classes[label].split()[0]
        pixels = np.asarray(image.convert('RGB')).reshape(-1, 3).astype(float)
        close = np.linalg.norm(pixels - np.array(PALETTE[color], float), axis=1) < 60
        assert close.sum() >= 20, (label, close.sum())


def test_retrieval_set_karpathy_json_and_wds(bundle):
    data = json.loads(Path(bundle['retrieval']['annotations']).read_text())
    images_root = Path(bundle['retrieval']['images'])
    assert len(data['images']) == 6
    sentids = []
    for i, entry in enumerate(data['images']):
        assert entry['split'] == 'test' and entry['imgid'] == i
        assert Image.open(images_root / entry['filepath'] / entry['filename']).size == (64, 64)
        assert [s['sentid'] for s in entry['sentences']] == entry['sentids'] and len(entry['sentences']) == 5
        assert all(s['raw'] and s['tokens'] for s in entry['sentences'])
        sentids += entry['sentids']
    assert sentids == list(range(30))
    wds_root = Path(bundle['retrieval']['wds'])
    assert (wds_root / 'dataset_type.txt').read_text().strip() == 'retrieval'
    dataset = (wds.WebDataset(str(wds_root / 'test' / '{0..0}.tar'), shardshuffle=False, nodesplitter=lambda src: src)
               .decode(wds.autodecode.ImageHandler('pil', extensions=['webp', 'png', 'jpg', 'jpeg']))
               .to_tuple('webp;png;jpg;jpeg', 'txt').map_tuple(None, str.splitlines))
    read = list(dataset)
    assert [captions for _, captions in read] == [[s['raw'] for s in e['sentences']] for e in data['images']]


def test_sugarcrepe_set_reads_as_clip_benchmark_reads_it(bundle):
    root, images = Path(bundle['sugar_crepe']['annotations']), Path(bundle['sugar_crepe']['images'])
    assert sorted(p.name for p in root.glob('*.json')) == sorted(f'{s}.json' for s in SUGARCREPE_SUBSETS)
    for subset in SUGARCREPE_SUBSETS:
        ann = json.load(open(root / f'{subset}.json'))  # clip_benchmark.datasets.sugar_crepe.SugarCrepe
        assert list(ann) == [str(i) for i in range(5)]
        for item in ann.values():
            assert set(item) == {'filename', 'caption', 'negative_caption'}
            assert Image.open(images / item['filename']).size == (64, 64)
            assert item['caption'] != item['negative_caption']
            pos, neg = item['caption'].split(), item['negative_caption'].split()
            if subset.startswith('swap'): assert sorted(pos) == sorted(neg)  # same words, bound differently
            if subset.startswith('replace'): assert len(pos) == len(neg) and sum(a != b for a, b in zip(pos, neg)) >= 1
            if subset.startswith('add'): assert len(neg) > len(pos)


# ---------------------------------------------------------------- tools

def test_folder_to_shards_reads_jsonl(tmp_path):
    (tmp_path / 'images').mkdir()
    Image.new('RGB', (20, 10), (1, 2, 3)).save(tmp_path / 'images' / 'a.jpeg')
    Image.new('RGB', (20, 10), (1, 2, 3)).save(tmp_path / 'images' / 'b.webp')
    (tmp_path / 'captions.jsonl').write_text('{"image": "a.jpeg", "caption": "first"}\n\n{"image": "b.webp", "caption": "second"}\n')
    out = folder_to_shards(tmp_path / 'images', tmp_path / 'captions.jsonl', tmp_path / 'shards', shard_size=1)
    assert out['num_samples'] == 2 and out['shards'].endswith('{00000..00001}.tar')
    assert json.loads((tmp_path / 'shards' / 'sizes.json').read_text()) == {'00000.tar': 1, '00001.tar': 1}
    read = [s for k in range(2) for s in iter_shard(str(tmp_path / 'shards' / f'{k:05d}.tar'), Counter())]
    assert [('jpg' in s, 'webp' in s, s['txt']) for s in read] == [(True, False, b'first'), (False, True, b'second')]
    with pytest.raises(ValueError, match='needs columns'):
        folder_to_shards(tmp_path / 'images', tmp_path / 'captions.jsonl', tmp_path / 'x', caption_column='text')


def test_synth_command_line_options(tmp_path, capsys):
    parser = anno_parser(synth_cli, prog='cluster_glip synth')
    args = vars(parser.parse_args(['--out', str(tmp_path / 'cli'), '--n_train', '30', '--n_zeroshot', '24',
                                   '--n_retrieval', '2', '--n_sugarcrepe', '1', '--shard_size', '15', '--no_digits',
                                   '--processes', '1']))
    args.pop('pdb', None); args.pop('xtra', None)
    synth_cli(**args)
    manifest = json.loads((tmp_path / 'cli' / 'bundle.json').read_text())
    assert manifest['train']['num_samples'] == 30 and manifest['train']['shards'] == 'train/{00000..00001}.tar'
    assert 'wrote the synthetic bundle' in capsys.readouterr().out
    for k in range(2):
        with tarfile.open(tmp_path / 'cli' / 'train' / f'{k:05d}.tar') as tar:
            scenes = [json.loads(tar.extractfile(n).read())['scene'] for n in tar.getnames() if n.endswith('.json')]
        assert all(o['shape'] != 'digit' for s in scenes for o in s['objects'])
