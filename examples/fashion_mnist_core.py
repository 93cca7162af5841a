"""Train an isotropic MLP on Fashion-MNIST and let its hidden layers adapt every epoch.

Uses the core API only (no Lightning): :class:`~iso_lightning.ScaffoldPolicy`, the paper's rule,
keeps ``K`` neurons per hidden layer whose singular value is below ``tau``, growing when there are
fewer and shrinking the surplus.

    python examples/fashion_mnist_core.py                 # 3 epochs, about a minute on 2 cores
    python examples/fashion_mnist_core.py --epochs 30 --widths 64 64
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from iso_lightning import IsotropicMLP, PolicyContext, ScaffoldPolicy, apply_decision, describe
from iso_lightning.data import load_idx_dataset


def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="directory of the IDX files (default: Debian's location)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 16])
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--scaffold", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    x_train, y_train = load_idx_dataset(args.data, train=True)
    x_test, y_test = load_idx_dataset(args.data, train=False)
    x_train = x_train.flatten(1).float() / 255.0
    x_test = x_test.flatten(1).float() / 255.0
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # per-pixel standardisation from training data
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    net = IsotropicMLP([784, *args.widths, 10], psi="decay", length="trainable")
    policy = ScaffoldPolicy(threshold=args.threshold, scaffold=args.scaffold)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-3)
    print(f"start widths {net.hidden_widths}")
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(x_train.shape[0])
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx]) + net.regularisation()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        seconds = time.perf_counter() - start
        before = net.hidden_widths
        decision = policy.decide(describe(net), PolicyContext(epoch=epoch))
        reports = apply_decision(net, decision, optimizer=opt)
        changes = ", ".join(f"{r.space} {r.op} {r.old_width}->{r.new_width}" for r in reports) or "none"
        print(f"epoch {epoch}: loss {total / len(order):.4f}, test accuracy {evaluate(net, x_test, y_test):.4f}, "
              f"{seconds:.1f} s, widths {before} -> {net.hidden_widths} ({changes})")
    print(f"final test accuracy {evaluate(net, x_test, y_test):.4f}, widths {net.hidden_widths}")


if __name__ == "__main__":
    main()
