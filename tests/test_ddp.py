"""2-process CPU DDP (gloo): topology events keep both ranks identical, with no hang."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def run(tmp_path, steps, every, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(steps), str(every)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_ranks_stay_identical_across_topology_events(tmp_path):
    rank0, rank1 = run(tmp_path, steps=160, every=10, timeout=600)
    events = rank0["events"]
    assert len(events) >= 10, events
    assert {e["op"] for e in events} >= {"grow", "shrink"}
    assert rank0["widths"] == rank1["widths"]
    assert rank0["events"] == rank1["events"]
    for name, value in rank0["state"].items():
        torch.testing.assert_close(value, rank1["state"][name], rtol=0, atol=0, msg=name)
    # Events are written once, by rank 0.
    rows = (tmp_path / "topology_events.csv").read_text().splitlines()
    assert len(rows) == len(events) + 1


@pytest.mark.slow
def test_ddp_sustained_load_500_steps(tmp_path):
    """A topology event every 10 optimizer steps for 500 steps on 2 ranks: no hang (the subprocess
    has its own timeout), identical parameters, every event logged once."""
    rank0, rank1 = run(tmp_path, steps=500, every=10, timeout=900)
    events = rank0["events"]
    assert len(events) >= 2 * 49  # 50 adaptations (steps 10..500) of both hidden spaces
    assert rank0["events"] == rank1["events"] and rank0["widths"] == rank1["widths"]
    for name, value in rank0["state"].items():
        torch.testing.assert_close(value, rank1["state"][name], rtol=0, atol=0, msg=name)
    rows = (tmp_path / "topology_events.csv").read_text().splitlines()
    assert len(rows) == len(events) + 1
