"""`make notebooks`: execute every notebook and keep its outputs, so the committed notebooks (and the docs built from them)
show the numbers and figures under the examples.

Library notebooks run as `nbdev_test` runs them (nbdev's `CaptureShell`, in the notebook's folder, cells flagged with a
test flag of settings.ini or `eval: false` left out, unless `--flags` names them); experiment notebooks run from the
repository root with the parameters below injected after their `parameters` cell, as papermill does (a tiny CPU run
where they train). Figures are PNG at 80 dpi; the size budget is checked by tests/test_notebooks.py.

    python devtools/execute_nbs.py                       # every notebook, in place
    python devtools/execute_nbs.py nbs/01_model.ipynb --out /tmp/look   # a copy, to look at
"""
import argparse, os, re, shutil, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
# experiment notebook -> its parameters (papermill's names); paths are relative to the repository root
# (each writes under runs/notebooks/<name>/, emptied first: a leftover run would be resumed, not trained)
OUT = 'runs/notebooks'


def _pretrain_parameters():
    parameters = __import__('yaml').safe_load((NBS / 'experiments/params/tiny.yaml').read_text())
    parameters['fields']['output_dir'] = f'{OUT}/pretrain'
    return parameters


EXPERIMENT_PARAMETERS = {
    'pretrain.ipynb': _pretrain_parameters,
    'mask_gallery.ipynb': lambda: {'out_dir': f'{OUT}/mask_gallery'},
    'results.ipynb': lambda: {'runs_root': 'nbs/experiments/results_data', 'out_dir': f'{OUT}/results'},
    'textured_scenes.ipynb': lambda: {'results_dir': 'nbs/experiments/results_data/textured_scenes', 'out_dir': f'{OUT}/textured_scenes'},
}
PNG_BUDGET = 120_000   # bytes per figure before it is stored with a palette
DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+:?)\s*(.*)$', re.M)


def all_notebooks() -> list[Path]:
    found = sorted(NBS.glob('*.ipynb')) + sorted((NBS / 'experiments').glob('*.ipynb'))
    return [p for p in found if not p.name.startswith(('_', '.'))]


def skipped(cell, flags: set) -> bool:
    "Whether `nbdev_test` would leave this cell out (not code, `nbdev_export()`, `eval: false`, or a flag not asked for)."
    if cell.cell_type != 'code' or 'nbdev_export' + '(' in cell.source: return True
    directives = dict(DIRECTIVE.findall(cell.source))
    if directives.get('eval:', '').strip().lower() == 'false': return True
    return bool((set(directives) & TEST_FLAGS) - flags)


def injected_cell(parameters: dict):
    from execnb.nbio import mk_cell
    lines = ['# Parameters (injected by devtools/execute_nbs.py, as papermill does)']
    lines += [f'{name} = {value!r}' for name, value in parameters.items()]
    return mk_cell('\n'.join(lines), metadata={'tags': ['injected-parameters']}, id='5e7ec7ed')


def strip_machine_paths(cell):
    "Outputs name paths relative to the repository, not this machine's checkout."
    for output in cell.get('outputs', []):
        texts = [(output, 'text')] if 'text' in output else []
        texts += [(output['data'], kind) for kind in ('text/plain', 'text/html', 'text/markdown') if kind in output.get('data', {})]
        for holder, key in texts:
            text = ''.join(holder[key]) if isinstance(holder[key], list) else holder[key]
            holder[key] = text.replace(f'{ROOT}/', '').replace(str(ROOT), '.')


def shrink_figures(cell, budget: int = PNG_BUDGET):
    "A PNG over the budget (photographs compress badly) is stored with a 256-colour palette: still PNG, a few times smaller."
    import base64, io
    from PIL import Image
    for output in cell.get('outputs', []):
        png = output.get('data', {}).get('image/png')
        if png is None or len(png) * 3 // 4 <= budget: continue
        image = Image.open(io.BytesIO(base64.b64decode(png))).convert('RGB')
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, 'png', optimize=True)
        output['data']['image/png'] = base64.b64encode(buffer.getvalue()).decode()


def execute(path: Path, dest: Path, flags: set) -> float:
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    nb = read_nb(path)
    experiment = path.parent.name == 'experiments'
    if experiment and path.name in EXPERIMENT_PARAMETERS:
        shutil.rmtree(ROOT / OUT / path.stem, ignore_errors=True)
        nb.cells = [c for c in nb.cells if 'injected-parameters' not in c.get('metadata', {}).get('tags', [])]
        at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.get('metadata', {}).get('tags', []))
        nb.cells.insert(at + 1, injected_cell(EXPERIMENT_PARAMETERS[path.name]()))
    cwd = ROOT if experiment else path.parent
    shell = CaptureShell(cwd, mpl_format='png')
    shell.run_cell("import matplotlib as _mpl; _mpl.rcParams.update({'figure.dpi': 80, 'savefig.dpi': 80})")
    start, here = time.time(), os.getcwd()
    os.chdir(cwd)
    try:
        for cell in nb.cells:
            if cell.cell_type == 'code': cell.outputs = []
            if skipped(cell, flags): continue
            shell.cell(cell)
            if shell.exc: raise RuntimeError(f'{path.relative_to(ROOT)}: a cell failed:\n{cell.source}\n\n{shell.prettytb(fname=path)}')
            strip_machine_paths(cell); shrink_figures(cell)
    finally:
        os.chdir(here)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dest)
    return time.time() - start


def main(argv=None):
    global TEST_FLAGS
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('notebooks', nargs='*', type=Path, help='notebooks to execute (default: all of nbs/)')
    parser.add_argument('--out', type=Path, help='write the executed copies here instead of in place')
    parser.add_argument('--flags', default=None, help="test flags to run (default: 'cuda' where a GPU exists, else none)")
    args = parser.parse_args(argv)
    from fastcore.xtras import Config  # nbdev's settings.ini reader
    TEST_FLAGS = set(Config(ROOT, 'settings.ini').get('tst_flags', '').split())
    if args.flags is None:
        import torch
        args.flags = 'cuda' if torch.cuda.is_available() else ''
    flags = set(args.flags.split())
    os.environ.setdefault('TQDM_DISABLE', '1')    # progress bars are for people at a terminal, not for the docs
    scratch = tempfile.mkdtemp(prefix='execute_nbs_')  # the notebooks' temporary runs (gigabytes), removed at the end
    os.environ['TMPDIR'] = tempfile.tempdir = scratch
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    sys.path.insert(0, str(ROOT))
    paths = [p.resolve() for p in args.notebooks] or all_notebooks()
    failed = []
    try:
        for path in paths:
            run_one(path, args.out, flags, failed)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if failed:
        sys.exit(f'{len(failed)} notebook(s) failed, left unchanged: ' + ', '.join(str(p.relative_to(ROOT)) for p in failed))


def run_one(path: Path, out: Path | None, flags: set, failed: list):
    "Execute one notebook into `out` (None: in place); a failure is printed and recorded, the notebook left unchanged."
    dest = out / path.relative_to(NBS) if out else path
    try:
        seconds = execute(path, dest, flags)
    except Exception as error:
        print(error, file=sys.stderr); failed.append(path); return
    size = dest.stat().st_size
    print(f'{path.relative_to(ROOT)}: executed in {seconds:.0f} s, {size / 1024:.0f} KiB -> {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}')


TEST_FLAGS = set()
if __name__ == '__main__': main()
