"""BatchNorm statistics are re-estimated where their running averages cannot follow the weights."""

from __future__ import annotations

import torch
from torch import nn

from compresspipe.training.loop import recalibrate_batchnorm


def _batches(mean: float, n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(mean + torch.randn(16, 3, 4, 4, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(n)]


def test_slow_momentum_layers_get_exact_statistics_and_keep_their_settings():
    slow, fast = nn.BatchNorm2d(3, momentum=0.01), nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(slow, fast).train()
    batches = _batches(5.0)
    assert recalibrate_batchnorm(model, batches, torch.device("cpu"), batches=4) == 1
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(slow.running_mean, x.mean((0, 2, 3)), atol=1e-4)  # the exact average, not 1% of it
    assert torch.allclose(fast.running_mean, torch.zeros(3))  # a layer that can follow training is left alone
    assert slow.momentum == 0.01 and fast.momentum == 0.1
    assert model.training and slow.training and fast.training


def test_after_a_structural_change_every_layer_is_re_estimated_and_eval_mode_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, momentum=0.1)).eval()
    assert recalibrate_batchnorm(model, _batches(-2.0), torch.device("cpu"), only_slow=False) == 1
    bn = model[1]
    assert bn.num_batches_tracked > 0 and not bn.training and not model.training
    with torch.no_grad():
        feats = torch.cat([model[0](b[0]) for b in _batches(-2.0)])
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-4)


def test_a_model_without_batchnorm_is_untouched():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, _batches(1.0), torch.device("cpu"), only_slow=False) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
