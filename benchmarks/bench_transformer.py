"""Transformer benchmarks, measured side by side in one run (ratios, not absolute times).

    python benchmarks/bench_transformer.py            # about 3 minutes on 2 cores
    python benchmarks/bench_transformer.py --quick    # fewer repetitions, for a smoke run

Sizes are those of ``examples/configs/shakespeare_gpt.yaml`` (``CharGPT``: d_model 64, 2 blocks of
4 heads, FFN width 128, 84 characters, batch 32 windows of 64) and a wider model (d_model 128, FFN
width 512), one CPU thread (as the config runs).

(a) Training-step time (forward, backward, AdamW step) of five models, one step of each per round,
    the order rotating, median of the per-round ratios (load from other processes on a shared
    machine cancels out of them):

    * ``iso``: CharGPT with isotropic tanh FFNs, groups of 8 (the config's model);
    * ``iso1``: the same with one group per FFN;
    * ``gelu``: CharGPT with elementwise ``nn.GELU`` FFNs (``IsotropicFFN(activation=nn.GELU())``);
    * ``plain``: the reference, written here in plain PyTorch: the same blocks with
      ``nn.Sequential(nn.Linear, nn.GELU, nn.Linear)`` FFNs;
    * ``converted``: that plain model after :func:`iso_lightning.convert` (its FFNs declared as
      elementwise spaces) and one grow and one shrink of every FFN space (back to the same width).

    Targets: iso / gelu <= 1.05, converted / plain <= 1.01.
(b) One grow and one shrink of an FFN space (4 neurons, AdamW state remapped) as a fraction of
    one training epoch: the median step time of (a) times the steps of an epoch, for the
    datamodule's default epoch (the training text read once: 2,222 steps of 32 windows) and for the
    config's shortened epoch (``samples_per_epoch: 6400``: 200 steps). Target <= 0.1 %.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iso_lightning import CharGPT, apply_decision, convert, describe
from iso_lightning.gpt import CausalSelfAttention

VOCAB = 84  # the characters of the Shakespeare texts the config reads
SIZES = {
    "config": dict(block_size=64, d_model=64, n_layers=2, n_heads=4, d_hidden=128, batch=32),
    "wide": dict(block_size=64, d_model=128, n_layers=2, n_heads=4, d_hidden=512, batch=32),
}
DEFAULT_EPOCH_STEPS = 2222  # 4,551,552 training characters / 64 per window / 32 windows per batch
CONFIG_EPOCH_STEPS = 200  # samples_per_epoch 6400 / batch 32


class PlainBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class PlainGPT(nn.Module):
    """The reference: CharGPT's architecture with plain PyTorch GELU FFNs."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int, n_layers: int, n_heads: int,
                 d_hidden: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(PlainBlock(d_model, n_heads, d_hidden) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.token_embedding(idx) + self.position_embedding(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # type: ignore[no-any-return]

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _models(size: Dict[str, int]) -> Dict[str, nn.Module]:
    arch = {k: v for k, v in size.items() if k != "batch"}
    torch.manual_seed(0)
    models: Dict[str, nn.Module] = {
        "iso": CharGPT(vocab_size=VOCAB, activation="tanh", group_size=8, **arch),
        "iso1": CharGPT(vocab_size=VOCAB, activation="tanh", group_size=None, **arch),
        "gelu": CharGPT(vocab_size=VOCAB, activation="gelu", **arch),
        "plain": PlainGPT(VOCAB, **arch),
    }
    converted = convert(PlainGPT(VOCAB, **arch))
    converted.load_state_dict(models["plain"].state_dict())
    models["converted"] = converted
    return models


def _stepper(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], None]:
    if isinstance(model, CharGPT):
        optimizer = model.configure_optimizers()
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    regularised = isinstance(model, CharGPT)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(x, y)  # type: ignore[operator]
        if regularised:
            loss = loss + model.psi_regularisation()  # type: ignore[operator]
        loss.backward()
        optimizer.step()

    step.optimizer = optimizer  # type: ignore[attr-defined]
    return step


def bench_steps(size: Dict[str, int], rounds: int) -> Dict[str, List[float]]:
    """Seconds of one training step of each model, per round (rounds interleaved, order rotating)."""
    models = _models(size)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (size["batch"], size["block_size"]), generator=g)
    y = torch.randint(0, VOCAB, (size["batch"], size["block_size"]), generator=g)
    steps = {name: _stepper(model, x, y) for name, model in models.items()}
    for _ in range(3):
        for step in steps.values():
            step()
    # The converted model goes through the library's operations (AdamW remapped), back to its width.
    converted = models["converted"]
    widths = {name: info.width for name, info in describe(converted).items()}
    optimizer = steps["converted"].optimizer  # type: ignore[attr-defined]
    apply_decision(converted, {name: w + 8 for name, w in widths.items()}, optimizer=optimizer)
    apply_decision(converted, widths, optimizer=optimizer)
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: Dict[str, List[float]], a: str, b: str) -> float:
    return statistics.median(u / v for u, v in zip(times[a], times[b]))


def bench_changes(size: Dict[str, int], repeats: int) -> Dict[str, float]:
    """Median seconds of one grow and one shrink of ``blocks.0.ffn.hidden`` (4 neurons, AdamW remapped),
    each after a training step, in both orders (grow then shrink the new neurons; shrink trained
    neurons then grow back)."""
    arch = {k: v for k, v in size.items() if k != "batch"}
    torch.manual_seed(0)
    model = CharGPT(vocab_size=VOCAB, activation="tanh", group_size=8, **arch)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (size["batch"], size["block_size"]), generator=g)
    y = torch.randint(0, VOCAB, (size["batch"], size["block_size"]), generator=g)
    step = _stepper(model, x, y)
    optimizer = step.optimizer  # type: ignore[attr-defined]
    for _ in range(5):
        step()
    name, width = "blocks.0.ffn.hidden", size["d_hidden"]

    def timed(target: int) -> float:
        step()
        start = time.perf_counter()
        apply_decision(model, {name: target}, optimizer=optimizer)
        return time.perf_counter() - start

    grow_shrink, shrink_grow, decide = [], [], []
    for _ in range(repeats):
        grow_shrink.append(timed(width + 4) + timed(width))
        shrink_grow.append(timed(width - 4) + timed(width))
        start = time.perf_counter()
        describe(model)  # what the callback reads before every decision (spectra of every space)
        decide.append(time.perf_counter() - start)
    return {"grow + shrink (new neurons)": statistics.median(grow_shrink),
            "shrink (trained) + grow": statistics.median(shrink_grow),
            "describe (both spaces)": statistics.median(decide)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = {"config": 30 if args.quick else 150, "wide": 10 if args.quick else 40}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    step_time = {}
    for label, size in SIZES.items():
        times = bench_steps(size, rounds[label])
        step_time[label] = statistics.median(times["iso"])
        medians = ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items())
        print(f"\n(a) training step, {label} sizes {size}, {rounds[label]} rounds: {medians}")
        for a, b, target in (("iso", "gelu", 1.05), ("converted", "plain", 1.01), ("gelu", "plain", None),
                             ("iso1", "gelu", None), ("iso", "plain", None)):
            value = ratio(times, a, b)
            verdict = "" if target is None else f"  (target <= {target}: {'met' if value <= target else 'MISSED'})"
            print(f"    {a:>9} / {b:<6} {value:.3f}{verdict}")
    changes = bench_changes(SIZES["config"], 5 if args.quick else 20)
    print(f"\n(b) FFN space changes, config sizes (one training step: {step_time['config'] * 1e3:.1f} ms)")
    for what, seconds in changes.items():
        default = seconds / (step_time["config"] * DEFAULT_EPOCH_STEPS)
        short = seconds / (step_time["config"] * CONFIG_EPOCH_STEPS)
        verdict = "" if what.startswith("describe") else \
            f"  (target <= 0.1 % of an epoch: {'met' if default <= 1e-3 else 'MISSED'} for the default epoch, " \
            f"{'met' if short <= 1e-3 else 'MISSED'} for the config's)"
        print(f"    {what:<28} {seconds * 1e3:6.2f} ms = {default * 100:.3f} % of a default epoch "
              f"({DEFAULT_EPOCH_STEPS} steps), {short * 100:.3f} % of the config's ({CONFIG_EPOCH_STEPS}){verdict}")


if __name__ == "__main__":
    main()
