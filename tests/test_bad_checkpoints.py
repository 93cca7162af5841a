"""Checkpoints that do not fit: refused with a clear error, nothing changed, the file untouched."""

import hashlib

import lightning.pytorch as pl
import pytest
import torch
from _helpers import IsoModule, loaders, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from iso_lightning import DynamicTopologyCallback, ScaffoldPolicy
from iso_lightning.checkpointing import latest_valid_checkpoint
from iso_lightning.mixin import TOPOLOGY_KEY


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def grown_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0)
    model = IsoModule()
    ckpt = ModelCheckpoint(dirpath=tmp, save_last=True)
    train, val = loaders()
    trainer(tmp, [DynamicTopologyCallback(ScaffoldPolicy(0.5, 2), verbose=0), ckpt], max_epochs=2).fit(
        model, train, val)
    assert model.net.hidden_widths != [6, 6]
    return ckpt.last_model_path


def corrupted(tmp_path, source, edit):
    checkpoint = torch.load(source, weights_only=False)
    edit(checkpoint)
    path = tmp_path / "bad.ckpt"
    torch.save(checkpoint, path)
    return path


def entry(c, name="net.hidden.0"):
    return c[TOPOLOGY_KEY]["spaces"][name]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: entry(c).update(width="7"), "positive int width"),
        (lambda c: entry(c).update(width=0), "positive int width"),
        (lambda c: entry(c).update(width=2**40), "does not match its state dict"),
        (lambda c: c[TOPOLOGY_KEY]["spaces"].pop("net.hidden.1"), "different architecture"),
        (lambda c: entry(c).update(groups=[0, 2] + [2] * (entry(c)["width"] - 2)), "group"),
        (lambda c: c[TOPOLOGY_KEY]["spaces"].update(encoder=c[TOPOLOGY_KEY]["spaces"].pop("net.hidden.0")),
         "different architecture"),
        (lambda c: c.__setitem__(TOPOLOGY_KEY, "garbage"), "Expected a topology record"),
        (lambda c: c.__setitem__(TOPOLOGY_KEY, {"net": {"hidden_widths": [7]}}), "hidden widths"),
    ],
)
def test_corrupted_topology_record_is_refused_and_nothing_changes(tmp_path, grown_checkpoint, edit, match):
    path = corrupted(tmp_path, grown_checkpoint, edit)
    before = digest(path)
    model = IsoModule()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.on_load_checkpoint(torch.load(path, weights_only=False))
    with pytest.raises(ValueError, match=match):
        IsoModule.load_from_checkpoint(path)
    assert digest(path) == before  # the file on disk is untouched
    for key, value in state.items():  # and so is the model
        torch.testing.assert_close(model.state_dict()[key], value)


def test_weights_that_do_not_match_the_record_are_refused(tmp_path, grown_checkpoint):
    def shrink_record(c):
        for name in ("net.hidden.0", "net.hidden.1"):
            entry(c, name)["width"] = 6

    path = corrupted(tmp_path, grown_checkpoint, shrink_record)
    before = digest(path)
    model = IsoModule()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not match its state dict"):
        model.on_load_checkpoint(torch.load(path, weights_only=False))
    with pytest.raises(ValueError, match="does not match its state dict"):
        IsoModule.load_from_checkpoint(path)
    with pytest.raises(ValueError, match="does not match its state dict"):
        trainer(tmp_path, [], max_epochs=3).fit(model, *loaders(), ckpt_path=path)
    assert digest(path) == before
    assert model.net.hidden_widths == [6, 6]
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_truncated_and_foreign_files_are_never_picked(tmp_path, grown_checkpoint):
    good = tmp_path / "epoch=0.ckpt"
    good.write_bytes(open(grown_checkpoint, "rb").read())
    torn = tmp_path / "epoch=1.ckpt"
    torn.write_bytes(good.read_bytes()[:1000])
    foreign = tmp_path / "notes.ckpt"
    foreign.write_bytes(b"not a checkpoint")
    import os
    import time

    now = time.time()
    os.utime(good, (now - 20, now - 20))
    digests = {p.name: digest(p) for p in (good, torn, foreign)}
    assert latest_valid_checkpoint(tmp_path) == str(good)
    assert {p.name: digest(p) for p in (good, torn, foreign)} == digests  # nothing deleted or rewritten
