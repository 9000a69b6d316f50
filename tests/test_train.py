"""Training end to end: the loss (InfoNCE and SigLIP) equals open_clip's across processes, 2 processes train like 1
(also across RECLIP's and progressive resolution's switches), a SIGKILLed run resumes exactly (also inside a
progressive size), the loss falls for every masking strategy and for each loss on the synthetic data (and the
checkpoint loads in stock open_clip), and a compiled model trains like the eager one.
(A run with calibration, a tuning phase, an evaluation hook and a resume inside the tuning phase is an example in
`nbs/06_train.ipynb`, section 7.)"""
import math, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import open_clip

from cluster_glip.synthetic import write_synthetic_shards
from cluster_glip.masking import STRATEGIES
from cluster_glip.config import load_config
from cluster_glip.step import LOSS_MODEL_ARGS, batch_loss, contrastive_loss
from cluster_glip.rundir import read_metrics
from cluster_glip.train import train

from tiny_runs import ENV, overrides


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> str:
    "A small synthetic training set: 8 shards of 128 image-caption pairs."
    return write_synthetic_shards(tmp_path_factory.mktemp('synthetic') / 'train', 1024, shard_size=128, processes=2)['shards']


def tiny_fields(shards: str, out: Path, **fields) -> dict:
    "A tiny, fast run of the tiny preset: 32 px model, small batches, every step logged."
    return {'model': 'tiny-vit-32', 'train_data': shards, 'output_dir': str(out), 'batch_size': 16, 'steps': 6,
            'warmup': 2, 'lr': 1e-3, 'workers': 0, 'log_every': 1, 'checkpoint_every': 1000, 'progress_bar': False,
            'device': 'cpu', 'tune_steps': 0, 'masking': {'strategy': 'cluster', 'ratio': 0.5}, **fields}


def losses(out: Path) -> dict[int, float]:
    return {r['step']: r['loss'] for r in read_metrics(Path(out) / 'metrics.jsonl')}


# -- the loss across processes ----------------------------------------------------------------------------------------

def _loss_worker(rank: int, world: int, port: int, out: str):
    from open_clip.loss import ClipLoss, SigLipLoss
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(8, 16, generator=g), dim=-1) for _ in range(2))  # the global batch [8, 16]
    b = len(image) // world

    def run(loss_fn, scale: float = math.log(1 / 0.07), bias: float | None = None):
        i = image[rank * b:(rank + 1) * b].clone().requires_grad_()
        t = text[rank * b:(rank + 1) * b].clone().requires_grad_()
        s = torch.tensor(scale, requires_grad=True)
        extra = [] if bias is None else [torch.tensor(bias, requires_grad=True)]
        loss = loss_fn(i, t, s.exp(), *extra)
        loss.backward()
        return [loss.detach(), i.grad, t.grad, s.grad, *(x.grad for x in extra)]

    siglip = dict(scale=math.log(10), bias=-10.0)
    results = {'ours': run(contrastive_loss),
               'theirs': run(ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)),
               'ours_siglip': run(lambda *a: batch_loss('siglip', *a), **siglip),
               'theirs_siglip': run(SigLipLoss(rank=rank, world_size=world), **siglip)}
    torch.save({**results, 'image': image, 'text': text}, f'{out}/{rank}.pt')
    dist.destroy_process_group()


def test_loss_and_gradients_match_open_clip_across_two_gloo_processes(tmp_path):
    mp.spawn(_loss_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'{r}.pt') for r in range(2)]
    for r in ranks:  # value and gradients equal open_clip's ClipLoss(local_loss=True, gather_with_grad=True)
        for ours, theirs in zip(r['ours'], r['theirs']): assert torch.allclose(ours, theirs, atol=1e-7)
    # and the two local losses make up the global batch's loss: their mean is the 1-process loss, and each process's
    # feature gradients are (world size ×) the global loss's, which DDP's gradient average turns back into the global one
    image = ranks[0]['image'].clone().requires_grad_()
    text = ranks[0]['text'].clone().requires_grad_()
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    whole = contrastive_loss(image, text, scale.exp())
    whole.backward()
    assert torch.allclose((ranks[0]['ours'][0] + ranks[1]['ours'][0]) / 2, whole, atol=1e-6)
    assert torch.allclose(torch.cat([r['ours'][1] for r in ranks]) / 2, image.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r['ours'][2] for r in ranks]) / 2, text.grad, atol=1e-6)
    assert torch.allclose((ranks[0]['ours'][3] + ranks[1]['ours'][3]) / 2, scale.grad, atol=1e-6)


def test_siglip_loss_matches_open_clip_and_the_one_process_loss_across_two_gloo_processes(tmp_path):
    "SigLIP (bidir exchange of text features between the ranks): open_clip's values, and the ranks make up the global batch."
    mp.spawn(_loss_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f'{r}.pt') for r in range(2)]
    for r in ranks:
        for ours, theirs in zip(r['ours_siglip'], r['theirs_siglip']): assert torch.equal(ours, theirs)
    # each rank scores its images against every rank's texts, / its local batch: the ranks' mean is the global loss
    # (sum over all pairs / global batch), and the feature gradients are (world size ×) the global loss's
    image, text = (ranks[0][k].clone().requires_grad_() for k in ('image', 'text'))
    scale, bias = torch.tensor(math.log(10), requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    whole = batch_loss('siglip', image, text, scale.exp(), bias)
    whole.backward()
    parts = [r['ours_siglip'] for r in ranks]
    assert torch.allclose((parts[0][0] + parts[1][0]) / 2, whole, atol=1e-6)
    assert torch.allclose(torch.cat([p[1] for p in parts]) / 2, image.grad, atol=1e-6)
    assert torch.allclose(torch.cat([p[2] for p in parts]) / 2, text.grad, atol=1e-6)
    for k, whole_grad in ((3, scale.grad), (4, bias.grad)): assert torch.allclose((parts[0][k] + parts[1][k]) / 2, whole_grad, atol=1e-6)


# -- 2 processes train like 1 -----------------------------------------------------------------------------------------

def two_processes_train_like_one(common: dict, tmp_path: Path):
    """Run `common` as 2 processes × 1 micro-batch (torchrun, gloo, DDP; into tmp_path/two) and as 1 process × 2
    micro-batches (into tmp_path/one); both succeed and log the same losses at steps 1-5 up to float rounding."""
    two = {**common, 'output_dir': str(tmp_path / 'two'), 'workers': 1}
    one = {**common, 'output_dir': str(tmp_path / 'one'), 'workers': 2, 'accum_steps': 2}
    run = lambda launcher, fields: subprocess.run([*launcher, '-m', 'cluster_glip.train', '--config', 'tiny', *overrides(fields)],
                                                  env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    for result in (run(torchrun, two), run([sys.executable], one)): assert result.returncode == 0, result.stderr[-3000:]
    two_losses, one_losses = losses(tmp_path / 'two'), losses(tmp_path / 'one')
    assert sorted(two_losses) == sorted(one_losses) == [1, 2, 3, 4, 5]
    for step in two_losses: assert math.isclose(two_losses[step], one_losses[step], rel_tol=1e-4), (step, two_losses, one_losses)


@pytest.mark.parametrize('loss', ['infonce', 'siglip'])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(shards, tmp_path, loss):
    """2 processes × 1 micro-batch of 16 (torchrun, gloo, DDP) against 1 process × 2 micro-batches of 16 (gradient
    accumulation): the same global batches (reader k of the data is rank k there, worker k here), the same cluster
    masks (seeded per step and global micro-batch), so the same losses and weights up to float rounding. For SigLIP the
    text features travel between the ranks (open_clip's bidir exchange) and the logit bias trains too."""
    common = tiny_fields(shards, tmp_path, steps=5, checkpoint_every=5, loss=loss)
    two_processes_train_like_one(common, tmp_path)
    weights = [torch.load(tmp_path / name / 'checkpoints' / 'step_00000005.pt', weights_only=True)['state_dict'] for name in ('two', 'one')]
    for key in weights[0]: assert torch.allclose(weights[0][key], weights[1][key], atol=1e-4, rtol=1e-3), key


def test_reclip_in_two_gloo_processes_matches_one_process_across_the_resolution_switch(shards, tmp_path):
    """RECLIP under DDP: 3 steps at 16 px (a 1 + 2·2 positional embedding), then 2 tuning steps at 32 px (1 + 4·4, the
    model wrapped again in DDP over the resized embedding, a fresh AdamW): 2 processes train like 1 with accumulation."""
    common = tiny_fields(shards, tmp_path, steps=3, tune_steps=2, checkpoint_every=5, image_size=16,
                         masking={'strategy': 'none'})
    two_processes_train_like_one(common, tmp_path)
    weights = [torch.load(tmp_path / name / 'checkpoints' / f'step_0000000{s}.pt', weights_only=True)['state_dict']
               for name in ('two', 'one') for s in (3, 5)]
    assert [tuple(w['visual.positional_embedding'].shape) for w in weights] == [(5, 64), (17, 64)] * 2
    for key in weights[1]: assert torch.allclose(weights[1][key], weights[3][key], atol=1e-4, rtol=1e-3), key


def test_progressive_resolution_in_two_gloo_processes_matches_one_process_across_both_switches(shards, tmp_path):
    """Progressive resolution under DDP: 16 px (1 + 2·2) for steps 0-1, 24 px (1 + 3·3) for 2-3, 32 px (1 + 4·4) for 4,
    each switch inside the main phase (the model wrapped again in DDP, the loader rebuilt at its position): 2 processes
    train like 1 with accumulation."""
    common = tiny_fields(shards, tmp_path, steps=5, checkpoint_every=2, keep_last=5, masking={'strategy': 'none'},
                         resolution_schedule=[[0.0, 16], [0.4, 24], [0.8, 32]])
    two_processes_train_like_one(common, tmp_path)
    for name in ('two', 'one'):
        records = read_metrics(tmp_path / name / 'metrics.jsonl')
        assert [r['image_size'] for r in records] == [16, 16, 24, 24, 32]
    weights = [torch.load(tmp_path / name / 'checkpoints' / f'step_0000000{s}.pt', weights_only=True)['state_dict']
               for name in ('two', 'one') for s in (2, 4, 5)]
    assert [tuple(w['visual.positional_embedding'].shape) for w in weights] == [(5, 64), (10, 64), (17, 64)] * 2
    for key in weights[2]: assert torch.allclose(weights[2][key], weights[5][key], atol=1e-4, rtol=1e-3), key


# -- exact resume after SIGKILL ---------------------------------------------------------------------------------------

KILL_CASES = {'fixed': {},   # progressive: 32 px for steps 0-2, 48 px for 3-8, 64 px for 9-11; the step-4 checkpoint
               'progressive': {'resolution_schedule': [[0.0, 32], [0.25, 48], [0.75, 64]]}}   # is inside the 48 px size


@pytest.mark.parametrize('case', KILL_CASES)
def test_a_run_killed_with_sigkill_resumes_with_bitwise_the_same_losses(shards, tmp_path, case):
    fields = tiny_fields(shards, tmp_path, model='tiny-vit-64', batch_size=24, steps=12, checkpoint_every=4, workers=1,
                         **KILL_CASES[case])
    command = lambda out, **extra: [sys.executable, '-m', 'cluster_glip.train', '--config', 'tiny',
                                    *overrides({**fields, 'output_dir': str(out), **extra})]
    whole = subprocess.run(command(tmp_path / 'whole'), env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / 'killed'
    process = subprocess.Popen(command(killed), env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)  # its own process group: the kill takes its data workers too
    deadline = time.time() + 600
    while not (killed / 'checkpoints' / 'step_00000004.pt').exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    stopped_at = max(losses(killed))
    assert stopped_at < 12, 'the run finished before it was killed: make the test run longer'

    resumed = subprocess.run(command(killed, resume='latest'), env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference, after_resume = losses(tmp_path / 'whole'), losses(killed)
    assert sorted(after_resume) == list(range(1, 13))  # the killed run's records past its checkpoint were dropped
    assert after_resume == reference  # bitwise: the same floats, every step
    if case == 'progressive':
        sizes = {r['step']: r['image_size'] for r in read_metrics(killed / 'metrics.jsonl')}
        assert sizes == {s: 32 if s <= 3 else 48 if s <= 9 else 64 for s in range(1, 13)}   # record of step s: step s - 1


# -- the loss falls for every masking strategy ------------------------------------------------------------------------

STRATEGY_CASES = {name: {} for name in sorted(STRATEGIES)} | {
    'cluster-fused': {'features': 'fused'},  # the embedding variant: reads the patch tokens
    'cluster-paper': {'threshold': 'calibrated', 'budget': 'paper', 'min_drop': 0.3}}  # calibration + padding mask


@pytest.mark.parametrize('case', STRATEGY_CASES)
def test_loss_falls_on_synthetic_data_for_every_masking_strategy(shards, tmp_path, case, one_thread):
    "40 steps of 32 pairs from one synthetic shard: the loss ends clearly below chance (ln 32) and below its start."
    masking = {'strategy': case.split('-')[0], 'ratio': 0.0 if case == 'none' else 0.5, **STRATEGY_CASES[case]}
    one_shard = shards.replace('{00000..00007}', '00000')  # 128 pairs: a few passes over them in 40 steps
    cfg = load_config('tiny', **tiny_fields(one_shard, tmp_path, masking=masking, batch_size=32, steps=40, warmup=0, lr=5e-4))
    summary = train(cfg)
    loss = [r['loss'] for r in read_metrics(tmp_path / 'metrics.jsonl')]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < min(first - 0.3, math.log(32) - 0.2), f'{case}: loss {first:.3f} -> {last:.3f} (chance {math.log(32):.3f})'
    if case == 'cluster-paper': assert summary['mask_threshold'] is not None


def test_shorter_texts_train_and_the_checkpoint_loads_in_stock_open_clip(shards, tmp_path, one_thread):
    """CLIPA: 8-token texts, random reduction (most synthetic captions are longer than 6 word pieces): the loss falls, and
    stock open_clip built with 8 text positions loads the checkpoint; evaluation builds and tokenises at 8 too."""
    import open_clip
    from cluster_glip.evaluate import load_model, model_tokenizer
    from cluster_glip.rundir import load_checkpoint
    one_shard = shards.replace('{00000..00007}', '00000')
    cfg = load_config('tiny', **tiny_fields(one_shard, tmp_path, masking={'strategy': 'random', 'ratio': 0.5}, batch_size=32,
                                            steps=40, warmup=0, lr=5e-4, text_length=8, text_reduction='random'))
    summary = train(cfg)
    loss = [r['loss'] for r in read_metrics(tmp_path / 'metrics.jsonl')]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < min(first - 0.3, math.log(32) - 0.2), f'loss {first:.3f} -> {last:.3f} (chance {math.log(32):.3f})'
    saved = load_checkpoint(summary['checkpoint'])['state_dict']
    assert saved['positional_embedding'].shape == (8, 64)
    text_cfg = dict(open_clip.get_model_config('tiny-vit-32')['text_cfg'], context_length=8)
    stock = open_clip.create_model('tiny-vit-32', pretrained=summary['checkpoint'], text_cfg=text_cfg).eval()
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in saved.items())
    evaluated = load_model(None, summary['checkpoint'], device='cpu')
    texts = model_tokenizer(evaluated, 'tiny-vit-32')(['a large dotted orange triangle on a light background'])   # [1, 8]
    assert texts.shape == (1, 8) and torch.equal(texts, open_clip.tokenize(['a large dotted orange triangle on a light background'], 8))
    with torch.no_grad(): assert torch.equal(evaluated.encode_text(texts), stock.encode_text(texts))


@pytest.mark.parametrize('loss', ['infonce', 'siglip'])
def test_a_run_with_each_loss_trains_and_its_checkpoint_loads_in_stock_open_clip(shards, tmp_path, loss, one_thread):
    """40 steps of 32 pairs from one synthetic shard with random masking: the loss falls; the SigLIP run logs its logit
    bias; stock open_clip, built as it builds SigLIP models (`init_logit_bias`), loads the checkpoint's weights."""
    one_shard = shards.replace('{00000..00007}', '00000')
    cfg = load_config('tiny', **tiny_fields(one_shard, tmp_path, loss=loss, masking={'strategy': 'random', 'ratio': 0.5},
                                            batch_size=32, steps=40, warmup=0, lr=5e-4))
    summary = train(cfg)
    records = read_metrics(tmp_path / 'metrics.jsonl')
    first, last = (sum(r['loss'] for r in part) / 5 for part in (records[:5], records[-5:]))
    assert last < first - 0.3, f'{loss}: loss {first:.3f} -> {last:.3f}'
    assert all(('logit_bias' in r) == (loss == 'siglip') for r in records)
    if loss == 'siglip': assert records[-1]['logit_bias'] != -10.0
    stock = open_clip.create_model('tiny-vit-32', pretrained=summary['checkpoint'], **LOSS_MODEL_ARGS[loss])
    trained = torch.load(summary['checkpoint'], weights_only=True)['state_dict']
    assert set(stock.state_dict()) == set(trained) and ('logit_bias' in trained) == (loss == 'siglip')
    assert all(torch.equal(v, trained[k]) for k, v in stock.state_dict().items())
    from cluster_glip.evaluate import load_model   # `cluster_glip eval` builds the model the checkpoint's loss trained
    for masking in (None, False):                  # with its masker (ours), without (stock open_clip)
        evaluated = load_model(checkpoint=summary['checkpoint'], device='cpu', masking=masking)
        assert all(torch.equal(v, trained[k]) for k, v in evaluated.state_dict().items()), masking


# -- torch.compile ----------------------------------------------------------------------------------------------------

def test_a_compiled_model_trains_like_the_eager_one(one_thread):
    "train_step through torch.compile (inductor on CPU): the same losses as eager, masks and all."
    from cluster_glip.masking import PatchMasker
    from cluster_glip.model import create_model
    from cluster_glip.step import make_optimizer, train_step
    torch.manual_seed(0)
    images, texts = torch.randn(8, 3, 32, 32), torch.randint(1, 49408, (8, 77))
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model('tiny-vit-32', masker=PatchMasker('cluster', 0.5, patch_size=8))
        step_model = torch.compile(model) if compiled else model
        optimizer = make_optimizer(model, 1e-3)
        losses[compiled] = [train_step(step_model, [(images, texts)], optimizer, generator=torch.Generator().manual_seed(s))['loss'].item()
                            for s in range(3)]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(losses[False], losses[True])), losses
