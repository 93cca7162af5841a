"""Checkpoints written by iso_lightning 0.1.0 (topology record of per-network widths) still load."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
from legacy_module import LegacyModule  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "fixtures")


def test_a_version_0_1_0_checkpoint_loads_with_its_widths_and_outputs():
    module = LegacyModule.load_from_checkpoint(os.path.join(DATA, "v0_1_0.ckpt"), weights_only=False)
    reference = torch.load(os.path.join(DATA, "v0_1_0_outputs.pt"))
    assert module.net.hidden_widths == [9, 9]
    assert module.grouped.hidden_widths == [7]
    assert module.conv.hidden_widths == [6, 7]
    assert module.grouped.activations[0].group_index.tolist() == [0, 0, 1, 1, 0, 1, 0]
    # The outputs 0.1.0 computed, to float32 round-off (the activation's arithmetic may be ordered
    # differently now: the compiled kernel sums the squares of a group in another order).
    torch.testing.assert_close(module(reference["x"]), reference["y"], rtol=1e-5, atol=1e-6)
    record = module.topology()
    assert record["version"] == 2
    assert record["spaces"]["net.hidden.1"]["width"] == 9
    assert record["spaces"]["grouped.hidden.0"]["groups"] == [0, 0, 1, 1, 0, 1, 0]
