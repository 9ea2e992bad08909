"""The guarded optimizer update (clip, skip-and-count non-finite steps, zero grads) and the EMA."""
from __future__ import annotations

import math

import torch
from torch import nn

from tmd_train.engine.ema import EMA
from tmd_train.engine.optim import NonFiniteGuard, guarded_update, lr_at


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_guarded_update_steps_clips_and_skips():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    guard = NonFiniteGuard()
    loss = (model(torch.ones(4, 3)) * 100).sum()
    loss.backward()
    want = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm, stepped = guarded_update(opt, guard, loss, max_grad_norm=1.0, lr=0.5)
    assert stepped and abs(norm - want) < 1e-4 * want and opt.param_groups[0]["lr"] == 0.5
    moved = math.sqrt(sum(float((model.state_dict()[k] - before[k]).pow(2).sum()) for k in before))
    assert abs(moved - 0.5) < 1e-4                                          # clipped to norm 1, lr 0.5
    assert all(p.grad is None for p in model.parameters())
    # a NaN loss: no step, counted, gradients zeroed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = model(torch.ones(1, 3)).sum() * float("nan")
    bad.backward()
    _, stepped = guarded_update(opt, guard, bad, max_grad_norm=0.0)
    assert not stepped and guard.skipped == 1
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_lr_warmup():
    assert [lr_at(s, 1.0, 4) for s in (1, 2, 4, 9)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_at(1, 1.0, 0) == 1.0


def test_ema_copies_then_averages():
    model = _model()
    ema = EMA(model, decay=0.5, start=1)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()                                                            # copy (within start)
    assert torch.equal(ema.shadow["weight"], w0 + 1)
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()                                                            # 0.5·(w0+1) + 0.5·(w0+3)
    torch.testing.assert_close(ema.shadow["weight"], w0 + 2)
    assert ema.updates == 2
    full = ema.full()
    other = EMA(model, decay=0.5)
    other.load(full)
    assert all(torch.equal(other.shadow[k], full[k]) for k in full)
