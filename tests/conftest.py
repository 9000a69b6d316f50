"""Shared fixtures: `one_thread`, and the fault ledger of the reliability suite: every test that injects a fault records it with `ledger.record(...)`, and
the summary (faults injected, survived, data lost without being counted) is printed at the end of the session and
written to `runs/reliability_summary.json` (or $CLUSTER_GLIP_RELIABILITY_OUT)."""
import json, os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAULTS: list[dict] = []


class Ledger:
    def record(self, kind: str, survived: bool, lost: int = 0, note: str = ''):
        "One injected fault: what it was, whether the run came through it as promised, samples lost uncounted."
        FAULTS.append(dict(kind=kind, survived=bool(survived), lost=int(lost), note=note))


@pytest.fixture
def ledger() -> Ledger: return Ledger()


@pytest.fixture
def one_thread():
    "In-process training on one thread: on a shared 2-core machine, 2 threads per process mostly wait for each other."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a few seconds (the reliability suite still runs in CI)')


def pytest_terminal_summary(terminalreporter):
    if not FAULTS: return
    kinds = {}
    for f in FAULTS:
        k = kinds.setdefault(f['kind'], dict(kind=f['kind'], injected=0, survived=0, lost=0))
        k['injected'] += 1; k['survived'] += f['survived']; k['lost'] += f['lost']
    total = dict(injected=len(FAULTS), survived=sum(f['survived'] for f in FAULTS), lost=sum(f['lost'] for f in FAULTS))
    write = terminalreporter.write_line
    terminalreporter.section('reliability: faults injected, survived, data lost')
    width = max(len(k) for k in kinds)
    for k in kinds.values(): write(f"  {k['kind']:<{width}}  {k['injected']:3d} injected  {k['survived']:3d} survived  {k['lost']} lost")
    write(f"  {'total':<{width}}  {total['injected']:3d} injected  {total['survived']:3d} survived  {total['lost']} lost")
    out = Path(os.environ.get('CLUSTER_GLIP_RELIABILITY_OUT', ROOT / 'runs' / 'reliability_summary.json'))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(dict(total=total, kinds=list(kinds.values()), faults=FAULTS), indent=1))
        write(f'  written to {out}')
    except OSError as e: write(f'  (not written: {e})')
