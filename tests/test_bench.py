"""The benchmark harness beyond the notebooks' examples (settings, timing bookkeeping, ratios, open_clip's log and
arguments, feeding, targets and the command line's checks live in nbs/09_bench.ipynb and nbs/09a_compare.ipynb): a property
search of the batch search, the results' JSON schema end to end, and one real side-by-side run of open_clip's trainer.
No timing asserts: the numbers themselves depend on the machine."""
import json, math, statistics, subprocess

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from cluster_glip.bench import SCHEMA, largest_batch
from cluster_glip.compare import compare_with_open_clip, find_openclip_pythonpath, run_bench
from cluster_glip.synthetic import write_synthetic_shards


# -- the largest batch ------------------------------------------------------------------------------------------------

@hypothesis_settings(max_examples=200, deadline=None)
@given(threshold=st.integers(0, 5000), start=st.integers(1, 600), limit=st.integers(1, 5000))
def test_largest_batch_finds_the_threshold_in_few_tries(threshold, start, limit):
    tried = []
    def fits(batch):
        assert 1 <= batch <= limit
        tried.append(batch)
        return batch <= threshold
    assert largest_batch(fits, start, limit) == min(threshold, limit)
    assert len(tried) <= 2 * math.ceil(math.log2(limit + 1)) + 2


# -- end to end -------------------------------------------------------------------------------------------------------

def test_run_bench_writes_the_results_json_and_plot(tmp_path, one_thread):
    result = run_bench('tiny-vit-32', batch=4, settings=['none', 'random-0.5', 'cluster-paper', 'reclip-112', 'text-8'], compare=(),
                       feed=False, steps=1, warmup=1, repeats=2, out=tmp_path / 'bench', threads=1, quiet=True)
    assert (tmp_path / 'bench.png').stat().st_size > 10_000
    saved = json.loads((tmp_path / 'bench.json').read_text())
    assert saved == json.loads(json.dumps(result)) and saved['schema'] == SCHEMA
    assert {'cpu', 'cores', 'torch', 'torch_threads', 'gpu', 'load_average', 'load_average_end'} <= set(saved['machine'])
    assert saved['config']['settings'] == ['none', 'random-0.5', 'cluster-paper', 'reclip-112', 'text-8'] and saved['config']['threads'] == 1
    assert {'data', 'settings'} <= set(saved['phases']) and saved['open_clip'] == [] and saved['feeding'] is None
    rows = {r['setting']: r for r in saved['settings']}
    assert rows['none']['speedup'] == 1.0 and rows['none']['ideal_speedup'] == 1.0
    assert rows['random-0.5']['tokens'] == 9 and rows['reclip-112']['image_size'] == 16 and rows['reclip-112']['tokens'] == 5
    assert 9 < rows['cluster-paper']['tokens'] <= 17                    # the paper budget keeps a content-dependent K
    assert (rows['text-8']['text_length'], rows['none']['text_length'], rows['text-8']['tokens']) == (8, 77, 17)
    assert rows['text-8']['gflops'] < rows['none']['gflops']           # the text tower at 8 tokens instead of 77
    for r in saved['settings']:
        assert len(r['step_s_repeats']) == len(r['plan_s_repeats']) == 2 and r['step_s'] == statistics.median(r['step_s_repeats'])
        assert math.isclose(r['samples_per_s'], 4 / r['step_s']) and r['mfu'] is None     # no CPU peak given
        assert r['peak_memory_mb'] is None or r['peak_memory_mb'] >= r['state_memory_mb']
    assert all({'target', 'measured', 'status'} == set(t) for t in saved['targets'])


def test_our_trainer_against_open_clips_trainer(tmp_path, one_thread):
    "A real run of open_clip_train.main in a subprocess beside ours: both log every step, ours over theirs is a ratio."
    try: pythonpath = find_openclip_pythonpath()
    except (ValueError, subprocess.CalledProcessError) as e: pytest.skip(f'webdataset 0.2.86 for open_clip_train unavailable: {e}')
    shards = write_synthetic_shards(tmp_path / 'train', 64, shard_size=32, processes=1)['shards']
    rows = [dict(setting='none', samples_per_s=10.0, open_clip_step_s=0.5)]
    out, = compare_with_open_clip('tiny-vit-32', shards, ['none'], rows, batch=4, precision='fp32', device='cpu', steps=2,
                                  trainer_warmup=1, runs=2, workers=1, threads=1, pythonpath=pythonpath, work=tmp_path,
                                  say=lambda *a: None)
    assert out['open_clip_error'] is None, out['open_clip_error']
    assert [len(run) for run in out['ours_trainer_steps'] + out['open_clip_trainer_steps']] == [3, 3, 3, 3]
    assert out['ours_trainer_runs'][0] == statistics.median(out['ours_trainer_steps'][0][1:])    # warm-up step dropped
    assert out['open_clip_trainer_samples_per_s'] == max(out['open_clip_trainer_runs'])          # the best run counts
    assert math.isclose(out['trainer_ratio'], out['ours_trainer_samples_per_s'] / out['open_clip_trainer_samples_per_s'])
    assert out['step_ratio'] == 10.0 / (4 / 0.5) and out['open_clip_trainer_data_s'] >= 0
    assert 'open_clip_train.main --model tiny-vit-32' in out['open_clip_command']
