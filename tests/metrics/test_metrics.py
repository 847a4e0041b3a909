"""Metrics as pure functions: exact counts on hand-checkable models, and no lasting change to the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from compresspipe.errors import InputError
from compresspipe.metrics import (
    count_macs,
    count_nonzero,
    count_params,
    evaluate,
    files_bytes,
    measure_latency,
    sparsity,
)


def test_macs_linear_exact():
    assert count_macs(nn.Linear(10, 20), (10,)) == 200
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)), (3, 4)) == 75


def test_macs_conv_by_hand():
    # 8 output channels x 5x5 positions, each 3 input channels x 3x3 kernel.
    assert count_macs(nn.Conv2d(3, 8, 3, padding=1), (3, 5, 5)) == 8 * 25 * 3 * 9
    # Grouped and strided: 6 x 4x4 outputs, each (4/2) x 3x3.
    assert count_macs(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 8, 8)) == 6 * 16 * 2 * 9


@pytest.mark.parametrize(("mode", "bits"), [("static", 8), ("dynamic", 8), ("weight_only", 8), ("weight_only", 4)])
def test_macs_and_params_of_quantized_layers_equal_the_float_model(mode, bits):
    """The quantize stage's layers run F.conv2d/F.linear (a float emulation of int8): counted like float layers."""
    from compresspipe.stages.quantize.layers import QuantConv2d, QuantLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 5))
    quantized = copy.deepcopy(model)
    if mode != "dynamic":  # dynamic quantizes Linear only
        quantized[0] = QuantConv2d.from_float(model[0], mode, bits, per_channel=True, relu=True)
    quantized[3] = QuantLinear.from_float(model[3], mode, bits, per_channel=False)
    assert count_macs(quantized, (3, 5, 5)) == count_macs(model, (3, 5, 5)) == 8 * 25 * 27 + 200 * 5
    assert count_params(quantized) == count_params(model) == (8 * 27 + 8) + (200 * 5 + 5)
    assert count_nonzero(quantized) <= count_params(quantized)


def test_macs_restores_modes_and_reports_failure():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    assert count_macs(model, (4,)) == 16 + 8
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert count_macs(model, (5,)) is None  # wrong input shape: cannot count


def test_count_params_tied_weights_once():
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 6))
    model[1].weight = model[0].weight
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[0, :3] = 0.0
        model[1].bias.fill_(1.0)
    assert count_params(model) == 36 + 6
    assert count_nonzero(model) == 33 + 6


def test_buffers_are_not_parameters():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    assert count_params(model) == (2 * 3 + 3) + (3 + 3)


def test_sparsity_after_zeroing_half_the_weights():
    model = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.weight[:5] = 0.0
    assert count_nonzero(model) == 50
    assert sparsity(model) == pytest.approx(0.5)


def test_sparsity_sees_pruning_masks():
    model = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    prune.l1_unstructured(model, "weight", amount=0.25)  # weight_orig stays dense; the mask zeroes 8
    assert count_params(model) == 32
    assert count_nonzero(model) == 24
    assert sparsity(model) == pytest.approx(0.25)


def test_latency_positive_per_batch_size_and_restores_state():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).train()
    threads = torch.get_num_threads()
    result = measure_latency(model, (8,), batch_sizes=[1, 4], warmup=1, iters=3, threads=1)
    assert sorted(result) == [1, 4]
    assert all(isinstance(v, float) and v > 0 and math.isfinite(v) for v in result.values())
    assert torch.get_num_threads() == threads
    assert model.training


def test_evaluate_exact_accuracy_and_loss():
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    inputs = torch.eye(3).repeat(2, 1)  # logits == one-hot inputs
    labels = torch.tensor([0, 1, 2, 0, 0, 0])  # 4 of 6 right
    model.train()
    accuracy, loss = evaluate(model, DataLoader(TensorDataset(inputs, labels), batch_size=4), "cpu")
    assert accuracy == pytest.approx(4 / 6)
    right = -math.log(math.e / (math.e + 2))
    wrong = -math.log(1 / (math.e + 2))
    assert loss == pytest.approx((4 * right + 2 * wrong) / 6)
    assert model.training

    with pytest.raises(InputError, match="no samples"):
        evaluate(model, [], "cpu")


def test_files_bytes(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "b.bin").write_bytes(b"y" * 7)
    (sub / "c.bin").write_bytes(b"z" * 3)
    assert files_bytes([tmp_path / "a.bin"]) == 10
    assert files_bytes([str(tmp_path / "a.bin"), sub]) == 20
    assert files_bytes([]) == 0
