"""Reliability: faults injected on purpose, and proof that nothing is lost. Runs are killed with SIGKILL at random moments
and inside checkpoint writes, shards arrive damaged in every way and one vanishes mid-run, NaNs reach the loss and the
gradients, a rank of a 2-process run crashes, configs and checkpoints are bad or malicious. Each fault goes into the
ledger (`conftest.py`), whose summary is printed at the end of the session."""
import os, random, re, signal, struct, subprocess, sys, tarfile, time, zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from cluster_glip.cli import main
from cluster_glip.formats import image_bytes, write_tar
from cluster_glip.shards import write_shard_index
from cluster_glip.synthetic import write_synthetic_shards
from cluster_glip.config import load_config
from cluster_glip.step import contrastive_loss
from cluster_glip.rundir import CheckpointError, list_checkpoints, load_checkpoint, read_metrics
from cluster_glip.train import train
import cluster_glip.step as step_module

from tiny_runs import ENV, overrides, run_fields

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> str:
    return write_synthetic_shards(tmp_path_factory.mktemp('synthetic') / 'train', 512, shard_size=128, processes=2)['shards']


def fields(shards: str, out: Path, **extra) -> dict:
    return run_fields(shards, out, **{'checkpoint_every': 1000, **extra})


def final_weights(out: Path) -> dict:
    return load_checkpoint(list_checkpoints(Path(out) / 'checkpoints')[-1])['state_dict']


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- SIGKILL at random moments, and inside checkpoint writes ----------------------------------------------------------

# Runs `cluster_glip train`; with KILL_IN_SAVE=n, the n-th torch.save writes half its bytes and the process SIGKILLs
# itself: a machine dying in the middle of a checkpoint write.
DRIVER = '''
import io, os, signal, sys, torch
kill_at, calls, real_save = int(os.environ.get('KILL_IN_SAVE', 0)), [0], torch.save
def dying_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        buffer = io.BytesIO(); real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from cluster_glip.cli import main
sys.exit(main(['train', '--config', 'tiny', *sys.argv[1:]]))
'''


def every_checkpoint_loads(out: Path) -> bool:
    "Every file a resume could pick (`step_*.pt`) loads; a killed writer's temp file is never one of them."
    for path in list_checkpoints(out / 'checkpoints'):
        state = load_checkpoint(path)
        assert state['step'] == int(path.stem.split('_')[1]) and state['state_dict']
    return True


def test_sigkill_at_random_moments_and_inside_checkpoint_writes_loses_nothing(shards, tmp_path, ledger):
    run = fields(shards, tmp_path, steps=30, checkpoint_every=3, keep_last=2)
    command = lambda out, **extra: [sys.executable, '-c', DRIVER, *overrides({**run, 'output_dir': str(out), **extra})]
    whole = subprocess.run(command(tmp_path / 'whole'), env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out, rng, kills = tmp_path / 'killed', random.Random(0), []
    for attempt, where in enumerate(['checkpoint write', 'step', 'checkpoint write', 'step', 'step']):
        extra = {'resume': 'latest'} if attempt else {}
        env = {**ENV, 'KILL_IN_SAVE': str(rng.randint(1, 3))} if where == 'checkpoint write' else ENV
        process = subprocess.Popen(command(out, **extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        if where == 'step':   # a random moment once the run is training
            metrics, start = out / 'metrics.jsonl', time.time()
            before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            while process.poll() is None and (len(metrics.read_text().splitlines()) if metrics.exists() else 0) <= before:
                assert time.time() - start < 300; time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.4))
            if process.poll() is None: os.killpg(process.pid, signal.SIGKILL)
        code = process.wait(timeout=600)
        if code == 0: break                                     # finished before the kill landed
        assert code == -signal.SIGKILL, process.stderr.read().decode()[-3000:]
        kills.append(where)
        assert every_checkpoint_loads(out)                      # after every kill: no checkpoint on disk is unreadable
    final = subprocess.run(command(out, resume='latest'), env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert len(kills) >= 3 and 'checkpoint write' in kills and 'step' in kills, kills
    survived = same_weights(final_weights(out), final_weights(tmp_path / 'whole'))
    reference = {r['step']: r['loss'] for r in read_metrics(tmp_path / 'whole' / 'metrics.jsonl')}
    resumed = {r['step']: r['loss'] for r in read_metrics(out / 'metrics.jsonl')}
    lost = sum(resumed.get(step) != loss for step, loss in reference.items())   # steps missing or trained differently
    for where in kills: ledger.record(f'SIGKILL during a {where}', survived, lost)
    assert survived and resumed == reference                    # bitwise the same weights and losses


# -- damaged shards ---------------------------------------------------------------------------------------------------

def picture(i: int) -> bytes:
    return image_bytes(Image.new('RGB', (40, 40), (37 * i % 256, 91 * i % 256, 53 * i % 256)))


def huge_png() -> bytes:
    "A PNG whose header claims 30000 × 30000 pixels: PIL refuses it as a decompression bomb before decoding."
    png = bytearray(image_bytes(Image.new('L', (1, 1), 0), 'png'))
    ihdr = png.index(b'IHDR')
    png[ihdr + 4:ihdr + 12] = struct.pack('>II', 30000, 30000)
    png[ihdr + 17:ihdr + 21] = struct.pack('>I', zlib.crc32(bytes(png[ihdr:ihdr + 17])))
    return bytes(png)


# Per damaged shard: 8 usable samples (one of them kept after fixing its caption) and one of each fault to skip.
DAMAGE = {'corrupt JPEG': 'corrupt_image', 'zero-byte image': 'corrupt_image', 'huge image': 'corrupt_image',
          'empty caption': 'empty_caption', 'binary junk in the caption': 'bad_text'}


def damaged_shard(path: Path, k: int):
    good = [{'jpg': picture(8 * k + i), 'txt': f'a picture {k} {i}'.encode()} for i in range(7)]
    faults = [{'jpg': picture(1)[:300], 'txt': b'a corrupt jpeg'}, {'jpg': b'', 'txt': b'a zero-byte image'},
              {'png': huge_png(), 'txt': b'a huge image'}, {'jpg': picture(2), 'txt': b''},
              {'jpg': picture(3), 'txt': bytes(range(128, 256)) + b' junk'}]   # kept: invalid bytes become U+FFFD
    write_tar(path, [(f'{k:05d}{i:04d}', f) for i, f in enumerate(good[:3] + faults[:3] + good[3:] + faults[3:])])


def truncated_shard(path: Path, k: int, whole: int = 4):
    "`whole` good samples, then a sample whose image the tar ends inside of (a download cut short)."
    samples = [(f'{k:05d}{i:04d}', {'jpg': picture(8 * k + i), 'txt': f'a picture {k} {i}'.encode()}) for i in range(whole)]
    big = image_bytes(Image.effect_noise((64, 64), 60).convert('RGB'))
    write_tar(path, samples + [(f'{k:05d}{whole:04d}', {'jpg': big, 'txt': b'cut short'})])
    with tarfile.open(path) as tar: image = next(m for m in tar if m.name.endswith('.jpg') and m.size == len(big))
    path.write_bytes(path.read_bytes()[:image.offset_data + len(big) // 2])   # inside the last image's data


def clean_shard(path: Path, k: int, n: int = 8):
    write_tar(path, [(f'{k:05d}{i:04d}', {'jpg': picture(8 * k + i), 'txt': f'a picture {k} {i}'.encode()}) for i in range(n)])


def counted(summary: dict) -> dict:
    return {k[5:]: v for k, v in summary.items() if k.startswith('data_') and k not in ('data_skipped', 'data_converted')}


def test_every_kind_of_damaged_sample_and_a_truncated_tar_are_survived_and_counted_exactly(tmp_path, ledger, one_thread):
    folder = tmp_path / 'shards'; folder.mkdir()
    for k in range(3): damaged_shard(folder / f'{k:05d}.tar', k)
    truncated_shard(folder / '00003.tar', 3)
    write_shard_index(folder, {'00000.tar': 8, '00001.tar': 8, '00002.tar': 8, '00003.tar': 4})   # usable samples
    epochs, per_epoch = 2, 28 // 4
    summary = train(load_config('tiny', **fields(str(folder), tmp_path / 'run', batch_size=4, steps=epochs * per_epoch)))
    expected = Counter()
    for reason in DAMAGE.values(): expected[reason] += 3 * epochs            # each fault once per damaged shard per epoch
    expected['corrupt_shard'] = epochs                                        # the cut tar, each time it is read
    exact = summary['step'] == epochs * per_epoch and counted(summary) == dict(expected)
    uncounted = sum(abs(n - counted(summary).get(k, 0)) for k, n in expected.items())   # faulty samples not accounted for
    for fault in [*DAMAGE, 'truncated tar']: ledger.record(f'damaged data: {fault}', exact, uncounted)
    assert exact, (counted(summary), dict(expected))
    assert summary['data_skipped'] == 4 * 3 * epochs + epochs and summary['data_converted'] == 3 * epochs


def test_a_shard_vanishing_mid_run_costs_its_samples_counted_and_replaced(tmp_path, ledger, one_thread):
    folder = tmp_path / 'shards'; folder.mkdir()
    for k in range(4): clean_shard(folder / f'{k:05d}.tar', k)
    write_shard_index(folder, {f'{k:05d}.tar': 8 for k in range(4)})
    vanishing = folder / '00002.tar'
    def delete_a_shard(model):                                                # the evaluation hook, at step 2 of epoch 0
        vanishing.unlink(missing_ok=True)
        return {}
    summary = train(load_config('tiny', **fields(str(folder), tmp_path / 'run', batch_size=8, steps=12, eval_every=2)),
                    eval_fn=delete_a_shard)
    missing, repeated = summary.get('data_missing_shard', 0), summary.get('data_repeated', 0)
    # Epoch 0 had read every shard into its shuffle buffer before the hook ran. Epochs 1 and 2 find 24 of their 32
    # samples: each fills its 4 batches by re-reading (another pass, which misses the shard again), and counts the 8
    # re-used samples as repeated and each miss as missing_shard.
    exact = summary['step'] == 12 and repeated == 2 * 8 and missing >= 2 and summary['data_skipped'] == missing
    ledger.record('damaged data: a shard vanishing mid-run', exact, max(0, 2 * 8 - repeated))   # samples not replaced
    assert exact, counted(summary)


# -- NaN in the loss or the gradients ---------------------------------------------------------------------------------

class NanGradient(torch.autograd.Function):
    "Identity forward; NaN gradients backward: a finite loss whose gradients are garbage."
    @staticmethod
    def forward(ctx, x): return x.view_as(x)
    @staticmethod
    def backward(ctx, grad): return grad * float('nan')


def poisoned_loss(at_call: int, where: str):
    "contrastive_loss, except that its `at_call`-th call gives a NaN loss (where='loss') or NaN gradients ('gradients')."
    calls = [0]
    def loss(image_features, text_features, logit_scale):
        calls[0] += 1
        if calls[0] == at_call:
            if where == 'loss': return contrastive_loss(image_features, text_features, logit_scale) * float('nan')
            logit_scale = NanGradient.apply(logit_scale)
        return contrastive_loss(image_features, text_features, logit_scale)
    return loss


@pytest.mark.parametrize('where', ['loss', 'gradients'])
def test_a_nan_stops_the_run_naming_the_step_or_is_skipped(shards, tmp_path, monkeypatch, ledger, one_thread, where):
    monkeypatch.setattr(step_module, 'contrastive_loss', poisoned_loss(4, where))
    with pytest.raises(FloatingPointError, match=r'non-finite loss or gradients at step 3\b') as stopped:
        train(load_config('tiny', **fields(shards, tmp_path / 'stop', checkpoint_every=2)))
    assert [load_checkpoint(p)['step'] for p in list_checkpoints(tmp_path / 'stop' / 'checkpoints')] == [2]   # nothing after
    monkeypatch.setattr(step_module, 'contrastive_loss', poisoned_loss(4, where))
    summary = train(load_config('tiny', **fields(shards, tmp_path / 'skip', nan_policy='skip')))
    weights = final_weights(tmp_path / 'skip')
    skipped = summary['skipped_steps'] == 1 and all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
    ledger.record(f'NaN in the {where}', skipped and 'step 3' in str(stopped.value))
    assert skipped and summary['step'] == 8


# -- a rank crashes in a 2-process run --------------------------------------------------------------------------------

# `torchrun` runs this: rank `CRASH_RANK` dies (exit 3) when it reaches step `CRASH_AT`, as a process killed by the
# kernel or a failed GPU would.
CRASHING = '''
import os, sys
import cluster_glip.train as T
crash_rank, crash_at, real_step = int(os.environ.get('CRASH_RANK', -1)), int(os.environ.get('CRASH_AT', 0)), T.train_step
def train_step(*args, step=0, **kwargs):
    if int(os.environ['RANK']) == crash_rank and step == crash_at: os._exit(3)
    return real_step(*args, step=step, **kwargs)
T.train_step = train_step
from cluster_glip.cli import main
sys.exit(main(['train', '--config', 'tiny', *sys.argv[1:]]))
'''


def test_a_crashed_rank_stops_the_run_with_its_name_and_a_restart_resumes(shards, tmp_path, ledger):
    script = tmp_path / 'crashing.py'; script.write_text(CRASHING)
    run = fields(shards, tmp_path / 'run', steps=8, checkpoint_every=2, batch_size=8)
    launch = lambda env, **extra: subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
         *overrides({**run, **extra})], env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    started = time.time()
    crashed = launch({'CRASH_RANK': '1', 'CRASH_AT': '5'})
    waited = time.time() - started
    output = crashed.stdout + crashed.stderr
    names_rank = 'rank: 1' in output and 'exitcode  : 3' in output                # torchrun's failure report
    assert crashed.returncode != 0 and names_rank, output[-3000:]
    assert waited < 240                                                            # rank 0 did not wait forever
    assert max(load_checkpoint(p)['step'] for p in list_checkpoints(tmp_path / 'run' / 'checkpoints')) == 4
    resumed = launch({}, resume='latest')
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    steps = [r['step'] for r in read_metrics(tmp_path / 'run' / 'metrics.jsonl')]
    ledger.record('a rank crashing in a 2-process run', names_rank and steps == list(range(1, 9)))
    assert steps == list(range(1, 9))                                              # steps 5.. again, once each


# -- bad configs and command lines fail before training ---------------------------------------------------------------

BAD = {
    'unknown strategy': ({'masking': {'strategy': 'clustr', 'ratio': 0.5}}, "config field 'masking': unknown masking strategy 'clustr'"),
    'mask ratio 1.0': ({'masking': {'strategy': 'random', 'ratio': 1.0}}, "config field 'masking': mask ratio must be a number in \\[0, 1\\)"),
    'negative sigma': ({'masking': {'strategy': 'gaussian', 'ratio': 0.5, 'sigma': -0.2}}, "config field 'masking': sigma must be a number > 0"),
    'missing data path': ({'train_data': '/nowhere/{00000..00003}.tar'}, "config field 'train_data': none of the 4 shards exists"),
    'unwritable output folder': ({'output_dir': '@file/run'}, "config field 'output_dir': cannot write to"),
    'checkpoint of another architecture': ({'model': 'tiny-vit-64', 'pretrained': '@checkpoint'}, "config field 'pretrained': .* does not fit model 'tiny-vit-64'"),
    'resuming another architecture': ({'model': 'tiny-vit-64', 'resume': '@checkpoint'}, "config field 'resume': .* holds a 'tiny-vit-32' model, this run trains 'tiny-vit-64'"),
    'wrong type': ({'lr': 'fast'}, "config field 'lr' must be float, got 'fast'"),
    'unknown field': ({'learning_rate': 1e-3}, "unknown config field 'learning_rate'"),
}


@pytest.fixture(scope='module')
def tiny_checkpoint(shards, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp('tiny32')
    return train(load_config('tiny', **fields(shards, out, steps=1)))['checkpoint']


@pytest.mark.parametrize('case', BAD)
def test_bad_configs_and_arguments_fail_before_training_naming_the_problem(case, shards, tmp_path, tiny_checkpoint, capsys, ledger):
    changes, message = BAD[case]
    (tmp_path / 'file').write_text('not a folder')
    changes = {k: (v.replace('@file', str(tmp_path / 'file')) if isinstance(v, str) else v) for k, v in changes.items()}
    changes = {k: (tiny_checkpoint if v == '@checkpoint' else v) for k, v in changes.items()}
    run = {**fields(shards, tmp_path / 'run'), **changes}
    with pytest.raises(SystemExit) as failed:
        main(['train', '--config', 'tiny', *overrides(run)])
    text = str(failed.value.code)
    refused = re.search(message, text) is not None and not (tmp_path / 'run' / 'metrics.jsonl').exists()
    ledger.record(f'bad config: {case}', refused)
    assert refused, text


# -- checkpoints that would run code ----------------------------------------------------------------------------------

class Payload:
    "Unpickling this runs a shell command: what a malicious checkpoint does."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def test_a_checkpoint_crafted_to_run_code_is_refused_everywhere_it_could_be_loaded(tmp_path, ledger):
    from cluster_glip.evaluate import load_model
    marker = tmp_path / 'code-ran'
    evil = tmp_path / 'evil.pt'
    torch.save({'state_dict': {'visual.proj': Payload(marker)}, 'step': 1}, evil)
    with pytest.raises(CheckpointError, match='refused.*could run code.*GLOBAL'): load_checkpoint(evil)
    with pytest.raises(ValueError, match='refused.*could run code'): load_model('tiny-vit-32', evil, device='cpu')
    with pytest.raises(SystemExit, match='cluster_glip eval: .*refused'): main(['eval', '--model', 'tiny-vit-32', '--checkpoint', str(evil), '--suite', 'synthetic'])
    refused = not marker.exists()
    ledger.record('checkpoint crafted to run code on load', refused)
    assert refused
