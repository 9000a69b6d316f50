"""Steering real runs (issue #17): full disks, torn metrics logs, bad checkpoints and non-finite weights. A full disk is
simulated two ways, both without root: an `open` for the train module whose files fail with ENOSPC once a byte budget is
spent (after writing what fits, as the kernel does), and a real kernel limit, RLIMIT_FSIZE, under which a write past the
limit fails with EFBIG. Each fault goes into the ledger (`conftest.py`)."""
import errno, json, os, random, subprocess, sys
from pathlib import Path

import open_clip
import pytest
import torch

import cluster_glip.rundir as rundir_module
import cluster_glip.train as train_module
from cluster_glip.cli import main
from cluster_glip.config import load_config
from cluster_glip.evaluate import load_model
from cluster_glip.step import unwrap
from cluster_glip.synthetic import write_synthetic_shards
from cluster_glip.rundir import CheckpointError, list_checkpoints, load_checkpoint, read_metrics
from cluster_glip.train import train

from tiny_runs import ENV, overrides, run_fields

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> str:
    return write_synthetic_shards(tmp_path_factory.mktemp('synthetic') / 'train', 256, shard_size=128, processes=1)['shards']


def fields(shards: str, out: Path, **extra) -> dict:
    return run_fields(shards, out, **{'checkpoint_every': 2, 'keep_last': 8, **extra})


def train_command(run: dict) -> list[str]:
    return ['train', '--config', 'tiny', *overrides(run)]


@pytest.fixture(scope='module')
def reference(shards, tmp_path_factory) -> Path:
    "A run never interrupted: 8 steps, a checkpoint every 2 (all kept)."
    out = tmp_path_factory.mktemp('reference')
    train(load_config('tiny', **fields(shards, out)))
    return out


def final_weights(out: Path) -> dict:
    return load_checkpoint(list_checkpoints(Path(out) / 'checkpoints')[-1])['state_dict']


def same_run(out: Path, reference: Path) -> bool:
    "Bitwise the reference's final weights, and its losses step by step."
    a, b = final_weights(out), final_weights(reference)
    losses = lambda run: {r['step']: r['loss'] for r in read_metrics(Path(run) / 'metrics.jsonl')}
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and losses(out) == losses(reference)


def copy_checkpoints(reference: Path, out: Path, steps) -> Path:
    folder = out / 'checkpoints'; folder.mkdir(parents=True)
    for step in steps:
        name = f'step_{step:08d}.pt'
        (folder / name).write_bytes((reference / 'checkpoints' / name).read_bytes())
    return folder


def one_line(text: str) -> bool:
    return '\n' not in text.strip() and 'Traceback' not in text


# -- a full disk ------------------------------------------------------------------------------------------------------

class FullDisk:
    """A disk with `free` bytes left, as seen through `open`: a write that does not fit writes what fits, then fails with
    ENOSPC (a buffered file raises at once; an unbuffered one returns the short count and raises on the next write)."""
    def __init__(self, free: int): self.free = free

    def open(self, file, mode='r', *args, **kwargs):
        real = open(file, mode, *args, **kwargs)
        if not any(c in mode for c in 'wa+'): return real
        unbuffered = kwargs.get('buffering', args[0] if args else -1) == 0
        return _FullDiskFile(self, real, unbuffered)


class _FullDiskFile:
    def __init__(self, disk: FullDisk, real, unbuffered: bool): self.disk, self.real, self.unbuffered = disk, real, unbuffered
    def __getattr__(self, name): return getattr(self.real, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.real.close()

    def write(self, data):
        fits = min(len(data), max(0, self.disk.free))
        if fits: self.real.write(data[:fits]); self.real.flush(); self.disk.free -= fits
        if fits == len(data) or (fits and self.unbuffered): return fits
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_write_leaves_no_temp_file_and_says_so_in_one_line(shards, reference, tmp_path,
                                                                                            monkeypatch, ledger):
    out, size = tmp_path / 'run', (reference / 'checkpoints' / 'step_00000002.pt').stat().st_size
    disk = FullDisk(free=size + size // 2)                      # room for the step-2 checkpoint and half of step 4's
    with monkeypatch.context() as patch:
        patch.setattr(rundir_module, 'open', disk.open, raising=False)
        with pytest.raises(SystemExit) as failed: main(train_command(fields(shards, out)))
    message = str(failed.value.code)
    named = (message.startswith(f"cluster_glip train: no space left on device while writing {out}/checkpoints/"
                                "step_00000004.pt; the checkpoints written before are kept") and one_line(message))
    clean = sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['step_00000002.pt']   # no .tmp left behind
    resumed = train(load_config('tiny', **fields(shards, out, resume='latest')))                # space freed: carry on
    survived = named and clean and resumed['step'] == 8 and same_run(out, reference)
    ledger.record('full disk during a checkpoint write (ENOSPC)', survived)
    assert named, message
    assert clean and survived


LIMITED = '''
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))   # writes past `limit` bytes fail with EFBIG
from cluster_glip.cli import main
sys.exit(main(['train', '--config', 'tiny', *sys.argv[2:]]))
'''


def test_a_real_file_size_limit_fails_the_checkpoint_write_cleanly(shards, reference, tmp_path, ledger):
    "RLIMIT_FSIZE: the kernel itself refuses the checkpoint's bytes past the limit (EFBIG), as a full disk would."
    limit = (reference / 'checkpoints' / 'step_00000002.pt').stat().st_size // 2
    out = tmp_path / 'run'
    failed = subprocess.run([sys.executable, '-c', LIMITED, str(limit), *overrides(fields(shards, out, steps=2))],
                            env=ENV, capture_output=True, text=True, timeout=300)
    last = failed.stderr.strip().splitlines()[-1] if failed.stderr.strip() else ''
    named = failed.returncode == 1 and 'Traceback' not in failed.stderr and last.startswith(
        f'cluster_glip train: file too large while writing {out}/checkpoints/step_00000002.pt;')
    clean = list((out / 'checkpoints').iterdir()) == []
    ledger.record('file-size limit during a checkpoint write (EFBIG)', named and clean)
    assert named, failed.stderr[-3000:]
    assert clean, list((out / 'checkpoints').iterdir())


def test_a_full_disk_during_a_metrics_write_keeps_whole_lines(shards, tmp_path, monkeypatch, ledger):
    out = tmp_path / 'run'
    disk = FullDisk(free=2000)                                   # a few metrics lines, then the disk is full
    with monkeypatch.context() as patch:
        patch.setattr(rundir_module, 'open', disk.open, raising=False)
        with pytest.raises(SystemExit) as failed: main(train_command(fields(shards, out, checkpoint_every=1000)))
    message = str(failed.value.code)
    text = (out / 'metrics.jsonl').read_text()
    whole = text.endswith('\n') and all(json.loads(line) for line in text.splitlines())
    named = message.startswith(f'cluster_glip train: no space left on device while writing {out}/metrics.jsonl') \
        and one_line(message)
    ledger.record('full disk during a metrics write', whole and named)
    assert named, message
    assert whole, text[-500:]


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_reported(shards, reference, tmp_path, capsys, ledger):
    "A run killed while writing step 6's record after its step-4 checkpoint: resume=latest repairs the log."
    out = tmp_path / 'run'
    copy_checkpoints(reference, out, (2, 4))
    lines = (reference / 'metrics.jsonl').read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get('step', 0) <= 5]
    torn = next(line for line in lines if json.loads(line).get('step') == 6)[:40]
    (out / 'metrics.jsonl').write_text(''.join(line + '\n' for line in kept) + torn)
    capsys.readouterr()
    summary = train(load_config('tiny', **fields(shards, out, resume='latest')))
    reported = f'metrics: dropped 1 torn line(s) of {out}/metrics.jsonl (line {len(kept) + 1}: ' in capsys.readouterr().err
    survived = summary['step'] == 8 and same_run(out, reference)
    ledger.record('torn last line of metrics.jsonl on resume', reported and survived)
    assert reported and survived


# -- bad checkpoints --------------------------------------------------------------------------------------------------

class Payload:
    "Unpickling this runs a shell command: what a malicious checkpoint does."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f'touch {self.marker}',))


def bad_checkpoints(reference: Path, folder: Path) -> dict[str, Path]:
    "One file of each kind a `resume` or `eval --checkpoint` may be given."
    folder.mkdir()
    whole = (reference / 'checkpoints' / 'step_00000002.pt').read_bytes()
    files = {'empty': b'', 'truncated': whole[:len(whole) // 2], 'not a checkpoint': random.Random(0).randbytes(50_000)}
    paths = {kind: folder / f"{kind.replace(' ', '_')}.pt" for kind in [*files, 'not ours', 'code inside']}
    for kind, content in files.items(): paths[kind].write_bytes(content)
    torch.save(open_clip.create_model('tiny-vit-32').state_dict(), paths['not ours'])     # stock open_clip weights
    torch.save({'state_dict': {'visual.proj': Payload(folder / 'code-ran')}, 'step': 1}, paths['code inside'])
    return paths


def expected(path: Path, size: int) -> dict[str, str]:
    return {'empty': f'{path}: empty (0 bytes)',
            'truncated': f'{path}: truncated: a torch zip archive of {size} bytes without its end',
            'not a checkpoint': f'{path}: not a checkpoint',
            'not ours': f'{path}: not a cluster_glip training checkpoint (it has no state_dict, optimizer, step, data, rng, model_name)',
            'code inside': f'{path}: refused, it holds more than tensors and containers and loading it could run code '
                           '(GLOBAL posix.system'}


def test_bad_checkpoints_are_named_in_one_line_by_resume_and_eval(shards, reference, tmp_path, ledger):
    paths = bad_checkpoints(reference, tmp_path / 'bad')
    for kind, path in paths.items():
        want = expected(path, path.stat().st_size)[kind]
        with pytest.raises(SystemExit) as resumed:
            main(train_command(fields(shards, tmp_path / f"run_{path.stem}", resume=str(path))))
        resume_message = str(resumed.value.code)
        ok = resume_message.startswith(f"cluster_glip train: config field 'resume': {want}") and one_line(resume_message)
        if kind == 'not a checkpoint': ok = ok and 'could run code' not in resume_message
        if kind != 'not ours':    # stock open_clip weights are what `eval` is for
            with pytest.raises(SystemExit) as evaluated:
                main(['eval', '--model', 'tiny-vit-32', '--checkpoint', str(path), '--suite', 'synthetic', '--device', 'cpu'])
            eval_message = str(evaluated.value.code)
            with pytest.raises(CheckpointError) as loaded: load_model('tiny-vit-32', path, device='cpu')
            ok = ok and eval_message.startswith(f'cluster_glip eval: {want}') and str(loaded.value).startswith(want)
        ledger.record(f'bad checkpoint: {kind}', ok and not (tmp_path / 'bad' / 'code-ran').exists())
        assert ok, (kind, resume_message)
    assert not (tmp_path / 'bad' / 'code-ran').exists()


def test_resume_latest_falls_back_to_the_newest_loadable_checkpoint_and_says_so(shards, reference, tmp_path, capsys,
                                                                               ledger):
    out = tmp_path / 'run'
    folder = copy_checkpoints(reference, out, (2, 4, 6, 8))
    whole = (folder / 'step_00000006.pt').read_bytes()
    (folder / 'step_00000006.pt').write_bytes(whole[:len(whole) * 3 // 4])   # a copy cut short
    (folder / 'step_00000008.pt').write_bytes(b'')                            # a write that never happened
    (out / 'metrics.jsonl').write_text((reference / 'metrics.jsonl').read_text())
    capsys.readouterr()
    summary = train(load_config('tiny', **fields(shards, out, resume='latest')))
    said = capsys.readouterr().err
    told = (f'resume: skipped {folder}/step_00000008.pt: empty (0 bytes)' in said
            and f'resume: skipped {folder}/step_00000006.pt: truncated' in said)
    survived = summary['step'] == 8 and same_run(out, reference)

    nothing = tmp_path / 'nothing'
    damaged = copy_checkpoints(reference, nothing, (2, 4))
    for path in list_checkpoints(damaged): path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit) as refused:
        main(train_command(fields(shards, nothing, resume='latest')))
    message = str(refused.value.code)
    clear = (message.startswith(f"cluster_glip train: config field 'resume': none of the 2 checkpoints in {damaged} "
                                'loads (') and one_line(message) and not (nothing / 'metrics.jsonl').exists())
    ledger.record('newest checkpoint damaged, resume=latest', told and survived)
    ledger.record('every checkpoint damaged, resume=latest', clear)
    assert told, said
    assert survived
    assert clear, message


# -- non-finite weights under nan_policy=skip -------------------------------------------------------------------------

def overflowing_step(at: int):
    "train_step, except that the update of step `at` overflows a weight to infinity (finite loss and gradients)."
    real = train_module.train_step
    def step(model, *args, step=0, **kwargs):
        result = real(model, *args, step=step, **kwargs)
        if step == at:
            with torch.no_grad(): unwrap(model).visual.proj.fill_(float('inf'))
        return result
    return step


def test_a_run_never_exits_0_with_non_finite_weights(shards, tmp_path, monkeypatch, ledger):
    out = tmp_path / 'run'
    monkeypatch.setattr(train_module, 'train_step', overflowing_step(4))   # the 5th step: weights inf from step 5 on
    with pytest.raises(SystemExit) as stopped:
        main(train_command(fields(shards, out, nan_policy='skip')))
    message = str(stopped.value.code)
    named = message.startswith('cluster_glip train: non-finite weights at step 6 (1 tensors, e.g. visual.proj; ') \
        and f'the last finite one is kept ({out}/checkpoints/step_00000004.pt)' in message and one_line(message)
    checkpoints = list_checkpoints(out / 'checkpoints')
    finite = [p.name for p in checkpoints] == ['step_00000002.pt', 'step_00000004.pt'] and all(
        v.isfinite().all() for p in checkpoints for v in load_checkpoint(p)['state_dict'].values() if v.is_floating_point())
    ledger.record('non-finite weights under nan_policy=skip', named and finite)
    assert named, message
    assert finite, checkpoints
