"""A loader worker's CPU seconds per training sample, crops resized in the worker (Pillow) or on the device.

Writes `loader_cpu.json` next to this script: 2 000 img2dataset-style samples cut from real photographs (256 px, white
border, JPEG q95), both paths alternating in one process, the median of each, the stages timed apart, the device's
share, and loader workers per GPU for the H100 step rates in `bench_gpu_vitb16_compiled.json`
(`cluster_glip.feed.feed_benchmark`). Run it alone on an idle machine: other work on the cores makes the numbers noise.

Usage: python nbs/benchmarks/loader_cpu.py [--samples 2000] [--repeats 5] [--device cpu|cuda] [--out PATH]
"""
import argparse, json, sys, tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from cluster_glip.feed import feed_benchmark, gpu_step_rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=2000)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--device', default='cpu', help="where the device's share (resize + normalise) is timed")
    parser.add_argument('--out', default=str(HERE / 'loader_cpu.json'))
    opts = parser.parse_args()
    rates = gpu_step_rates(HERE / 'bench_gpu_vitb16_compiled.json')
    with tempfile.TemporaryDirectory() as work:
        result = feed_benchmark(work, n=opts.samples, repeats=opts.repeats, gpu_rates=rates, device=opts.device)
    result['gpu_rates_from'] = 'bench_gpu_vitb16_compiled.json (H100, ViT-B/16, batch 256, bf16, compiled)'
    Path(opts.out).write_text(json.dumps(result, indent=1) + '\n')
    m = result['median']
    print(f"CPU per sample: loader {1e3 * m['loader']:.3f} ms, device {1e3 * m['device']:.3f} ms "
          f"-> ratio {result['ratio_device_over_loader']:.2f}; wrote {opts.out}")


if __name__ == '__main__':
    main()
