"""Issue #17, problems 5 and 6: damaged shard lists and validation gaps. Shard faults are counted under their own names
(`empty_shard`, `not_a_tar`, `duplicate_key`), and a loader worker dealt only unusable shards is fed from the good ones
with every good sample still read exactly once; values that would only fail at step 1 are refused before any file is
written, naming the field. Each fault goes into the ledger (`conftest.py`)."""
import random
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from cluster_glip.config import ConfigError, load_config, parse_override
from cluster_glip.formats import image_bytes, write_tar
from cluster_glip.shards import seed_int, train_loader, write_shard_index
from cluster_glip.train import train


def caption_of(tokens) -> str:
    return open_clip.decode(tokens).split('<end_of_text>')[0].replace('<start_of_text>', '').replace(' ', '')


def read_all(loader) -> list:
    return [caption_of(t) for _, texts in loader for t in texts]


def picture(i: int) -> bytes:
    return image_bytes(Image.new('RGB', (40, 40), (37 * i % 256, 91 * i % 256, 53 * i % 256)))


def good_shard(path: Path, k: int, n: int = 6) -> list:
    "Shard `k` of `n` distinct samples captioned 'good {k} {i}'; returns the captions as the loader decodes them."
    write_tar(path, [(f'{k:05d}{i:04d}', {'jpg': picture(10 * k + i), 'txt': f'good {k} {i}'.encode()}) for i in range(n)])
    return [f'good{k}{i}' for i in range(n)]


def nonzero(counts: dict) -> dict: return {k: v for k, v in counts.items() if v}


BAD = {'empty_shard': lambda p: p.write_bytes(b''),
       'not_a_tar': lambda p: p.write_bytes(b'<html><body>404 not found</body></html>\n' * 40)}


# ---------------------------------------------------------------- problem 5: shard faults

def test_an_empty_shard_is_counted_as_empty_shard(tmp_path, ledger):
    expected = good_shard(tmp_path / '00000.tar', 0)
    (tmp_path / '00001.tar').write_bytes(b'')                      # a zero-byte file
    write_tar(tmp_path / '00002.tar', [])                          # a valid tar without members
    write_shard_index(tmp_path, {'00000.tar': 6, '00001.tar': 0, '00002.tar': 0})
    loader = train_loader(tmp_path, batch_size=2, image_size=32, workers=0, seed=1)
    seen = read_all(loader)
    survived = sorted(seen) == sorted(expected) and nonzero(loader.skipped) == {'empty_shard': 2}
    ledger.record('shard list: empty shard', survived, 0 if survived else 2)   # both empty shards must be counted
    assert sorted(seen) == sorted(expected)
    assert nonzero(loader.skipped) == {'empty_shard': 2}, loader.skipped


def test_a_file_that_is_not_a_tar_is_counted_as_not_a_tar(tmp_path, ledger):
    expected = good_shard(tmp_path / '00000.tar', 0)
    BAD['not_a_tar'](tmp_path / '00001.tar')                       # an HTML error page saved as a shard
    (tmp_path / '00002.tar').write_bytes(picture(3))               # a JPEG saved as a shard
    shards = [str(tmp_path / f'{k:05d}.tar') for k in range(4)]     # 00003.tar does not exist
    loader = train_loader([shards], batch_size=2, image_size=32, workers=0, num_samples=6, seed=1)
    seen = read_all(loader)
    counts = nonzero(loader.skipped)
    survived = sorted(seen) == sorted(expected) and counts == {'not_a_tar': 2, 'missing_shard': 1}
    ledger.record('shard list: not a tar', survived)
    assert sorted(seen) == sorted(expected)
    assert counts == {'not_a_tar': 2, 'missing_shard': 1}, counts


def test_duplicate_keys_are_counted_and_trained_on_once(tmp_path, ledger):
    first = [(f'0000{i}', {'jpg': picture(i), 'txt': f'first {i}'.encode()}) for i in range(4)]
    again = lambda i: (f'0000{i}', {'jpg': picture(50 + i), 'txt': f'again {i}'.encode()})
    write_tar(tmp_path / '00000.tar', first[:2] + [again(1)] + first[2:] + [again(0)])   # twice in one shard
    write_tar(tmp_path / '00001.tar', [again(3)] + [(f'1000{i}', {'jpg': picture(20 + i), 'txt': f'second {i}'.encode()})
                                                    for i in range(4)])                   # and across shards
    write_shard_index(tmp_path, {'00000.tar': 4, '00001.tar': 4})   # the distinct samples
    expected = [f'first{i}' for i in range(4)] + [f'second{i}' for i in range(4)]
    loader = train_loader(tmp_path, batch_size=1, image_size=32, workers=0, seed=2)
    seen = read_all(loader)
    twice = sum(n - 1 for n in Counter(seen).values())
    survived = sorted(seen) == sorted(expected) and nonzero(loader.skipped) == {'duplicate_key': 3}
    ledger.record('shard list: duplicate keys', survived, max(twice, 3 - loader.skipped.get('duplicate_key', 0)))
    assert sorted(seen) == sorted(expected), Counter(seen)
    assert nonzero(loader.skipped) == {'duplicate_key': 3} and loader.repeated == 0, loader.skipped


def dealt_together(bad: set, n_shards: int, readers: int) -> int:
    "A loader seed whose first epoch deals every shard in `bad` (indices) to reader 0 (the old round-robin deal)."
    data_seed = next(s for s in range(1000)
                     if {int(Path(u).stem) for u in deal(n_shards, s)[0::readers]} == bad)
    return data_seed


def deal(n_shards: int, seed: int, epoch: int = 0) -> list:
    order = [f'{k:05d}.tar' for k in range(n_shards)]
    random.Random(seed_int(seed, epoch, 'shards')).shuffle(order)
    return order


def test_a_worker_dealt_only_bad_shards_is_fed_and_good_samples_come_exactly_once(tmp_path, ledger):
    expected = good_shard(tmp_path / '00000.tar', 0) + good_shard(tmp_path / '00001.tar', 1)
    BAD['empty_shard'](tmp_path / '00002.tar'); BAD['not_a_tar'](tmp_path / '00003.tar')
    write_shard_index(tmp_path, {'00000.tar': 6, '00001.tar': 6, '00002.tar': 0, '00003.tar': 0})
    seed = dealt_together({2, 3}, n_shards=4, readers=2)            # worker 0 gets only the two bad shards
    loader = train_loader(tmp_path, batch_size=3, image_size=32, workers=2, seed=seed)
    assert len(loader) == 4                                         # 12 samples, 2 workers × 2 batches of 3
    try: seen, error = read_all(loader), None
    except RuntimeError as e: seen, error = [], str(e).splitlines()[-1]
    exact = error is None and sorted(seen) == sorted(expected) and loader.repeated == 0
    counted = nonzero(loader.skipped) == {'empty_shard': 1, 'not_a_tar': 1}
    ledger.record('shard list: a worker dealt only bad shards', exact and counted, len(expected) - len(set(seen)))
    assert error is None, error
    assert sorted(seen) == sorted(expected) and loader.repeated == 0, Counter(seen)
    assert counted, loader.skipped


def test_one_good_shard_is_shared_by_two_workers_exactly_once_and_resumes_exactly(tmp_path, ledger):
    expected = good_shard(tmp_path / '00002.tar', 2, n=8)
    BAD['empty_shard'](tmp_path / '00000.tar'); BAD['not_a_tar'](tmp_path / '00001.tar')
    # 00003.tar is missing: 3 bad shards and 1 good one for 2 workers
    write_shard_index(tmp_path, {'00000.tar': 0, '00001.tar': 0, '00002.tar': 8, '00003.tar': 0})
    make = lambda: train_loader([[str(tmp_path / f'{k:05d}.tar') for k in range(4)]], batch_size=2, image_size=32,
                                workers=2, seed=4, num_samples=8)
    loader = make()
    try: batches, error = [(images, texts) for images, texts in loader], None
    except RuntimeError as e: batches, error = [], str(e).splitlines()[-1]
    seen = [caption_of(t) for _, texts in batches for t in texts]
    exact = error is None and sorted(seen) == sorted(expected) and loader.repeated == 0
    counted = nonzero(loader.skipped) == {'empty_shard': 1, 'not_a_tar': 1, 'missing_shard': 1}
    resumed_ok = False
    if exact:
        resumed = make()
        resumed.load_state_dict(dict(epoch=0, batch=1, skipped={}, repeated=0))   # worker 1 is next
        tail = [images for images, _ in resumed]
        resumed_ok = len(tail) == 3 and all(torch.equal(a, b) for a, (b, _) in zip(tail, batches[1:]))
    ledger.record('shard list: one good shard for two workers', exact and counted and resumed_ok,
                  len(expected) - len(set(seen)))
    assert error is None, error
    assert sorted(seen) == sorted(expected) and loader.repeated == 0, Counter(seen)
    assert counted, loader.skipped
    assert resumed_ok


def test_a_clean_deal_is_the_plain_round_robin(tmp_path):
    "Without bad shards the deal is what it always was: the demo's sample order does not change."
    for k in range(5): good_shard(tmp_path / f'{k:05d}.tar', k)
    write_shard_index(tmp_path, {f'{k:05d}.tar': 6 for k in range(5)})
    stream = train_loader(tmp_path, batch_size=3, image_size=32, workers=2, seed=7).stream
    for epoch in range(3):
        order = deal(5, 7, epoch)
        assert [[Path(u).name for u in stream.reader_shards(epoch, r)] for r in range(2)] == [order[0::2], order[1::2]]


# ---------------------------------------------------------------- problem 6: validation before any file is written

@pytest.fixture
def small_shards(tmp_path) -> str:
    folder = tmp_path / 'shards'; folder.mkdir()
    for k in range(2): good_shard(folder / f'{k:05d}.tar', k, n=8)
    write_shard_index(folder, {'00000.tar': 8, '00001.tar': 8})
    return str(folder / '{00000..00001}.tar')


def fields(shards: str, out: Path, **extra) -> dict:
    return {'model': 'tiny-vit-32', 'train_data': shards, 'output_dir': str(out), 'batch_size': 4, 'steps': 2,
            'warmup': 1, 'lr': 1e-3, 'workers': 0, 'log_every': 1, 'checkpoint_every': 1000, 'progress_bar': False,
            'device': 'cpu', 'tune_steps': 0, 'threads': 1, **extra}


def refused_before_writing(shards: str, out: Path, field: str, match: str = '', **extra) -> tuple:
    "(refused with a ConfigError naming `field`, nothing written, the message) for a run with fields `extra`."
    try:
        train(load_config('tiny', **fields(shards, out, **extra)))
        return False, not out.exists(), 'ran'
    except Exception as e:
        message = f'{type(e).__name__}: {e}'
        named = isinstance(e, ConfigError) and f"'{field}'" in str(e) and match in str(e)
        return named, not out.exists(), message


CASES = {
    'image size not a multiple of the patch size': ('image_size', dict(image_size=36), '8'),
    'tuning image size not a multiple of the patch size': ('tune_image_size', dict(tune_image_size=20, tune_steps=1), '8'),
    'infinite learning rate': ('lr', dict(lr=float('inf')), ''),
    'NaN learning rate': ('lr', dict(lr=float('nan')), ''),
    'infinite tuning learning rate': ('tune_lr', dict(tune_lr=float('inf'), tune_steps=1), ''),
    'batch larger than the training set': ('batch_size', dict(batch_size=20), '16'),
    'tuning batch larger than the training set': ('tune_batch_size', dict(tune_batch_size=32, tune_steps=1), '16'),
    'a CUDA device index beyond the count': ('device', dict(device='cuda:99'), ''),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_bad_value_is_refused_before_any_file_is_written(small_shards, tmp_path, ledger, case):
    field, extra, match = CASES[case]
    named, clean, message = refused_before_writing(small_shards, tmp_path / 'run', field, match, **extra)
    ledger.record(f'validation: {case}', named and clean)
    assert named, message
    assert clean, f'{tmp_path / "run"} was written before the refusal ({message})'


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_cuda_without_cuda_is_refused_naming_device(small_shards, tmp_path, ledger):
    named, clean, message = refused_before_writing(small_shards, tmp_path / 'run', 'device', 'CUDA', device='cuda')
    ledger.record('validation: device cuda without CUDA', named and clean)
    assert named and clean, message


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path, ledger):
    path = tmp_path / 'broken.yaml'
    path.write_text('model: tiny-vit-32\nsteps: 10\nmasking: {strategy: cluster, ratio: 0.5\nlr: 1e-3\n')
    try: load_config(path); message = 'loaded'
    except Exception as e: message = f'{type(e).__name__}: {e}'
    named = message.startswith('ConfigError') and str(path) in message and 'line ' in message \
        and '<unicode string>' not in message
    try: parse_override('lr=[1e-3'); override = 'parsed'
    except Exception as e: override = f'{type(e).__name__}: {e}'
    override_named = override.startswith('ConfigError') and "'lr'" in override
    ledger.record('validation: YAML syntax error', named and override_named)
    assert named, message
    assert override_named, override


def test_a_shard_listed_twice_with_two_workers_is_read_once_and_its_keys_counted(tmp_path, ledger):
    expected = [c for k in range(4) for c in good_shard(tmp_path / f'{k:05d}.tar', k)]
    shards = [str(tmp_path / f'{k:05d}.tar') for k in range(4)]
    loader = train_loader([shards + shards[1:2]], batch_size=3, image_size=32, workers=2, seed=5, num_samples=24)
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen.append(read_all(loader))
    exact = all(sorted(s) == sorted(expected) for s in seen) and loader.repeated == 0
    counted = nonzero(loader.skipped) == {'duplicate_key': 2 * 6}
    ledger.record('shard list: a shard listed twice, 2 workers', exact and counted,
                  sum(n - 1 for s in seen for n in Counter(s).values()))
    assert exact, [Counter(s) - Counter(expected) for s in seen]
    assert counted, loader.skipped
