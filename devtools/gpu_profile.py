"""Where a ViT-B/16 bf16 training step spends its time on a GPU: eager vs fused AdamW vs torch.compile, for the unmasked
and masked settings, plus the top CUDA kernels of one masked eager step. Prints a table; writes JSON to argv[1]."""
import json, statistics, sys, time
import torch
from cluster_glip.masking import PatchMasker
from cluster_glip.model import compile_model, create_model
from cluster_glip.step import make_optimizer, make_scaler, train_step

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
B, dev, prec = 256, torch.device('cuda'), 'amp_bf16'
images, texts = torch.randn(B, 3, 224, 224, device=dev), torch.randint(0, 49408, (B, 77), device=dev)
results, started = [], time.time()

def adamw(net, fused):
    groups = [dict(params=g['params'], weight_decay=g['weight_decay']) for g in make_optimizer(net, lr=1e-5).param_groups]
    return torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6, fused=fused)

def timed(step, n=15, warmup=5):
    for _ in range(warmup): step()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n): step()
        torch.cuda.synchronize(); times.append((time.perf_counter() - t) / n)
    return statistics.median(times)

for variant in ('eager', 'fused', 'compiled+fused'):
    torch.manual_seed(0)
    net = create_model('ViT-B-16', device=dev).train()
    opt = make_optimizer(net, lr=1e-5)   # fused on a GPU; 'eager' rebuilds it unfused for the comparison
    if variant == 'eager': opt = adamw(net, fused=False)
    model = compile_model(net) if variant.startswith('compiled') else net
    for setting, masker in (('none', None), ('random-0.5', PatchMasker('random', 0.5, patch_size=16)),
                            ('random-0.75', PatchMasker('random', 0.75, patch_size=16))):
        if time.time() - started > 420: print('out of time'); break
        net.masker = masker or PatchMasker('none', 0.0, patch_size=16)
        gen = torch.Generator(dev).manual_seed(0)
        step = lambda: train_step(model, [(images, texts)], opt, precision=prec, generator=gen, nan_policy='skip')
        t0 = time.time()
        try: s = timed(step)
        except Exception as e: print(variant, setting, 'failed:', repr(e)[:300]); continue
        results.append(dict(variant=variant, setting=setting, step_ms=1e3 * s, samples_per_s=B / s, wall_s=time.time() - t0))
        print(results[-1], flush=True)
    del net, opt, model; torch.cuda.empty_cache()

base = {r['variant']: r['step_ms'] for r in results if r['setting'] == 'none'}
for r in results: r['speedup_vs_same_variant_none'] = base.get(r['variant'], float('nan')) / r['step_ms']
print(f"{'variant':16} {'setting':12} {'step ms':>8} {'samples/s':>10} {'speed-up':>8}")
for r in results: print(f"{r['variant']:16} {r['setting']:12} {r['step_ms']:8.1f} {r['samples_per_s']:10.0f} {r['speedup_vs_same_variant_none']:8.2f}")

# the kernels of one masked eager step (fused AdamW)
net = create_model('ViT-B-16', device=dev, masker=PatchMasker('random', 0.5, patch_size=16)).train()
opt = make_optimizer(net, lr=1e-5)
gen = torch.Generator(dev).manual_seed(0)
step = lambda: train_step(net, [(images, texts)], opt, precision=prec, generator=gen, nan_policy='skip')
for _ in range(3): step()
torch.cuda.synchronize()
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(3): step()
    torch.cuda.synchronize()
table = prof.key_averages().table(sort_by='self_cuda_time_total', row_limit=25, max_name_column_width=70)
print(table)
json.dump(dict(results=results, kernels=table), open(sys.argv[1], 'w'), indent=1)
