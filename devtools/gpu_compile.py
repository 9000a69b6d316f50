"""How `compile_model` came about: torch.compile of the masked ViT-B/16 training step on a GPU: which way of compiling works with masking, and how fast.
Each case compiles a fresh model; prints step times and, on failure, the end of the traceback."""
import statistics, sys, time, traceback
import torch, torch._dynamo
from cluster_glip.masking import PatchMasker
from cluster_glip.model import create_model
from cluster_glip.step import make_optimizer, train_step

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
B, dev, prec = 256, torch.device('cuda'), 'amp_bf16'
images, texts = torch.randn(B, 3, 224, 224, device=dev), torch.randint(0, 49408, (B, 77), device=dev)

def timed(step, n=15, warmup=4):
    for _ in range(warmup): step()
    torch.cuda.synchronize(); times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n): step()
        torch.cuda.synchronize(); times.append((time.perf_counter() - t) / n)
    return 1e3 * statistics.median(times)

def fused_adamw(net):
    groups = [dict(params=g['params'], weight_decay=g['weight_decay']) for g in make_optimizer(net, lr=1e-5).param_groups]
    return torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=True)

CASES = {'first': [('eager fused-adamw', dict(), ['random-0.5', 'none']),
                   ('compile dynamic=False', dict(dynamic=False), ['random-0.5', 'none']),
                   ('compile default', dict(), ['random-0.5', 'none'])],
         'order': [('compile default', dict(), ['none', 'random-0.5']),
                   ('compile dynamic=False', dict(dynamic=False), ['none', 'random-0.5', 'cluster-paper'])]}
cases = CASES[sys.argv[1] if len(sys.argv) > 1 else 'first']
for name, kwargs, settings in cases:
    torch._dynamo.reset(); torch.manual_seed(0)
    net = create_model('ViT-B-16', device=dev).train()
    opt = fused_adamw(net)
    model = torch.compile(net, **kwargs) if name.startswith('compile') else net
    for setting in settings:
        strategy, ratio = (setting.split('-') + ['0'])[:2]
        net.masker = (PatchMasker('cluster', 0.5, patch_size=16, budget='paper', threshold=0.7, min_drop=0.3)
                      if setting == 'cluster-paper' else PatchMasker(strategy, float(ratio), patch_size=16))
        gen = torch.Generator(dev).manual_seed(0)
        t0 = time.time()
        try:
            ms = timed(lambda: train_step(model, [(images, texts)], opt, precision=prec, generator=gen, nan_policy='skip'))
            print(f'{name:24} {setting:12} {ms:7.1f} ms  {B / ms * 1e3:7.0f} samples/s  (case wall {time.time() - t0:.0f} s)', flush=True)
        except Exception:
            print(f'{name:24} {setting:12} FAILED'); print(''.join(traceback.format_exc().splitlines(True)[-25:]), flush=True)
    del net, opt, model; torch.cuda.empty_cache()
