"""A long random sequence of function-preserving operations in float32, against a float64 replay."""

import random

import pytest
import torch

from iso_lightning import IsotropicMLP

torch.set_num_threads(1)


def trained(dtype, seed=0):
    torch.manual_seed(seed)
    net = IsotropicMLP([12, 16, 16, 16, 5], psi="decay", length="trainable")
    x, y = torch.randn(256, 12), torch.randint(0, 5, (256,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        (torch.nn.functional.cross_entropy(net(x), y) + net.regularisation()).backward()
        opt.step()
    return net.to(dtype)


def null_directions(net, layer):
    """Directions of a hidden space with a zero singular value (to float64 round-off): grown neurons
    whose incoming rows are still zero, in whatever basis the rotations since have put them."""
    sigma = net.singular_values(layer)
    return int((sigma <= 1e-9 * float(sigma.max())).sum())


@pytest.mark.slow
def test_thousand_invariant_operations_float32_against_float64_replay():
    net32 = trained(torch.float32)
    net64 = IsotropicMLP([12, 16, 16, 16, 5], psi="decay", length="trainable").double()
    net64.load_state_dict({k: v.double() for k, v in net32.state_dict().items()})
    # lr = 0: the optimizers really step after every operation (their state is remapped and used),
    # but the function stays what the operations make it.
    opt32 = torch.optim.AdamW(net32.parameters(), lr=0.0, weight_decay=0.1)
    opt64 = torch.optim.AdamW(net64.parameters(), lr=0.0, weight_decay=0.1)
    probe = torch.randn(128, 12)
    reference = net64(probe.double()).detach()
    rng = random.Random(0)
    ops = ["grow", "shrink_grown", "left", "full", "add_inputs", "add_outputs"]
    counts = dict.fromkeys(ops, 0)
    for step in range(1000):
        op = rng.choice(ops)
        layer = rng.randrange(net32.num_hidden)
        seed = rng.randrange(2**31)
        # The float64 replay decides how many exactly removable directions there are; both remove them.
        removable = min(null_directions(net64, layer), net64.hidden_widths[layer] - 1)
        for net, opt in ((net32, opt32), (net64, opt64)):
            g = torch.Generator().manual_seed(seed)
            if op == "grow":
                net.grow(layer, 1 + seed % 3, optimizer=opt, generator=g)
            elif op == "shrink_grown" and removable:
                net.shrink(layer, removable, optimizer=opt)
            elif op == "left":
                net.diagonalise(layer, "left", optimizer=opt)
            elif op == "full" and layer > 0:
                net.diagonalise(layer, "full", optimizer=opt)
            elif op == "add_inputs" and net.in_features < 40:
                net.add_inputs(1, optimizer=opt)  # zero weights: the extra input is ignored
            elif op == "add_outputs" and net.out_features < 25:
                net.add_outputs(1, optimizer=opt, generator=g)
            opt.zero_grad()
            x = torch.nn.functional.pad(probe, (0, net.in_features - 12)).to(next(net.parameters()).dtype)
            net(x).sum().backward()
            opt.step()
        counts[op] += 1
        assert net32.hidden_widths == net64.hidden_widths, step
    x = torch.nn.functional.pad(probe, (0, net32.in_features - 12))
    out32 = net32(x).detach().double()[:, :5]
    out64 = net64(x.double()).detach()[:, :5]
    scale = float(reference.abs().max())
    # The float64 replay stays on the original function to float64 round-off ...
    assert float((out64 - reference).abs().max()) <= 1e-9 * scale
    # ... and float32 drifts from it by at most 1e-4 relative over the whole sequence.
    drift = float((out32 - out64).abs().max()) / scale
    print(f"float32 drift after 1000 operations: {drift:.2e} relative; widths {net32.hidden_widths}; {counts}")
    assert drift <= 1e-4, drift
    assert all(c > 100 for c in counts.values()), counts
    for net in (net32, net64):
        for act in net.activations:
            assert float(act.effective_length().max()) <= act.max_length
        for layer in net.layers:
            if layer.correction is not None:
                assert torch.isfinite(layer.correction).all() and float(layer.correction.abs().max()) < 1e3
