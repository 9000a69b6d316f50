"""`make preview`: the docs without Quarto. Every notebook in nbs/ (experiments included) rendered to an HTML page with
nbconvert, as committed (outputs included), with nbdev's `#|` directives taken out and `#| hide` cells left out, as the
docs site does; `index.html` lists the pages with their titles and summaries, the docs home page first.
The real site is Quarto's (`make docs`, and the GitHub `deploy docs` workflow)."""
import argparse, html, json, re
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r'^\s*#\|.*$\n?', re.M)


def processed(path: Path) -> nbformat.NotebookNode:
    "The notebook as the docs show it: no `#| hide` cells, no directive lines."
    nb = nbformat.read(path, as_version=4)
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'code' and re.search(r'^\s*#\|\s*hide\b', cell.source, re.M): continue
        if cell.cell_type == 'code': cell.source = DIRECTIVE.sub('', cell.source)
        if cell.source.strip() or cell.get('outputs'): cells.append(cell)
    nb.cells = cells
    return nb


def title_and_summary(nb) -> tuple[str, str]:
    text = next((c.source for c in nb.cells if c.cell_type == 'markdown'), '')
    title = re.search(r'^# (.+)$', text, re.M)
    summary = re.search(r'^> (.+)$', text, re.M)
    return (title.group(1) if title else ''), (summary.group(1) if summary else '')


def main(out: Path):
    notebooks = sorted((ROOT / 'nbs').glob('*.ipynb')) + sorted((ROOT / 'nbs' / 'experiments').glob('*.ipynb'))
    notebooks = [p for p in notebooks if not p.name.startswith('_')]
    notebooks.sort(key=lambda p: (p.name != 'index.ipynb', p.parent.name == 'experiments', p.name))
    exporter = HTMLExporter(template_name='lab')
    entries = []
    for path in notebooks:
        nb = processed(path)
        relative = path.relative_to(ROOT / 'nbs').with_suffix('.html')
        page = Path('home.html') if path.name == 'index.ipynb' else relative
        title, summary = title_and_summary(nb)
        body, _ = exporter.from_notebook_node(nb, resources={'metadata': {'name': title or path.stem}})
        (out / page).parent.mkdir(parents=True, exist_ok=True)
        (out / page).write_text(body, encoding='utf-8')
        entries.append((page.as_posix(), title or path.stem, summary, path.relative_to(ROOT).as_posix()))
        print(f'{path.relative_to(ROOT)} -> {out / page}')
    rows = '\n'.join(f'<li><a href="{html.escape(href)}">{html.escape(title)}</a> <small>({html.escape(source)})</small>'
                     f'<br>{html.escape(summary)}</li>' for href, title, summary, source in entries)
    (out / 'index.html').write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>cluster_glip docs preview</title>'
        '<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}li{margin:.6em 0}</style></head><body>'
        '<h1>cluster_glip: docs preview</h1><p>The notebooks rendered with nbconvert (<code>make preview</code>); '
        'the published site is built with Quarto.</p>'
        f'<ul>\n{rows}\n</ul></body></html>\n', encoding='utf-8')
    print(f'open {out / "index.html"}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='_preview', help='folder the pages go in')
    folder = Path(parser.parse_args().out)
    folder.mkdir(parents=True, exist_ok=True)
    main(folder)
