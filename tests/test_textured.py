"""The textured_scenes study rehearsed end to end at a tiny scale: a tiny textured bundle, the study's sweep file cut to
two strategies x two seeds x a few steps through the real sweep runner and pre-training notebook, then the study's
statistics on the sweep's results table; and the budget rule's measurement on that bundle. The generator's pieces and
the statistics have their examples in `nbs/04a_textured.ipynb` and `nbs/08a_study.ipynb`; this file holds what needs
whole runs."""
import math
from pathlib import Path

import pytest

from cluster_glip.study import PRIMARY, budget_steps, interval_table, measure_step_seconds, paired_comparison, point_metrics, t_quantile
from cluster_glip.sweep import dry_run, ensure_synthetic_bundle, load_sweep, run_sweep

TINY_DATA = dict(world='textured', n_train=256, n_validation=16, per_class=2, compound_per_class=1, n_retrieval=10,
                 n_sugarcrepe=3, shard_size=128, processes=1)
TINY_RUN = {'steps': 6, 'warmup': 1, 'batch_size': 32, 'workers': 0, 'log_every': 1, 'n_example_masks': 2}


@pytest.fixture(scope='module')
def tiny_bundle(tmp_path_factory):
    return ensure_synthetic_bundle(tmp_path_factory.mktemp('textured')/'data', **TINY_DATA)


def rehearsal(root: Path, variants=('clip', 'cluster_fused'), seeds=(0, 1), bundle: dict | None = None) -> list[dict]:
    "The study's sweep file, cut to `variants` x `seeds` and a tiny run each, on a tiny bundle, into `root`; the tidy rows."
    bundle = bundle or ensure_synthetic_bundle(root/'data', **TINY_DATA)
    spec = load_sweep('textured_scenes')
    spec = dict(spec, variants=[v for v in spec['variants'] if v['name'] in variants], grid={'seed': list(seeds)})
    fields = dict(TINY_RUN, synthetic_root=bundle['root'], synthetic_args=TINY_DATA)
    return run_sweep(spec, root=root/'runs', set=fields, quiet=True)


def test_the_study_sweeps_validate_every_point():
    rows = dry_run('textured_scenes')
    assert len(rows) == 36 and {r['variant'] for r in rows} == {'clip', 'flip', 'glip', 'cluster_rgb', 'cluster_fused',
                                                                'released', 'kmeans', 'attention', 'block', 'reclip',
                                                                'pgs', 'pgs_released'}
    assert all(r['model'] == 'tiny-vit-64' and r['tune_steps'] == 0 for r in rows)
    assert {r['image_size'] for r in rows if r['variant'] == 'reclip'} == {48}
    gpu = dry_run('textured_scenes_gpu')                  # the GPU version: the same strategies, five seeds
    assert len(gpu) == 60 and {r['model'] for r in gpu} == {'small-vit-64'}
    assert load_sweep('textured_scenes_gpu')['variants'] == load_sweep('textured_scenes')['variants']


def test_rehearsal_data_sweep_statistics(tmp_path, tiny_bundle):
    rows = rehearsal(tmp_path, bundle=tiny_bundle)
    points = point_metrics(rows)
    assert sorted(points.point) == sorted(f'{v}__seed={s}' for v in ('clip', 'cluster_fused') for s in (0, 1))
    assert (points.status == 'done').all(), points[['point', 'error']]
    assert points[PRIMARY].between(0, 1).all() and points['retrieval_r1'].notna().all()
    assert {'ts_crepe/acc_obj', 'ts_crepe/acc_att', 'ts_crepe/acc_rel', 'ts_compound/mean_per_class_recall'} <= set(points)
    cells = interval_table(points)
    clip = cells[(cells.variant == 'clip') & (cells.metric == PRIMARY)].iloc[0]
    values = points[points.variant == 'clip'][PRIMARY]
    assert clip.n == 2 and math.isclose(clip.half, t_quantile(0.975, 1) * values.std() / math.sqrt(2), rel_tol=1e-6)
    comparison = paired_comparison(points)
    assert list(comparison.variant) == ['cluster_fused'] and comparison.verdict.iloc[0] in ('better', 'worse', 'indistinguishable')
    assert (tmp_path/'runs'/'textured_scenes'/'results.csv').is_file()


def test_the_budget_rule_measures_the_unmasked_preset(tiny_bundle):
    "Not a timing: the measurement runs the real preset and gives a positive step time the rule turns into steps."
    seconds = measure_step_seconds('textured', tiny_bundle['train']['shards'], steps=4, warm=1,
                                   fields={'batch_size': 8, 'workers': 0})
    assert seconds > 0
    plan = budget_steps(seconds, budget_seconds=1000.5 * seconds)   # floor(1000.5 / 50) x 50
    assert plan == {'steps': 1000, 'warmup': 50}


def test_shards_are_the_same_bytes_whatever_the_number_of_processes(tmp_path):
    from cluster_glip.textured import write_textured_shards
    for processes in (1, 2): write_textured_shards(tmp_path/str(processes), 24, shard_size=8, processes=processes)
    names = sorted(p.name for p in (tmp_path/'1').iterdir())
    assert names == sorted(p.name for p in (tmp_path/'2').iterdir()) and len([n for n in names if n.endswith('.tar')]) == 3
    assert all((tmp_path/'1'/n).read_bytes() == (tmp_path/'2'/n).read_bytes() for n in names)
