"""What the run-level tests share: the environment that makes a subprocess run the code under test, a tiny CPU training
run's fields, and `--set` arguments for them (pytest puts `tests/` on the path, so test files import this module)."""
import json, os
from pathlib import Path

import cluster_glip

PACKAGE_ROOT = Path(cluster_glip.__file__).resolve().parents[1]   # subprocesses run the code this process tests
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(PACKAGE_ROOT), os.environ.get('PYTHONPATH', '')]),
       'OMP_NUM_THREADS': '1'}

TINY_RUN = {'model': 'tiny-vit-32', 'batch_size': 16, 'steps': 8, 'warmup': 2, 'lr': 1e-3, 'workers': 0, 'log_every': 1,
            'progress_bar': False, 'device': 'cpu', 'tune_steps': 0, 'threads': 1,
            'masking': {'strategy': 'cluster', 'ratio': 0.5}}


def run_fields(shards: str, out: Path, **fields) -> dict:
    "The fields of a tiny CPU run of `tiny-vit-32` on `shards` into `out`, every step logged; `fields` on top."
    return {**TINY_RUN, 'train_data': shards, 'output_dir': str(out), **fields}


def overrides(values: dict) -> list[str]:
    "`--set field=value` arguments for `values` (each value as JSON, which YAML reads back)."
    return [arg for key, value in values.items() for arg in ('--set', f'{key}={json.dumps(value)}')]
