"""Steering real runs (issue #17, problems 1 and 2): one writer per output folder, and a resume that refuses a config it
cannot reproduce. A run holding its folder (paused, or two `resume=latest` started at once) makes any second writer
stop before it writes, naming the holder; SIGKILL frees the folder at once. A resume with a field that changes the
trajectory is refused with the differences, `resume_allow` lets it through on purpose and the metrics record it,
harmless changes are logged, and steps below the checkpoint's are refused. Each fault goes into the ledger."""
import json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from cluster_glip.cli import main
from cluster_glip.config import ConfigError, load_config
from cluster_glip.synthetic import write_synthetic_shards
from cluster_glip.rundir import run_lock
from cluster_glip.rundir import list_checkpoints, load_checkpoint, prune_checkpoints, read_metrics
from cluster_glip.train import train

from tiny_runs import ENV, overrides, run_fields

pytestmark = pytest.mark.slow

# `cluster_glip train` with every optimiser step slowed by STEP_SLEEP seconds: a run that stays alive long enough to
# meet a second one (the steps themselves are unchanged).
DRIVER = '''
import os, sys, time
import cluster_glip.train as T
real_step, pause = T.train_step, float(os.environ.get('STEP_SLEEP', 0))
def slow_step(*args, **kwargs):
    time.sleep(pause)
    return real_step(*args, **kwargs)
T.train_step = slow_step
from cluster_glip.cli import main
sys.exit(main(['train', '--config', 'tiny', *sys.argv[1:]]))
'''


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> str:
    return write_synthetic_shards(tmp_path_factory.mktemp('synthetic') / 'train', 256, shard_size=64, processes=1)['shards']


def fields(shards: str, out: Path, **extra) -> dict:
    return run_fields(shards, out, **{'checkpoint_every': 4, 'keep_last': 5, **extra})


def launch(run: dict, step_sleep: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', DRIVER, *overrides(run)], env={**ENV, 'STEP_SLEEP': str(step_sleep)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope='module')
def whole(shards, tmp_path_factory) -> Path:
    "A run of 8 steps that never stopped, with checkpoints at steps 4 and 8."
    out = tmp_path_factory.mktemp('whole')
    train(load_config('tiny', **fields(shards, out)))
    return out


def died_at_step_4(whole: Path, out: Path) -> Path:
    "A run folder as a run of `whole`'s config leaves it when killed right after its step-4 checkpoint."
    (out / 'checkpoints').mkdir(parents=True)
    shutil.copy(whole / 'checkpoints' / 'step_00000004.pt', out / 'checkpoints')
    kept = [l for l in (whole / 'metrics.jsonl').read_text().splitlines() if json.loads(l).get('step', 0) <= 4]
    (out / 'metrics.jsonl').write_text(''.join(l + '\n' for l in kept))
    return out


def folder_state(out: Path) -> dict:
    "Every file under `out` with its bytes: what a refused run must leave exactly as it was."
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob('*')) if p.is_file() and p.name != '.lock'}


def losses(out: Path) -> dict:
    return {r['step']: r['loss'] for r in read_metrics(out / 'metrics.jsonl')}


def same_weights(a: Path, b: Path) -> bool:
    x, y = (load_checkpoint(list_checkpoints(p / 'checkpoints')[-1])['state_dict'] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def changed(record: dict) -> dict:
    "The changes a resume record lists, less those every resume here makes (another folder, resume, resume_allow)."
    return {k: v for k, v in record['changed'].items() if k not in ('output_dir', 'resume', 'resume_allow')}


def wait_for(condition, timeout: float = 240):
    start = time.time()
    while not condition():
        assert time.time() - start < timeout
        time.sleep(0.05)


# -- 1. one writer per output folder ----------------------------------------------------------------------------------

def test_a_second_run_on_a_live_runs_folder_is_refused_naming_the_holder_and_sigkill_frees_it(shards, tmp_path, ledger, one_thread):
    out = tmp_path / 'run'
    run = fields(shards, out, steps=12, checkpoint_every=2)
    holder = launch(run, step_sleep=0.5)
    try:
        wait_for(lambda: holder.poll() is not None or len(list_checkpoints(out / 'checkpoints')) >= 1)
        os.killpg(holder.pid, signal.SIGSTOP)   # the holder is alive but does nothing: a run paused mid-training
        before = folder_state(out)
        with pytest.raises(SystemExit) as refused:   # a second run, carrying on from the holder's checkpoint
            main(['train', '--config', 'tiny', *overrides({**run, 'resume': 'latest'})])
        message = str(refused.value.code)
        names_holder = f'is in use by another run (pid {holder.pid} on ' in message and str(out) in message
        untouched = folder_state(out) == before
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None: os.killpg(holder.pid, signal.SIGKILL); holder.wait()
    resumed = train(load_config('tiny', **run, resume='latest'))   # the killed holder's lock died with it
    carried_on = resumed['step'] == 12 and sorted(losses(out)) == list(range(1, 13))
    ledger.record('two runs on one output folder (second refused)', names_holder and untouched)
    ledger.record('resume after SIGKILL of the lock holder', carried_on)
    assert names_holder, message
    assert untouched and carried_on


def test_two_resume_latest_at_once_one_writes_the_other_is_refused(shards, whole, tmp_path, ledger):
    out = died_at_step_4(whole, tmp_path / 'run')
    run = {**fields(shards, out), 'resume': 'latest'}
    first, second = launch(run, step_sleep=1.5), launch(run, step_sleep=1.5)   # started together, 4 slow steps left
    results = [(p, p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    winners = [p for p, code, _ in results if code == 0]
    refused = [(p, err) for p, code, err in results if code != 0]
    one_writer = len(winners) == 1 and len(refused) == 1 \
        and f'is in use by another run (pid {winners[0].pid} on ' in refused[0][1]
    exact = sorted(losses(out)) == list(range(1, 9)) and losses(out) == losses(whole) and same_weights(out, whole)
    ledger.record('two resume=latest at once', one_writer and exact)
    assert one_writer, [(code, err[-2000:]) for _, code, err in results]
    assert exact


def test_every_process_of_a_multi_process_run_stops_when_the_folder_is_taken(shards, tmp_path, ledger):
    out, script = tmp_path / 'run', tmp_path / 'driver.py'
    script.write_text(DRIVER)
    with run_lock(out):   # this test process holds the folder
        started = subprocess.run(
            [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
             *overrides(fields(shards, out, batch_size=8))],
            env=ENV, capture_output=True, text=True, timeout=300)
    output = started.stdout + started.stderr
    refused = started.returncode != 0 and output.count(f'is in use by another run (pid {os.getpid()} on ') == 2
    ledger.record('a 2-process run on a taken folder (every rank refused)', refused and not (out / 'metrics.jsonl').exists())
    assert refused, output[-3000:]
    assert not (out / 'metrics.jsonl').exists() and not (out / 'checkpoints').exists()


def test_pruning_never_deletes_a_live_writers_temp_file(tmp_path, ledger):
    live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    try:
        theirs, stale = (tmp_path / f'.step_00000009.pt.{live.pid}.tmp', tmp_path / f'.step_00000007.pt.{dead.pid}.tmp')
        ours = tmp_path / f'.step_00000008.pt.{os.getpid()}.tmp'
        for path in (theirs, stale, ours): path.write_bytes(b'half a checkpoint')
        prune_checkpoints(tmp_path, keep_last=1)
        kept = theirs.exists() and not stale.exists() and not ours.exists()
    finally: live.kill(); live.wait()
    ledger.record("pruning next to another writer's temp file", kept)
    assert kept


# -- 2. a resume refuses a config it cannot reproduce -----------------------------------------------------------------

CHANGES = {  # field -> a new value that changes the run's trajectory
    'batch_size': 8, 'seed': 1, 'masking': {'strategy': 'random', 'ratio': 0.5}, 'steps': 10, 'lr': 2e-3,
    'workers': 2, 'accum_steps': 2, 'warmup': 3, 'train_num_samples': 128, 'precision': 'amp_bf16',
}


@pytest.mark.parametrize('field', CHANGES)
def test_a_resume_that_changes_the_trajectory_is_refused_naming_the_field(field, shards, whole, tmp_path, ledger, one_thread):
    out = died_at_step_4(whole, tmp_path / 'run')
    run = {**fields(shards, out), field: CHANGES[field], 'resume': 'latest'}
    old, new = (getattr(load_config('tiny', **f), field) for f in (fields(shards, out), run))
    before = folder_state(out)
    with pytest.raises(SystemExit) as refused:
        main(['train', '--config', 'tiny', *overrides(run)])
    message = str(refused.value.code)
    named = f'{field}: {old!r} -> {new!r}' in message and f'resume_allow=[{field}]' in message
    ledger.record(f'resume with another {field}', named and folder_state(out) == before)
    assert named, message
    assert folder_state(out) == before


def test_resume_allow_lets_a_change_through_and_the_metrics_record_it(shards, whole, tmp_path, ledger, one_thread):
    out = died_at_step_4(whole, tmp_path / 'run')
    summary = train(load_config('tiny', **fields(shards, out, seed=1, threads=2, resume='latest', resume_allow=['seed'])))
    records = read_metrics(out / 'metrics.jsonl', 'resume')
    recorded = len(records) == 1 and records[0]['step'] == 4 and changed(records[0]) == {'seed': [0, 1], 'threads': [1, 2]} \
        and records[0]['allowed'] == ['seed'] and records[0]['checkpoint'].endswith('step_00000004.pt')
    ledger.record('resume with another seed, allowed on purpose (and more threads, logged)', summary['step'] == 8 and recorded)
    assert summary['step'] == 8 and recorded, records
    with pytest.raises(ConfigError, match="config field 'resume_allow': no field 'sed'; did you mean 'seed'"):
        load_config('tiny', **fields(shards, out), resume_allow=['sed'])


def test_harmless_changes_are_logged_and_the_run_stays_exact(shards, whole, tmp_path, ledger, one_thread):
    out = died_at_step_4(whole, tmp_path / 'run')
    train(load_config('tiny', **fields(shards, out, checkpoint_every=1, keep_last=2, resume='latest')))
    records = read_metrics(out / 'metrics.jsonl', 'resume')
    logged = len(records) == 1 and records[0]['allowed'] == [] \
        and changed(records[0]) == {'checkpoint_every': [4, 1], 'keep_last': [5, 2]}
    exact = losses(out) == losses(whole) and same_weights(out, whole)
    ledger.record('resume with harmless changes (checkpoint cadence)', logged and exact)
    assert logged, records
    assert exact


def test_a_resume_with_steps_below_the_checkpoints_is_refused(shards, whole, tmp_path, ledger, one_thread):
    out = died_at_step_4(whole, tmp_path / 'run')
    before = folder_state(out)
    messages = []
    for extra in ({}, {'resume_allow': ['steps']}):   # refused as a change, and even when the change is allowed
        with pytest.raises(SystemExit) as refused:
            main(['train', '--config', 'tiny', *overrides({**fields(shards, out), 'steps': 2, 'resume': 'latest', **extra})])
        messages.append(str(refused.value.code))
    clear = 'steps: 8 -> 2' in messages[0] and re.search(r'is at step 4, past the end of this run \(2 steps\)', messages[1])
    ledger.record('resume with steps below the checkpoint', bool(clear) and folder_state(out) == before)
    assert clear, messages
    assert folder_state(out) == before
