"""End-to-end sweeps through the papermill pre-training notebook (tiny model, a few steps), every packaged ablation
validating point by point, one run configured three ways (CLI, sweep axis, papermill), and a sweep from a wheel install."""
import json, os, shutil, subprocess, sys, time, zipfile
from pathlib import Path

import pytest
import yaml

from cluster_glip.cli import main
from cluster_glip.config import TrainConfig, packaged_configs
from cluster_glip.sweep import (TRAIN_FIELDS, SweepError, default_notebook, dry_run, ensure_synthetic_bundle, expand,
                                load_sweep, notebook_parameters, papermill_params, run_config, run_sweep, validate_points)

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ('strategy', 'mask_ratio', 'glip_sigma', 'anchor_ratio', 'normalization', 'fusion', 'threshold_budget',
             'unmasked_tuning', 'cpu_mini')


def test_every_ablation_of_spec_9_ships_and_every_point_validates():
    assert set(ABLATIONS) <= set(packaged_configs('sweep'))
    for name in packaged_configs('sweep'):
        spec = load_sweep(name)
        rows = dry_run(spec)
        assert len(rows) == len(expand(spec)) >= 3, name
        assert spec.get('description') and isinstance(spec.get('paper'), dict), f'{name}: needs a description and a paper key'
    strategies = {r['masking']['strategy'] for r in dry_run('strategy')}
    assert strategies == {'none', 'random', 'gaussian', 'cluster', 'kmeans', 'attention'}
    assert {r['image_size'] for r in dry_run('strategy')} == {None, 160, 112, 64}
    assert {r['masking']['ratio'] for r in dry_run('mask_ratio')} == {0.5, 0.75, 0.9, 0.918}
    assert {r['masking']['normalize'] for r in dry_run('normalization')} == {'patch', 'none', 'image'}
    assert {(r['masking']['features'], r['masking'].get('fusion')) for r in dry_run('fusion')} >= {('rgb', None), ('embed', None), ('fused', 'linear'), ('fused', 'cbrt')}
    assert {r['tune_epochs'] for r in dry_run('unmasked_tuning')} == {None, 1.0}


def test_paper_numbers_name_points_of_their_sweep():
    "Every published row names a variant (or axis value) the sweep has, so the results page can set it beside ours."
    for name in packaged_configs('sweep'):
        spec, points = load_sweep(name), expand(name)
        for row in spec['paper'].get('rows', []):
            labels = {k: v for k, v in row.items() if k in points[0].labels}
            assert labels, f'{name}: paper row {row} names no axis of the sweep'
            if name != 'mask_ratio' or row.get('variant') != 'clip':   # the CLIP reference row has no point there
                assert any(all(p.labels.get(k) == v for k, v in labels.items()) for p in points), f'{name}: {row}'


def test_a_bad_point_fails_validation_with_its_name():
    spec = load_sweep('cpu_mini')
    spec['grid'] = {'masking.ratio': [0.5, 1.5]}
    with pytest.raises(SweepError, match='ratio=1.5'): dry_run(spec)


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


# -- one vocabulary -----------------------------------------------------------------------------------------------------

def executed_parameters(parameters: dict) -> dict:
    "The pre-training notebook's parameters as papermill sets them: its `parameters` and injected cells, executed."
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    scope = {}
    for cell in parameterize_notebook(load_notebook_node(str(default_notebook())), parameters).cells:
        if {'parameters', 'injected-parameters'} & set(cell.metadata.get('tags', [])): exec(cell.source, scope)
    return scope


def test_one_run_three_ways_is_one_config(capsys):
    "CLI `--set masking.ratio=0.75`, a sweep axis `masking.ratio` and the notebook's `fields` parameter: one TrainConfig."
    main(['train', '--config', 'tiny', '--set', 'masking.ratio=0.75', '--set', 'resume=latest', '--dry_run'])
    from_cli = TrainConfig(**yaml.safe_load(capsys.readouterr().out))
    axis = {'name': 'three_ways', 'base': {'config': 'tiny', 'synthetic_root': None}, 'grid': {'masking.ratio': [0.75]}}
    from_sweep, = validate_points(expand(axis), default_notebook())
    scope = executed_parameters({'fields': {'masking.ratio': 0.75}, 'synthetic_root': None})
    from_papermill = run_config(scope['config'], scope['fields'])
    assert from_cli == from_sweep == from_papermill
    assert from_cli.masking == {'strategy': 'cluster', 'ratio': 0.75} and from_cli.output_dir == 'runs/tiny'


def test_notebook_parameters_are_config_and_fields_plus_a_few_others():
    "The notebook's training parameters are `config` and `fields` (TrainConfig paths); no other parameter shadows a field."
    params = notebook_parameters(default_notebook())
    assert {'config', 'fields'} <= set(params) and not set(params) & set(TRAIN_FIELDS)
    assert len(params) <= 12 and not {'out_dir', 'overrides'} & set(params)
    point = expand({'name': 's', 'base': {'config': 'tiny', 'output_dir': 'runs/x', 'precision': 'fp32', 'eval_suite': None},
                    'grid': {'masking.ratio': [0.5]}})[0]
    assert papermill_params(point.params) == {'config': 'tiny', 'eval_suite': None,
                                              'fields': {'output_dir': 'runs/x', 'precision': 'fp32', 'masking': {'ratio': 0.5}}}


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
