"""cluster_glip.shards and cluster_glip.synthetic beyond the notebooks' examples: multi-process epochs (2 ranks × 2
workers), fault fixtures with exact counts, resumption across workers, source mixing, no download by the tokenizer, and
the synthetic generator's determinism across processes and faithfulness over many samples."""
import io, socket, tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cluster_glip.formats import image_bytes, write_tar
from cluster_glip.shards import train_loader, write_shard_index
from cluster_glip.synthetic import PALETTE, SynthConfig, synthetic_sample, write_synthetic_bundle
from cluster_glip.text import ReducedTokenizer


def caption_of(tokens) -> str:
    "The caption a row of open_clip tokens encodes, without spaces (the BPE splits numbers into digits)."
    return open_clip.decode(tokens).split('<end_of_text>')[0].replace('<start_of_text>', '').replace(' ', '')


def read_all(loader) -> list:
    return [caption_of(t) for _, texts in loader for t in texts]


def picture(i: int, size=(40, 40)) -> bytes:
    return image_bytes(Image.new('RGB', size, (37 * i % 256, 91 * i % 256, 53 * i % 256)))


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
        {'png': image_bytes(Image.new('L', (40, 40), 77), 'png'), 'txt': f'grey {k}'.encode()},  # converted_mode
        {'jpg': b'<html>not found</html>', 'txt': b'garbage'},                   # corrupt_image
        {'png': image_bytes(rgba, 'png'), 'txt': f'alpha {k}'.encode()},         # converted_mode
        {'jpg': picture(k + 2)},                                                  # missing_caption
        {'jpg': image_bytes(Image.new('CMYK', (40, 40), (0, 200, 200, 0))), 'txt': f'cmyk {k}'.encode()},  # converted_mode
        {'jpg': picture(k + 3), 'txt': b'  \n '},                                 # empty_caption
        {'png': image_bytes(palette, 'png'), 'txt': f'palette {k}'.encode()},   # converted_mode
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
                                       'missing_shard': 1, 'empty_shard': 1, 'corrupt_shard': 1}


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


@pytest.mark.parametrize('reduction', ['random', 'block'])
def test_reduced_texts_depend_on_the_seed_only_and_resume_exactly(tmp_path, reduction):
    """CLIPA's random rules at 3 tokens (one word-piece slot; the captions have 2-3 pieces): each caption's draw comes
    from its position's seed, so a rerun and a resume mid-epoch across workers give the same ids, and the draws vary."""
    clean_shards(tmp_path, n_shards=4, per_shard=6)
    make = lambda rule: train_loader(tmp_path, batch_size=2, image_size=32, workers=2, seed=9, tokenizer=ReducedTokenizer(3, rule))
    uninterrupted = [texts for _, texts in make(reduction)]
    assert len(uninterrupted) == 12 and all(t.shape == (2, 3) for t in uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, [texts for _, texts in make(reduction)]))
    resumed = make(reduction)
    resumed.load_state_dict(dict(epoch=0, batch=5, skipped={}, repeated=0))
    tail = [texts for _, texts in resumed]
    assert len(tail) == 7 and all(torch.equal(a, b) for a, b in zip(tail, uninterrupted[5:]))
    truncated = torch.cat([texts for _, texts in make('truncate')])            # [24, 3]: SOT, the first piece, EOT
    drawn = torch.cat(uninterrupted)
    assert torch.equal(drawn[:, [0, 2]], truncated[:, [0, 2]]) and (drawn[:, 1] != truncated[:, 1]).sum() >= 4


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
        image = np.asarray(Image.open(io.BytesIO(image_bytes(image))))  # as stored, through JPEG
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


# ---------------------------------------------------------------- crops resized on the device (cluster_glip.pixels)

def test_device_resize_changes_neither_samples_nor_counts_nor_resume(tmp_path):
    """`resize_on='device'` (here the device is the CPU): the workers only cut the crops out; the same samples come in
    the same order with the same fault counts and loader state, the images within rounding of Pillow's resize, and a
    resume mid-epoch gives the uninterrupted batches bit for bit."""
    for k in range(4): fault_shard(tmp_path / f'{k:05d}.tar', k)
    write_shard_index(tmp_path, {f'{k:05d}.tar': USABLE_PER_SHARD for k in range(4)})
    runs = {}
    for resize_on in ('loader', 'device'):
        loader = train_loader(tmp_path, batch_size=4, image_size=32, workers=2, seed=0, resize_on=resize_on, device='cpu')
        runs[resize_on] = ([(images, texts) for images, texts in loader], loader.state_dict())
    (on_loader, state_loader), (on_device, state_device) = runs['loader'], runs['device']
    assert state_device == state_loader and sum(state_device['skipped'].values()) == 4 * (5 + 6)
    assert len(on_device) == len(on_loader) == 8
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    for (a, ta), (b, tb) in zip(on_loader, on_device):
        assert torch.equal(ta, tb) and a.shape == b.shape == (4, 3, 32, 32) and b.dtype == torch.float32
        levels = (a - b).abs() * std * 255      # the gap in 8-bit levels
        assert levels.mean() < 0.5 and levels.max() < 8
    resumed = train_loader(tmp_path, batch_size=4, image_size=32, workers=2, seed=0, resize_on='device', device='cpu')
    resumed.load_state_dict(dict(epoch=0, batch=3, skipped={}, repeated=0))
    tail = [images for images, _ in resumed]
    assert len(tail) == 5 and all(torch.equal(a, b) for a, (b, _) in zip(tail, on_device[3:]))


def test_resize_on_is_checked_by_name(tmp_path):
    clean_shards(tmp_path, n_shards=1, per_shard=4)
    with pytest.raises(ValueError, match='resize_on must be one of auto, loader, device'):
        train_loader(tmp_path, batch_size=2, image_size=32, workers=0, resize_on='gpu')
