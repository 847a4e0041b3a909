"""Blocks that train with parallel branches are written folded: the same function, fewer nodes."""

from __future__ import annotations

import torch
from torch import nn

from compresspipe.models.reparam import inference_form, reparameterizable


class _Branches(nn.Module):
    """RepVGG in small: 3x3 and 1x1 convolutions and an identity BatchNorm added while training (a BatchNorm on
    the identity has no convolution to fold into: ONNX Runtime keeps it), one 3x3 convolution after folding."""

    def __init__(self, c: int):
        super().__init__()
        self.k3, self.k1, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
        self.fused: nn.Conv2d | None = None

    def forward(self, x):
        return self.fused(x) if self.fused is not None else self.k3(x) + self.k1(x) + self.bn(x)

    def reparameterize(self):
        c = self.k3.in_channels
        fused = nn.Conv2d(c, c, 3, padding=1)
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        with torch.no_grad():
            identity = torch.zeros_like(fused.weight)
            identity[range(c), range(c), 1, 1] = scale
            fused.weight.copy_(self.k3.weight + nn.functional.pad(self.k1.weight, [1, 1, 1, 1]) + identity)
            fused.bias.copy_(self.k3.bias + self.k1.bias + self.bn.bias - scale * self.bn.running_mean)
        self.fused = fused
        del self.k3, self.k1, self.bn


class _Vae(nn.Module):
    """A VAE's reparameterize(mu, logvar) samples a latent: it is not a folding method."""

    def __init__(self):
        super().__init__()
        self.mu = nn.Linear(4, 4)

    def reparameterize(self, mu, logvar):
        raise AssertionError("called")

    def forward(self, x):
        return self.mu(x)


def test_blocks_fold_in_a_copy_and_the_model_keeps_its_training_form():
    torch.manual_seed(0)
    model = nn.Sequential(_Branches(4), nn.ReLU(), nn.Sequential(_Branches(4)), nn.Flatten()).eval()
    assert reparameterizable(model) == ["0", "2.0"]
    folded, count = inference_form(model)
    assert count == 2 and folded is not model
    assert folded[0].fused is not None and not hasattr(folded[0], "k3")
    assert model[0].fused is None and hasattr(model[0], "k3")  # the model itself is untouched
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_a_method_that_needs_arguments_is_not_a_folding_method():
    model = nn.Sequential(_Vae(), nn.ReLU())
    assert reparameterizable(model) == []
    assert inference_form(model) == (model, 0)


def test_the_outermost_block_folds_its_children():
    outer = _Branches(2)
    outer.inner = _Branches(2)  # a child that could fold too: the outer block's own method decides
    assert reparameterizable(nn.Sequential(outer)) == ["0"]


def test_the_onnx_file_is_written_from_the_folded_copy(tmp_path):
    """write_onnx folds the blocks in a copy: the file has one convolution per block and no BatchNorm, follows the
    model, says so in a note; the model keeps its training form."""
    import onnx
    import onnxruntime as ort

    from compresspipe.artifacts.model import ModelState
    from compresspipe.runtimes.onnx_float import write_onnx
    from tests.runtimes.test_onnx_cache import _job

    torch.manual_seed(0)
    model = nn.Sequential(_Branches(1), nn.ReLU(), _Branches(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    job = _job(tmp_path, ModelState(model, {}, (1, 8, 8), 10))
    path = write_onnx(model, job, tmp_path / "m.onnx")[0]
    assert any("inference form: 2 block(s)" in n for n in job.notes), job.notes
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 2 and "BatchNormalization" not in ops, ops
    assert hasattr(model[0], "bn") and model[0].fused is None
    x = torch.randn(3, 1, 8, 8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert abs(got - model(x).numpy()).max() < 1e-4
