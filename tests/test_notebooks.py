"""The notebooks are the source: conventions every notebook keeps (STYLE.md), and the test flags working as documented."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
# nbdev_test beside this Python (a venv), else on PATH (a server whose packages sit in a --target folder)
NBDEV_TEST = shutil.which('nbdev_test', path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get('PATH', '')]))
notebooks = sorted(p for p in NBS.rglob('*.ipynb') if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))


def cells(path): return json.loads(path.read_text())['cells']
def source(cell): return ''.join(cell['source'])


@pytest.mark.parametrize('path', notebooks, ids=lambda p: str(p.relative_to(NBS)))
def test_notebook_opens_with_title_and_summary(path):
    first = cells(path)[0]
    assert first['cell_type'] == 'markdown', f'{path.name}: the first cell must be markdown (H1 title, > summary)'
    lines = [l for l in source(first).splitlines() if l.strip()]
    assert lines[0].startswith('# '), f'{path.name}: first line must be an H1 title, got {lines[0]!r}'
    assert any(l.startswith('> ') for l in lines[1:]), f'{path.name}: needs a one-line "> " summary under the title'


@pytest.mark.parametrize('path', notebooks, ids=lambda p: str(p.relative_to(NBS)))
def test_exporting_notebooks_map_one_to_one_onto_modules(path):
    exports = [m.group(1) for c in cells(path) if c['cell_type'] == 'code'
               for m in [re.search(r'^#\|\s*default_exp\s+(\S+)', source(c), re.M)] if m]
    if 'experiments' in path.relative_to(NBS).parts or path.name == 'index.ipynb':
        assert not exports, f'{path.name}: experiment notebooks and the index export nothing'
        return
    assert len(exports) == 1, f'{path.name}: one default_exp per notebook, found {exports}'
    assert re.fullmatch(r'\d\d[a-z]?_' + re.escape(exports[0]) + r'\.ipynb', path.name), \
        f'{path.name} should be named NN_{exports[0]}.ipynb'
    assert (ROOT / 'cluster_glip' / f'{exports[0]}.py').exists()


@pytest.mark.parametrize('path', notebooks, ids=lambda p: str(p.relative_to(NBS)))
def test_notebooks_are_committed_clean(path):
    for cell in cells(path):
        if cell['cell_type'] == 'code': assert cell['execution_count'] is None, f'{path.name}: run nbdev_clean'
        assert set(cell['metadata']) <= {'tags'}, f'{path.name}: stray cell metadata {set(cell["metadata"])}'


def test_cuda_flagged_cell_is_skipped_without_the_flag(tmp_path):
    "nbdev_test skips a `#| cuda` cell unless asked to run cuda cells (the Makefile asks only where a GPU exists)."
    (tmp_path / 'settings.ini').write_text((ROOT / 'settings.ini').read_text().replace('nbs_path = nbs', 'nbs_path = .'))
    nb = {'cells': [{'cell_type': 'code', 'execution_count': None, 'metadata': {}, 'outputs': [],
                     'source': ['#| cuda\n', "raise RuntimeError('a cuda cell ran')"]}],
          'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
    (tmp_path / 'gpu_only.ipynb').write_text(json.dumps(nb))
    run = lambda flags: subprocess.run([NBDEV_TEST, '--path', 'gpu_only.ipynb', '--flags', flags],
                                       cwd=tmp_path, capture_output=True, text=True)
    skipped, forced = run(''), run('cuda')
    assert skipped.returncode == 0, skipped.stderr
    assert forced.returncode != 0 and 'a cuda cell ran' in forced.stdout + forced.stderr


def test_every_notebook_is_in_the_docs_sidebar():
    "The hand-written sidebar of `_quarto.yml` names every notebook, and only notebooks that exist."
    import yaml
    def pages(entries):
        for entry in entries:
            if isinstance(entry, str): yield entry
            else: yield from pages(entry.get('contents', []))
    listed = set(pages(yaml.safe_load((ROOT / '_quarto.yml').read_text())['website']['sidebar']['contents']))
    assert listed == {str(p.relative_to(NBS)) for p in notebooks}
