"""The benchmark harness's own logic: settings, warm-up and median bookkeeping, ratios, the batch search, open_clip's log,
the targets, the results' JSON schema end to end, and one real side-by-side run of open_clip's trainer. No timing asserts:
the numbers themselves depend on the machine."""
import json, math, statistics, subprocess

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from cluster_glip.bench import (DEFAULT_SETTINGS, SCHEMA, BenchSetting, add_ratios, check_targets, interleaved_timings,
                                largest_batch, paired_speedup, parse_setting, patch_dropout_of, split_settings)
from cluster_glip.compare import (assumed_steps_per_s, bench_cli, compare_with_open_clip, find_openclip_pythonpath,
                                  open_clip_args, parse_open_clip_log, run_bench, workers_needed)
from cluster_glip.synthetic import write_synthetic_shards


# -- settings ---------------------------------------------------------------------------------------------------------

def test_default_settings_parse_and_reclip_keeps_the_grid_fraction():
    settings = {s: parse_setting(s) for s in DEFAULT_SETTINGS}
    assert settings['none'].masking == {'strategy': 'none'} and settings['random-0.75'].masking == {'strategy': 'random', 'ratio': 0.75}
    assert settings['cluster-paper'].masking['budget'] == 'paper' and settings['cluster-paper'].masking['threshold'] == 'calibrated'
    assert [settings[f'reclip-{px}'].image_size(224) for px in (160, 112, 64)] == [160, 112, 64]   # ViT-B/16
    assert [parse_setting(f'reclip-{px}', 'tiny-vit-64').image_size(64) for px in (160, 112, 64)] == [48, 32, 16]
    assert settings['random-0.5'].image_size(64) == 64 and settings['reclip-112'].overrides == ('image_size=112',)
    assert parse_setting(' Random-0.5 ') == settings['random-0.5'] and parse_setting(settings['none']) is settings['none']


def test_a_setting_is_a_label_and_config_overrides():
    "Custom settings use TrainConfig's field paths, as `--set` does; a built-in name is the same thing, named."
    mine = parse_setting('flip-half:masking.strategy=random, masking.ratio=0.5')
    assert mine == BenchSetting('flip-half', ('masking.strategy=random', 'masking.ratio=0.5'))
    assert mine.fields == parse_setting('random-0.5').fields == {'masking': {'strategy': 'random', 'ratio': 0.5}}
    assert parse_setting('small:image_size=112').image_size(224) == 112 and parse_setting('small:image_size=112').masking == {'strategy': 'none'}
    assert patch_dropout_of(mine) == 0.5
    assert split_settings('none,flip-half:masking.strategy=random,masking.ratio=0.5, reclip-64') == [
        'none', 'flip-half:masking.strategy=random,masking.ratio=0.5', 'reclip-64']
    assert split_settings('') == [] and split_settings('none,random-0.5') == ['none', 'random-0.5']


@pytest.mark.parametrize('bad, says', [('random-1.5', 'ratio'), ('nothing-0.5', 'unknown benchmark setting'),
                                       ('reclip-300', '[16, 224)'), ('', 'unknown benchmark setting'),
                                       ('x:masking.strategy=flip', 'unknown masking strategy'), ('x:lr=0.1', 'sets lr'),
                                       ('x:masking.ratio', 'field=value'), (':masking.ratio=0.5', 'unknown benchmark setting')])
def test_bad_settings_say_what_to_use(bad, says):
    with pytest.raises(ValueError) as error: parse_setting(bad)
    assert says in str(error.value)


# -- timing bookkeeping -----------------------------------------------------------------------------------------------

class FakeClock:
    "A clock that only moves when a fake function 'runs'."
    def __init__(self): self.now = 0.0
    def __call__(self): return self.now


def test_interleaved_timings_skip_warmup_time_each_round_and_interleave():
    clock, calls = FakeClock(), []
    durations = {'a': iter([100.0, 5.0, 1.0, 3.0]), 'b': iter([50.0, 2.0, 2.0, 8.0])}   # first: the warm-up call

    def make(name):
        def fn():
            calls.append(name)
            clock.now += next(durations[name])
        return fn
    times = interleaved_timings({'a': make('a'), 'b': make('b')}, steps=1, repeats=3, warmup=1, clock=clock)
    assert times == {'a': [5.0, 1.0, 3.0], 'b': [2.0, 2.0, 8.0]}                        # warm-up durations not in them
    assert calls == ['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']                            # warm-ups; rounds a b, b a, a b


def test_interleaved_timings_divide_by_steps_per_round():
    clock = FakeClock()
    def fn(): clock.now += 2.0
    times = interleaved_timings({'x': fn}, steps=4, repeats=2, warmup=0, clock=clock)
    assert times == {'x': [2.0, 2.0]}
    with pytest.raises(ValueError, match='steps >= 1'): interleaved_timings({'x': fn}, steps=0, repeats=1)


# -- ratios -----------------------------------------------------------------------------------------------------------

def row(setting, gflops, samples_per_s, plan_s=0.0, memory=None):
    return dict(setting=setting, gflops=gflops, samples_per_s=samples_per_s, step_s=16 / samples_per_s, plan_s=plan_s,
                peak_memory_mb=memory)


def test_ratios_against_the_unmasked_row():
    none, masked = add_ratios([row('none', 41.1, 1000.0, memory=30000.0), row('random-0.5', 23.4, 1650.0, plan_s=0.001, memory=15000.0)],
                              peak_tflops=989.0)
    assert none['speedup'] == none['ideal_speedup'] == 1.0 and none['memory_ratio'] == 1.0
    assert masked['speedup'] == 1.65 and math.isclose(masked['ideal_speedup'], 41.1 / 23.4)
    assert math.isclose(masked['speedup_of_ideal'], 1.65 / (41.1 / 23.4)) and masked['memory_ratio'] == 0.5
    assert math.isclose(masked['mask_overhead'], 0.001 / (16 / 1650))
    assert math.isclose(none['tflops'], 3 * 41.1 * 1000 / 1e3) and math.isclose(none['mfu'], none['tflops'] / 989.0)


def test_speedups_pair_the_rounds():
    base, masked = row('none', 41.1, 1000.0), row('random-0.5', 23.4, 1500.0)
    base['step_s_repeats'], masked['step_s_repeats'] = [1.0, 2.0, 1.1], [0.8, 1.0, 1.6]    # per-round: 1.25, 2.0, 0.69
    assert add_ratios([base, masked])[1]['speedup'] == 1.25                                # not 1500 / 1000
    assert paired_speedup([1.0, 2.0], [0.5, 1.0, 0.4], 10.0, 30.0) == 3.0                  # rounds don't pair: samples/s
    assert paired_speedup(None, None, None, 30.0) is None


def test_ratios_without_baseline_peak_or_memory_are_none_not_wrong():
    alone, = add_ratios([row('random-0.5', 23.4, 1650.0)])
    assert alone['speedup'] is alone['ideal_speedup'] is alone['speedup_of_ideal'] is alone['memory_ratio'] is alone['mfu'] is None
    assert alone['tflops'] > 0


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


# -- open_clip's trainer ----------------------------------------------------------------------------------------------

LOG = """2026-11-22,12:45:15 | INFO | Start epoch 0
2026-11-22,12:45:18 | INFO | Train Epoch: 0 [  16/1600 (1%)] Data (t): 0.834 Batch (t): 2.328, 6.87146/s, 6.87146/s/gpu LR: 0.000500 Logit Scale: 14.286 Contrastive_loss: 2.9678 (2.9678) Loss: 2.9678 (2.9678)
2026-11-22,12:45:19 | INFO | Train Epoch: 0 [  32/1600 (2%)] Data (t): 0.025 Batch (t): 1.203, 13.2970/s, 13.2970/s/gpu LR: 0.000500 Logit Scale: 14.279 Contrastive_loss: 3.5297 (3.2487) Loss: 3.5297 (3.2487)
2026-11-22,12:45:20 | INFO | Train Epoch: 1 [1600/1600 (100%)] Data (t): 0.000 Batch (t): 0.001, 1.23457e+06/s, 154321./s/gpu LR: 0.000452 Logit Scale: 14.272 Loss: 3.2555 (3.2510)
"""


def test_open_clip_log_lines_parse_into_per_step_records():
    records = parse_open_clip_log(LOG)
    assert [(r['epoch'], r['samples'], r['epoch_samples']) for r in records] == [(0, 16, 1600), (0, 32, 1600), (1, 1600, 1600)]
    assert records[0]['data_s'] == 0.834 and records[1]['batch_s'] == 1.203 and records[1]['samples_per_s'] == 13.297
    assert records[2]['samples_per_s'] == 1.23457e6 and records[2]['samples_per_s_per_gpu'] == 154321.0
    assert parse_open_clip_log('no training here') == []


def test_open_clip_arguments_match_the_setting():
    common = dict(batch=32, steps=10, workers=2, device='cuda', logs='/l', name='n')
    flip = open_clip_args('ViT-B-16', 's/{0..9}.tar', parse_setting('random-0.75'), precision='amp_fp16', **common)
    clip = open_clip_args('ViT-B-16', 's/{0..9}.tar', parse_setting('none'), precision='amp_bf16', **common)
    value = lambda args, flag: args[args.index(flag) + 1]
    assert value(flip, '--force-patch-dropout') == '0.75' and '--force-patch-dropout' not in clip
    assert value(flip, '--precision') == 'amp' and value(clip, '--precision') == 'amp_bf16'
    assert value(flip, '--train-num-samples') == '320' and value(flip, '--log-every-n-steps') == '1'
    assert '--dataset-resampled' in flip and value(flip, '--workers') == '2'
    for setting in ('cluster-0.5', 'gaussian-0.5', 'reclip-112', 'cluster-paper'):
        with pytest.raises(ValueError, match="no equivalent"): patch_dropout_of(parse_setting(setting))


# -- feeding ----------------------------------------------------------------------------------------------------------

def test_workers_needed_rounds_up():
    assert workers_needed(2.0, 256, 64.0) == 8 and workers_needed(2.0, 256, 63.0) == 9 and workers_needed(0.1, 1, 1000) == 1
    with pytest.raises(ValueError): workers_needed(1.0, 1, 0.0)
    assert math.isclose(assumed_steps_per_s(256, mfu=0.5) / assumed_steps_per_s(256, mfu=0.25), 2.0)


# -- targets ----------------------------------------------------------------------------------------------------------

def results(model='ViT-B-16', device='cuda:0', precision='amp_bf16', random_speed=1700.0, cluster_speed=1690.0,
            open_clip=(), feeding=None):
    rows = add_ratios([row('none', 41.1, 1000.0, memory=30000.0), row('random-0.5', 23.4, random_speed, memory=17000.0),
                       row('random-0.75', 14.8, 2600.0, memory=12000.0), row('cluster-0.5', 23.4, cluster_speed, memory=17000.0)],
                      peak_tflops=989.0)
    return dict(config=dict(model=model, device=device, precision=precision), settings=rows, open_clip=list(open_clip),
                feeding=feeding)


def test_targets_on_the_reference_gpu_run_are_judged():
    got = [t['status'] for t in check_targets(results())]
    assert got[:3] == ['met', 'met', 'met']                       # 1.70× ≥ 1.65×, 2.60× ≥ 2.5×, cluster 0.994 of random
    slow = [t['status'] for t in check_targets(results(random_speed=1600.0, cluster_speed=1500.0))]
    assert slow[:3] == ['not met', 'met', 'not met']              # 1.60×; cluster 0.9375 of random


def test_targets_off_the_reference_run_say_so():
    cpu = check_targets(results(model='tiny-vit-64', device='cpu', precision='fp32'))
    assert cpu[0]['status'] == cpu[1]['status'] == 'not measured here (no GPU)'
    assert '1.70×' in cpu[0]['measured'] and 'tiny-vit-64 on CPU' in cpu[0]['measured']
    other_gpu = check_targets(results(model='ViT-B-32'))
    assert other_gpu[0]['status'] == 'not measured here (needs ViT-B-16 in amp_bf16)'
    def versus(trainer, step):
        return [t['status'] for t in check_targets(results(open_clip=[dict(setting='none', trainer_ratio=trainer, step_ratio=step)]))
                if '(none, data' in t['target']]
    assert versus(0.9, 1.1) == ['not met', 'met'] and versus(0.98, 1.0) == ['tie (within 3%)', 'met']
    assert versus(None, 0.96) == ['n/a', 'not met']


# -- end to end -------------------------------------------------------------------------------------------------------

def test_run_bench_writes_the_results_json_and_plot(tmp_path, one_thread):
    result = run_bench('tiny-vit-32', batch=4, settings=['none', 'random-0.5', 'cluster-paper', 'reclip-112'], compare=(),
                       feed=False, steps=1, warmup=1, repeats=2, out=tmp_path / 'bench', threads=1, quiet=True)
    assert (tmp_path / 'bench.png').stat().st_size > 10_000
    saved = json.loads((tmp_path / 'bench.json').read_text())
    assert saved == json.loads(json.dumps(result)) and saved['schema'] == SCHEMA
    assert {'cpu', 'cores', 'torch', 'torch_threads', 'gpu', 'load_average', 'load_average_end'} <= set(saved['machine'])
    assert saved['config']['settings'] == ['none', 'random-0.5', 'cluster-paper', 'reclip-112'] and saved['config']['threads'] == 1
    assert {'data', 'settings'} <= set(saved['phases']) and saved['open_clip'] == [] and saved['feeding'] is None
    rows = {r['setting']: r for r in saved['settings']}
    assert rows['none']['speedup'] == 1.0 and rows['none']['ideal_speedup'] == 1.0
    assert rows['random-0.5']['tokens'] == 9 and rows['reclip-112']['image_size'] == 16 and rows['reclip-112']['tokens'] == 5
    assert 9 < rows['cluster-paper']['tokens'] <= 17                    # the paper budget keeps a content-dependent K
    for r in saved['settings']:
        assert len(r['step_s_repeats']) == len(r['plan_s_repeats']) == 2 and r['step_s'] == statistics.median(r['step_s_repeats'])
        assert math.isclose(r['samples_per_s'], 4 / r['step_s']) and r['mfu'] is None     # no CPU peak given
        assert r['peak_memory_mb'] is None or r['peak_memory_mb'] >= r['state_memory_mb']
    assert all({'target', 'measured', 'status'} == set(t) for t in saved['targets'])


def test_bench_cli_refuses_bad_options_before_any_work():
    with pytest.raises(SystemExit, match='unknown benchmark setting'): bench_cli(settings='none,nonsense-0.5')
    with pytest.raises(SystemExit, match='max_batch'): bench_cli(device='cpu', max_batch=True)
    with pytest.raises(SystemExit, match="no equivalent"): bench_cli(compare='cluster-0.5')


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
