"""The guide to the real job (`nbs/index.ipynb`, "Pre-training on real data", copied into README.md) runs as written.

Its shell blocks are read from the notebook, numbered by their first comment (`# 3. one GPU`), and run with bash, each in
a folder laid out like a clone (`data/cc12m` holding img2dataset-style shards, `nbs` the repository's notebooks). What
the test changes is the explicit mapping `SCALE` below: fewer shards, a tiny model and a few steps on the CPU (one more
config file on the command line: later files win), 2 processes instead of 8, the synthetic evaluation suite instead of
the paper's. `srun` and `scontrol` are stand-ins that start `SLURM_NTASKS` processes as SLURM would. Blocks that say
`(not run by the tests: ...)` need the internet or a cluster; they are checked for their content only.
"""
import json, os, re, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

from cluster_glip.synthetic import write_synthetic_bundle

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent                       # cluster_glip, torchrun, papermill of this environment
N_SHARDS, SHARD_SIZE = 8, 32
pytestmark = pytest.mark.slow

# The guide's paths and sizes → the test's. Each pair is replaced in every block it occurs in.
SMALL = '''model: tiny-vit-32
epochs: null
steps: {steps}
batch_size: 8
warmup: 1
workers: 0
device: cpu
precision: fp32
threads: 1
checkpoint_every: 2
log_every: 1
progress_bar: false
'''


def scale(block: str, small: Path, bundle: Path) -> str:
    "The guide's block with the test's sizes: the explicit mapping from the real job to a CPU check."
    mapping = {'{00000..01242}': '{00000..%05d}' % (N_SHARDS - 1),                      # 1243 shards → 8
               '--config cluster_cc12m_vitb16': f'--config cluster_cc12m_vitb16 {small}',  # + tiny model, steps, CPU
               '--nproc_per_node 8': '--nproc_per_node 2',                                 # 8 GPUs → 2 CPU processes
               '--set batch_size=128': '--set batch_size=8',                               # per-process batch
               '--suite cluster_paper --root ~/data/eval': f'--suite synthetic --root {bundle}'}
    for real, test in mapping.items(): block = block.replace(real, test)
    return block


def guide_text() -> list[str]:
    "The guide's markdown cells in index.ipynb: from its H2 heading to the next H2."
    cells = [''.join(c['source']) for c in json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())['cells']
             if c['cell_type'] == 'markdown']
    start = next(i for i, c in enumerate(cells) if c.startswith('## Pre-training on real data'))
    end = next((i for i in range(start + 1, len(cells)) if cells[i].startswith('## ')), len(cells))
    return cells[start:end]


def guide_blocks() -> dict[int, str]:
    "Each shell block of the guide by its number."
    blocks = {}
    for code in re.findall(r'```(?:sh|bash)\n(.*?)```', '\n\n'.join(guide_text()), re.S):
        number = int(re.search(r'^# (\d+)\. ', code, re.M).group(1))
        assert number not in blocks, f'two blocks numbered {number}'
        blocks[number] = code
    return blocks


BLOCKS = guide_blocks()
UNTESTED = {n for n, code in BLOCKS.items() if '(not run by the tests:' in re.search(r'^# \d+\. .*$', code, re.M).group(0)}


def test_the_guide_is_numbered_and_the_readme_carries_it_verbatim():
    assert sorted(BLOCKS) == list(range(1, 12)) and UNTESTED == {1, 7, 10}
    readme = (ROOT / 'README.md').read_text()
    for cell in guide_text(): assert cell in readme, f'README.md is out of step with index.ipynb at:\n{cell[:200]}'
    assert ('img2dataset --url_list cc12m.tsv --input_format tsv --url_col url --caption_col caption --output_format '
            'webdataset --output_folder cc12m --processes_count 16 --thread_count 64 --image_size 256 --resize_mode '
            'keep_ratio --enable_wandb False') in BLOCKS[1]
    assert 'clip-benchmark/wds_$name' in BLOCKS[7] and '--gpus all' in BLOCKS[10]
    assert BLOCKS[10].replace('--gpus all', '--dry_run').split('\n', 1)[1] == BLOCKS[9].split('\n', 1)[1]


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    "img2dataset-style shards (with `_stats.json`), the synthetic evaluation sets, stand-ins for srun and scontrol."
    top = tmp_path_factory.mktemp('guide')
    bundle = write_synthetic_bundle(top / 'bundle', n_train=N_SHARDS * SHARD_SIZE, n_zeroshot=48, n_retrieval=16,
                                    n_sugarcrepe=8, shard_size=SHARD_SIZE, processes=1, image_size=32)
    shards = Path(bundle['train']['shards'].split('{')[0])
    for tar in shards.glob('*.tar'):                      # what img2dataset writes beside each shard
        (shards / f'{tar.stem}_stats.json').write_text(json.dumps({'count': SHARD_SIZE, 'successes': SHARD_SIZE}))
    fake = top / 'slurm_bin'; fake.mkdir()
    (fake / 'srun').write_text('#!/bin/bash\n# SLURM_NTASKS copies of the command, each told its rank as srun does\n'
                               'pids=()\nfor ((i = 0; i < SLURM_NTASKS; i++)); do\n'
                               '  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!)\ndone\n'
                               'status=0; for p in "${pids[@]}"; do wait $p || status=$?; done; exit $status\n')
    (fake / 'scontrol').write_text('#!/bin/bash\necho localhost\n')
    for name in ('srun', 'scontrol'): (fake / name).chmod(0o755)
    for steps in (2, 4): (top / f'small_{steps}.yaml').write_text(SMALL.format(steps=steps))
    # The test's preemption is a first run of 2 steps; its resume runs the same config to 4 steps, so the resume check
    # (which refuses a changed `steps`) is told that this one change is deliberate. A real requeue changes nothing.
    with open(top / 'small_4.yaml', 'a') as f: f.write('resume_allow: [steps]\n')
    return {'top': top, 'shards': shards, 'bundle': Path(bundle['root']), 'fake': fake}


def clone(world, name: str) -> Path:
    "A folder laid out like the root of a clone: `data/cc12m` (the shards) and `nbs` (the notebooks)."
    folder = world['top'] / name
    if not folder.exists():
        (folder / 'data').mkdir(parents=True)
        (folder / 'data' / 'cc12m').symlink_to(world['shards'])
        (folder / 'nbs').symlink_to(ROOT / 'nbs')
    return folder


def run(world, number: int, folder: Path, steps: int = 2, env: dict | None = None) -> str:
    "Guide block `number`, scaled, run with bash in `folder`; its output."
    assert number not in UNTESTED
    script = scale(BLOCKS[number], world['top'] / f'small_{steps}.yaml', world['bundle'])
    environment = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                                      'MASTER_PORT')}
    environment.update(PATH=os.pathsep.join([str(BIN), str(world['fake']), environment['PATH']]), OMP_NUM_THREADS='1',
                       PYTHONPATH=os.pathsep.join([str(ROOT), environment.get('PYTHONPATH', '')]), **(env or {}))
    result = subprocess.run(['bash', '-e', '-o', 'pipefail', '-c', script], cwd=folder, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f'guide block {number} failed:\n{script}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}'
    return result.stdout


def checkpoints(folder: Path) -> list[dict]:
    return [torch.load(p, weights_only=True, map_location='cpu')
            for p in sorted((folder / 'runs' / 'cluster_cc12m_vitb16' / 'checkpoints').glob('step_*.pt'))]


def train_steps(folder: Path) -> list[int]:
    lines = (folder / 'runs' / 'cluster_cc12m_vitb16' / 'metrics.jsonl').read_text().splitlines()
    return [r['step'] for r in map(json.loads, lines) if r.get('event') == 'train']


def test_count_one_gpu_and_evaluate(world):
    folder = clone(world, 'one_gpu')
    assert run(world, 2, folder).strip() == str(N_SHARDS * SHARD_SIZE)
    run(world, 3, folder)
    last = checkpoints(folder)[-1]
    assert (last['step'], last['world_size'], last['model_name']) == (2, 1, 'tiny-vit-32')
    assert last['config']['masking']['strategy'] == 'cluster'              # the preset's masking, on the tiny model
    printed = run(world, 8, folder)                                       # the model comes from the checkpoint
    rows = [json.loads(l) for l in (folder / 'runs' / 'cluster_cc12m_vitb16' / 'eval.jsonl').read_text().splitlines()]
    assert [r['status'] for r in rows] == ['ok'] * 4 and 'zero-shot mean top-1 over 1 sets' in printed
    assert rows[0]['checkpoint'].endswith('step_00000002.pt')


def test_torchrun_on_two_processes_then_resume(world):
    folder = clone(world, 'torchrun')
    run(world, 4, folder, steps=2)                                        # a run that stops after 2 of its steps
    assert [(c['step'], c['world_size']) for c in checkpoints(folder)] == [(2, 2)]
    run(world, 6, folder, steps=4)                                        # resumed: steps 3 and 4 only
    assert [(c['step'], c['world_size']) for c in checkpoints(folder)] == [(2, 2), (4, 2)]
    assert train_steps(folder) == [1, 2, 3, 4]


def test_the_slurm_script_with_a_stand_in_srun_and_its_requeue(world):
    folder = clone(world, 'slurm')
    port = next(p for p in range(20000 + os.getpid() % 9000, 30000) if _free(p))    # MASTER_PORT = 20000 + job id % 10000
    slurm = {'SLURM_NTASKS': '2', 'SLURM_JOB_NODELIST': 'localhost', 'SLURM_JOB_ID': str(port - 20000)}
    run(world, 5, folder, steps=2, env=slurm)
    run(world, 5, folder, steps=4, env=slurm)                             # the requeued job resumes
    assert [(c['step'], c['world_size']) for c in checkpoints(folder)] == [(2, 2), (4, 2)]
    assert train_steps(folder) == [1, 2, 3, 4]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try: s.bind(('127.0.0.1', port)); return True
        except OSError: return False


def test_the_sweep_dry_run_and_the_results_page(world):
    folder = clone(world, 'sweep')
    printed = run(world, 9, folder)
    assert printed.count("{'point': ") == 11 and "'point': 'cluster_rgb_0.3'" in printed
    assert not (folder / 'runs' / 'strategy' / 'clip').exists()           # a dry run trains nothing
    run(world, 11, folder)
    assert (folder / 'runs' / 'results' / 'results.ipynb').exists()
