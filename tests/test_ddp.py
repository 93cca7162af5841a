"""2-process CPU DDP (gloo): topology events keep both ranks identical, with no hang.

Every run is a subprocess in its own session with a deadline: a hang fails the test with a message
(and the whole process group is killed) instead of stalling CI.
"""

import glob
import os
from pathlib import Path

import pytest
import torch
from _helpers import run_two_ranks

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def run(tmp_path, *args, timeout=300):
    return run_two_ranks(SCRIPT, tmp_path, *args, timeout=timeout)


def assert_identical(rank0, rank1):
    assert rank0["widths"] == rank1["widths"]
    assert rank0["events"] == rank1["events"]
    for name, value in rank0["state"].items():
        torch.testing.assert_close(value, rank1["state"][name], rtol=0, atol=0, msg=name)


def events_file(tmp_path):
    found = glob.glob(str(tmp_path / "**" / "topology_events.csv"), recursive=True)
    assert len(found) == 1, found
    return Path(found[0])


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_ddp_with_the_callback_defaults_and_a_real_logger(tmp_path, logger):
    # The callback at its defaults (epoch-wise, log_dir from the trainer) under the logger users have:
    # resolving the trainer's log directory is a collective, so it must run on every rank.
    rank0, rank1 = run(tmp_path, "--epochs", "4", "--logger", logger, "--log-dir", "default", "--policy", "scaffold")
    assert rank0["events"], "the scaffold policy changed nothing: the test would not cover a change"
    assert_identical(rank0, rank1)
    path = events_file(tmp_path)
    assert "version_0" in str(path)  # the logger's directory, found by rank 0 and rank 1 alike
    assert len(path.read_text().splitlines()) == len(rank0["events"]) + 1
    assert rank0["figure"] and os.path.exists(rank0["figure"])


@pytest.mark.slow
def test_ddp_two_ranks_stay_identical_across_topology_events(tmp_path):
    rank0, rank1 = run(tmp_path, "--steps", "160", "--every", "10")
    events = rank0["events"]
    assert len(events) >= 10, events
    assert {e["op"] for e in events} >= {"grow", "shrink"}
    assert_identical(rank0, rank1)
    # Events are written once, by rank 0.
    assert len(events_file(tmp_path).read_text().splitlines()) == len(events) + 1


@pytest.mark.slow
def test_ddp_sustained_load_500_steps(tmp_path):
    """A topology event every 10 optimizer steps for 500 steps on 2 ranks: no hang, identical
    parameters, every event logged once."""
    rank0, rank1 = run(tmp_path, "--steps", "500", "--every", "10", timeout=900)
    events = rank0["events"]
    assert len(events) >= 2 * 49  # 50 adaptations (steps 10..500) of both hidden spaces
    assert_identical(rank0, rank1)
    assert len(events_file(tmp_path).read_text().splitlines()) == len(events) + 1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook"])
def test_spawn_strategy_returns_the_resized_model_to_the_main_process(tmp_path, strategy):
    # The run: the callback at its defaults, a spawn launcher. The main process's model must
    # end with rank 0's widths and weights, and the callback's history must come back with them.
    rank0, rank1 = run(tmp_path, "--epochs", "3", "--strategy", strategy, "--policy", "scaffold", "--log-dir",
                       "default", "--logger", "csv")
    main = torch.load(tmp_path / "main.pt", weights_only=False)
    assert rank0["events"] and rank0["widths"] != [6, 6]
    assert_identical(rank0, rank1)
    assert main["widths"] == rank0["widths"]
    assert set(main["state"]) == set(rank0["state"])
    for name, value in rank0["state"].items():
        torch.testing.assert_close(main["state"][name], value, rtol=0, atol=0, msg=name)
    assert main["events"] == rank0["events"] and main["history"] == rank0["history"] > 0
    assert main["figure"] == rank0["figure"] and os.path.exists(main["figure"])
