"""The committed notebooks carry their outputs (`make notebooks`), so the docs show the numbers and figures under the
examples: every drawing cell has its figure, nothing committed is an error, and the outputs stay small."""
import base64, importlib.util, json, re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
_spec = importlib.util.spec_from_file_location('execute_nbs', ROOT / 'devtools' / 'execute_nbs.py')
execute_nbs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(execute_nbs)
notebooks = execute_nbs.all_notebooks()
ids = lambda p: str(p.relative_to(NBS))

FIGURE_BUDGET = 160_000      # bytes of one PNG figure
NOTEBOOK_BUDGET = 1_000_000  # bytes of one notebook file, outputs included
TEXT_LINES = 60              # lines of one text output: heads of tables, not whole tables
# a call that draws (not an import, not a theme or rcParams setting)
DRAWS = re.compile(r'\b(plt\.(subplots?|figure|show|imshow|bar|barh|plot|hist|scatter)\b|sns\.(?!set)\w+\(|show_\w+\(|plot_\w+\(|\.imshow\(|\.plot\()')
EXPORTS = re.compile(r'^\s*#\|\s*export', re.M)
# pages about something a person cannot look at; every other page shows at least one figure
# results not yet produced: their drawing cells draw only once the run's files are committed (remove the entry then)
PENDING_RESULTS = {'experiments/textured_scenes.ipynb': 'the CPU study of issue #20 (about 2.5 hours alone on 2 cores)'}
NO_FIGURE = {'05_config.ipynb': 'configuration', '05b_rundir.ipynb': 'files of a run folder', '10_cli.ipynb': 'the command line',
             'index.ipynb': 'the home page (its guide is commands)'}


def cells(path): return json.loads(path.read_text())['cells']
def source(cell): return ''.join(cell['source'])
def images(cell): return [o['data']['image/png'] for o in cell.get('outputs', []) if 'image/png' in o.get('data', {})]


class _Cell(dict):
    "The attribute access execute_nbs.skipped reads."
    cell_type = property(lambda self: self['cell_type'])
    source = property(lambda self: source(self))


def run_by_nbdev_test(cell) -> bool:
    "A cell `make notebooks` executes here (no GPU flags): code, not skipped by a flag or `eval: false`."
    execute_nbs.TEST_FLAGS = {'slow', 'cuda', 'multigpu'}
    return not execute_nbs.skipped(_Cell(cell), flags=set())


@pytest.mark.parametrize('path', notebooks, ids=ids)
def test_every_drawing_cell_shows_its_figure(path):
    if ids(path) in PENDING_RESULTS and not (NBS / 'experiments/results_data/textured_scenes/results.csv').is_file():
        pytest.skip(f'{ids(path)}: waits for {PENDING_RESULTS[ids(path)]}')
    missing = [source(c).splitlines()[0] for c in cells(path) if run_by_nbdev_test(c) and not EXPORTS.search(source(c))
               and DRAWS.search(source(c)) and not images(c)]
    assert not missing, f'{ids(path)}: cells that draw have no figure (run `make notebooks`): {missing}'


@pytest.mark.parametrize('path', notebooks, ids=ids)
def test_every_visible_topic_has_a_figure(path):
    shown = sum(len(images(c)) for c in cells(path))
    if path.name in NO_FIGURE: return
    assert shown >= 1, f'{ids(path)}: no figure committed (run `make notebooks`)'


@pytest.mark.parametrize('path', notebooks, ids=ids)
def test_committed_outputs_are_executed_without_error(path):
    executed = [c for c in cells(path) if run_by_nbdev_test(c)]
    assert any(c.get('outputs') for c in executed), f'{ids(path)}: no outputs committed (run `make notebooks`)'
    for cell in executed:
        for output in cell.get('outputs', []):
            assert output['output_type'] != 'error', f'{ids(path)}: an error is committed under {source(cell).splitlines()[0]!r}'
            assert 'Traceback (most recent call last)' not in ''.join(output.get('text', '')), ids(path)


@pytest.mark.parametrize('path', notebooks, ids=ids)
def test_outputs_stay_small(path):
    assert path.stat().st_size <= NOTEBOOK_BUDGET, f'{ids(path)}: {path.stat().st_size:,} bytes > {NOTEBOOK_BUDGET:,}'
    for cell in cells(path):
        for png in images(cell):
            assert len(base64.b64decode(png)) <= FIGURE_BUDGET, f'{ids(path)}: a figure over {FIGURE_BUDGET:,} bytes'
        for output in cell.get('outputs', []):
            texts = [output.get('text', '')] + [output.get('data', {}).get('text/plain', '')]
            for text in texts:
                lines = ''.join(text).count('\n')
                assert lines <= TEXT_LINES, f'{ids(path)}: a text output of {lines} lines under {source(cell).splitlines()[0]!r}'
