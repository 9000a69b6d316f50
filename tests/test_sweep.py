"""End-to-end sweeps through the papermill pre-training notebook (tiny model, a few steps) and a sweep from a wheel install.

Expanding and validating sweeps (every packaged ablation point by point, a bad point, the notebook's parameters, one run
configured three ways) are examples in `nbs/08_sweep.ipynb`."""
import json, os, shutil, subprocess, sys, time, zipfile
from pathlib import Path

import pytest

from cluster_glip.sweep import ensure_synthetic_bundle, run_sweep

ROOT = Path(__file__).resolve().parents[1]


SMALL = dict(n_train=256, image_size=32, shard_size=128, n_zeroshot=48, n_retrieval=16, n_sugarcrepe=4, processes=1)


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
    "One sweep of three tiny points (3 steps each): two that train and evaluate, one whose training data are missing."
    root = tmp_path_factory.mktemp('runs')
    bundle = ensure_synthetic_bundle(root/'synthetic', **SMALL)
    masking = {'strategy': 'random', 'ratio': 0.5}
    spec = {'name': 'two', 'description': 'two tiny points and a broken one',
            'base': {'config': 'tiny', 'synthetic_root': bundle['root'], 'synthetic_args': SMALL, 'eval_suite': 'synthetic',
                     'n_example_masks': 2, 'model': 'tiny-vit-32', 'steps': 3, 'batch_size': 16, 'warmup': 1,
                     'log_every': 1, 'checkpoint_every': 100, 'workers': 0, 'tune_steps': 0},
            'variants': [{'name': 'flip', 'masking': masking},
                         {'name': 'cluster', 'masking': {'strategy': 'cluster', 'ratio': 0.5}},
                         # valid as a config (the runner's validation passes), fails in the notebook: no such shards
                         {'name': 'bad', 'masking': masking, 'synthetic_root': None,
                          'train_data': str(root/'nowhere'/'{0..1}.tar')}]}
    return spec, root, run_sweep(spec, root=root, cwd=ROOT)


def test_sweep_end_to_end_results_table(swept):
    spec, root, rows = swept
    done = [r for r in rows if r['point'] != 'bad']
    assert {r['status'] for r in done} == {'done'} and {r['variant'] for r in done} == {'flip', 'cluster'}
    for point in ('flip', 'cluster'):
        metrics = {r['metric']: r['value'] for r in done if r['point'] == point}
        assert 0 <= metrics['synthetic_shapes/top1'] <= 1 and metrics['train/steps'] == 3, point
        assert abs(metrics['train/mask_drop_fraction'] - 0.5) < 1e-6
        folder = root/'two'/point
        for name in ('done', 'metrics.json', 'pretrain.ipynb', 'example_masks.png', 'training_curves.png', 'eval_rows.jsonl'):
            assert (folder/name).is_file(), f'{point}: no {name}'
        assert Path(json.loads((folder/'metrics.json').read_text())['checkpoint']).is_file()
    csv_lines = (root/'two'/'results.csv').read_text().splitlines()
    assert csv_lines[0].startswith('sweep,point,status,variant') and len(csv_lines) == len(rows) + 1
    assert json.loads((root/'two'/'results.json').read_text()) == json.loads(json.dumps(rows))


def test_a_failing_point_is_recorded_and_the_others_complete(swept, ledger):
    spec, root, rows = swept
    bad = [r for r in rows if r['point'] == 'bad']
    recorded = (len(bad) == 1 and bad[0]['status'] == 'failed' and bad[0]['metric'] is None
                and "config field 'train_data': none of the 2 shards exists" in bad[0]['error']
                and Path(bad[0]['notebook']).is_file() and 'nowhere' in Path(bad[0]['notebook']).read_text()
                and not (root/'two'/'bad'/'done').exists())                 # the saved notebook shows where it stopped
    others = {r['point'] for r in rows if r['metric'] == 'synthetic_shapes/top1'} == {'flip', 'cluster'}
    ledger.record('a failing sweep point', recorded and others)
    assert recorded, bad
    assert others


def test_finished_points_are_skipped(swept):
    spec, root, rows = swept
    marker = (root/'two'/'flip'/'done').stat().st_mtime_ns
    start = time.perf_counter()
    again = run_sweep(spec, root=root, cwd=ROOT, only='flip|cluster')   # both finished: nothing runs
    assert time.perf_counter() - start < 5 and (root/'two'/'flip'/'done').stat().st_mtime_ns == marker
    assert again == [r for r in rows if r['point'] != 'bad']


# -- a sweep from a wheel install ---------------------------------------------------------------------------------------

BUILD_INPUTS = ('setup.py', 'settings.ini', 'pyproject.toml', 'README.md', 'cluster_glip', 'nbs/experiments/pretrain.ipynb')


def dev_site_packages() -> str:
    "The dev venv's site-packages (the one torch is imported from), to reuse its dependencies in a fresh venv."
    import torch
    return next(p for p in sys.path if p.endswith('site-packages') and Path(torch.__file__).is_relative_to(p))


@pytest.mark.slow
def test_sweep_runs_from_a_wheel_install_on_the_packaged_notebook(tmp_path):
    "A wheel in a fresh venv (no checkout, no editable install) runs `cluster_glip sweep` on the notebook it ships."
    source, wheels, venv, elsewhere = tmp_path/'source', tmp_path/'wheels', tmp_path/'venv', tmp_path/'elsewhere'
    for name in BUILD_INPUTS:                        # build from a copy, so that the checkout gets no build/ or egg-info
        (source/name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (ROOT/name).is_dir() else shutil.copyfile
        copy(ROOT/name, source/name, **({'ignore': shutil.ignore_patterns('__pycache__')} if (ROOT/name).is_dir() else {}))
    run = lambda *command, **kw: subprocess.run(command, check=True, capture_output=True, text=True, **kw)
    run(sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(wheels), str(source))
    wheel, = wheels.glob('cluster_glip-*.whl')
    with zipfile.ZipFile(wheel) as archive:           # the shipped notebook is the source notebook, byte for byte
        assert archive.read('cluster_glip/experiments/pretrain.ipynb') == (ROOT/'nbs/experiments/pretrain.ipynb').read_bytes()
    run(sys.executable, '-m', 'venv', '--without-pip', str(venv))
    site, = venv.glob('lib/python*/site-packages')
    (site/'deps.pth').write_text(dev_site_packages() + '\n')
    run(sys.executable, '-m', 'pip', '--python', str(venv/'bin'/'python'), 'install', '--no-deps', '-q', str(wheel))
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    done = run(str(venv/'bin'/'cluster_glip'), 'sweep', 'cpu_mini', '--only', 'flip__seed=0', '--set', 'steps=40',
               '--dry_run', cwd=elsewhere, env=env)
    assert f'1 points validate against {site}/cluster_glip/experiments/pretrain.ipynb' in done.stdout, done.stdout
    assert "'steps': 40" in done.stdout and 'flip__seed=0' in done.stdout
