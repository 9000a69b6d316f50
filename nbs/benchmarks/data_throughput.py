"""Data-pipeline throughput: cluster_glip's `train_loader` against open_clip's own `open_clip_train.data.get_wds_dataset`.

Both read the same synthetic img2dataset shards (rendered at 256 px) and produce the same thing: RandomResizedCrop to
224 px with scale (0.9, 1.0), bicubic, CLIP normalisation, open_clip tokens, batches of 64, one DataLoader worker each.
The number reported is decoded + augmented + tokenised samples per second *per worker*, after two warm-up batches; runs
alternate between the two pipelines (in fresh processes) and the best of each is kept, which tames the noise of a shared
machine. Writes `data_throughput.json` next to this script.

open_clip_train's pipeline breaks on webdataset 1.x (`KeyError: 'fname'`), so its side runs with webdataset 0.2.86
installed into a separate folder (`pip install --target /tmp/wds0286 --no-deps webdataset==0.2.86 braceexpand`, done
here when missing) and put first on its `PYTHONPATH`.

Usage: python nbs/benchmarks/data_throughput.py [--samples 800] [--batches 10] [--repeats 2]
"""
import argparse, json, os, platform, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WDS_0286 = Path('/tmp/wds0286')

OURS = r'''
import json, sys
from cluster_glip.compare import loader_throughput
shards, image_size, batch_size, n_batches, warmup = json.loads(sys.argv[1])
print(json.dumps(loader_throughput(shards, image_size=image_size, batch_size=batch_size, n_batches=n_batches,
                                   warmup=warmup, workers=1)))
'''

OPEN_CLIP = r'''
import argparse, json, sys, time
from importlib.metadata import version
import open_clip
from open_clip_train.data import get_wds_dataset
shards, image_size, batch_size, n_batches, warmup = json.loads(sys.argv[1])
args = argparse.Namespace(train_data=shards, val_data=None, dataset_resampled=True, train_data_upsampling_factors=None,
                          train_num_samples=(warmup + n_batches + 2) * batch_size, batch_size=batch_size, workers=1,
                          world_size=1, seed=0)
preprocess = open_clip.image_transform(image_size, is_train=True, aug_cfg=dict(scale=(0.9, 1.0)))
data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer('ViT-B-16'))
batches = iter(data.dataloader)
for _ in range(warmup): next(batches)
start, samples = time.perf_counter(), 0
for _ in range(n_batches): samples += len(next(batches)[0])
seconds = time.perf_counter() - start
print(json.dumps(dict(samples_per_s=samples / seconds, samples_per_s_per_worker=samples / seconds, workers=1,
                      batch_size=batch_size, image_size=image_size, batches=n_batches, seconds=seconds,
                      webdataset=version('webdataset'))))
'''


def run(code: str, job: list, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    out = subprocess.run([sys.executable, '-c', code, json.dumps(job)], env=env, capture_output=True, text=True)
    if out.returncode: raise RuntimeError(f'benchmark process failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), platform.processor()) \
        if Path('/proc/cpuinfo').exists() else platform.processor()
    import torch, open_clip, webdataset
    from importlib.metadata import version
    return dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, open_clip=version('open_clip_torch'), webdataset_ours=version('webdataset'),
                load_average_at_start=os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=800, help='synthetic samples to render (256 px)')
    parser.add_argument('--batches', type=int, default=10, help='timed batches of 64 per run')
    parser.add_argument('--repeats', type=int, default=2, help='runs per pipeline, alternating; the best is kept')
    opts = parser.parse_args()
    if not (WDS_0286 / 'webdataset').is_dir():
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--target', str(WDS_0286), '--no-deps',
                        'webdataset==0.2.86', 'braceexpand'], check=True)
    sys.path.insert(0, str(REPO))
    from cluster_glip.synthetic import SynthConfig, write_synthetic_shards
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shards = write_synthetic_shards(Path(tmp) / 'shards', opts.samples, cfg=SynthConfig(image_size=256),
                                        shard_size=100)['shards']
        print(f'rendered {opts.samples} samples at 256 px in {time.perf_counter() - start:.1f} s')
        job = [shards, 224, 64, opts.batches, 2]
        ours, theirs = [], []
        for r in range(opts.repeats):
            ours.append(run(OURS, job, str(REPO)))
            theirs.append(run(OPEN_CLIP, job, f'{WDS_0286}'))
            print(f"run {r}: ours {ours[-1]['samples_per_s_per_worker']:.0f} samples/s/worker, "
                  f"open_clip {theirs[-1]['samples_per_s_per_worker']:.0f}")
    best = lambda runs: max(r['samples_per_s_per_worker'] for r in runs)
    ratio = best(ours) / best(theirs)
    print(f'cluster_glip {best(ours):.0f} samples/s/worker, open_clip {best(theirs):.0f}: ratio ours/open_clip = {ratio:.2f}')
    result = dict(what='decoded + RandomResizedCrop(224, scale (0.9, 1.0), bicubic) + normalised + tokenised samples/s per '
                       'DataLoader worker, batch 64, 1 worker, synthetic 256 px JPEG shards; best of the alternating runs',
                  machine=dict(info, load_average_at_end=os.getloadavg()), samples=opts.samples, batches=opts.batches,
                  ours=ours, open_clip=theirs, ours_best=best(ours), open_clip_best=best(theirs), ratio_ours_over_open_clip=ratio)
    (HERE / 'data_throughput.json').write_text(json.dumps(result, indent=1) + '\n')
    print(f"wrote {HERE / 'data_throughput.json'}")


if __name__ == '__main__':
    main()
