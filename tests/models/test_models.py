"""Builtin models, the model factory and checkpoint loading (never unpickling)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from compresspipe.errors import InputError
from compresspipe.models.factory import build_from_spec, build_model, load_checkpoint
from compresspipe.recipe.spec import ModelSpec


@pytest.mark.parametrize(
    ("source", "shape"),
    [
        ({"builtin": "digits-mlp"}, (2, 1, 8, 8)),
        ({"builtin": "digits-cnn"}, (2, 1, 8, 8)),
        ({"builtin": "tiny-resnet"}, (2, 3, 16, 16)),
        ({"builtin": "digits-cnn", "kwargs": {"num_classes": 4, "width": 4, "hidden": 8}}, (2, 1, 8, 8)),
        ({"torchvision": "resnet18", "kwargs": {"num_classes": 10}}, (1, 3, 32, 32)),
    ],
)
def test_build_model_forward_shape(source, shape):
    model = build_model(source).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    classes = source.get("kwargs", {}).get("num_classes", 10)
    assert out.shape == (shape[0], classes)


def test_builtin_layer_names():
    mlp = build_model({"builtin": "digits-mlp", "kwargs": {"hidden": 7}})
    assert [n for n, _ in mlp.named_children()] == ["flatten", "fc1", "relu", "fc2"]
    assert mlp.fc1.out_features == 7
    cnn = build_model({"builtin": "digits-cnn"})
    assert (cnn.c1.out_channels, cnn.c2.out_channels, cnn.fc1.in_features) == (32, 64, 64 * 16)
    assert isinstance(cnn.bn1, nn.BatchNorm2d) and isinstance(cnn.bn2, nn.BatchNorm2d)
    resnet = build_model({"builtin": "tiny-resnet", "kwargs": {"width": 4}})
    assert resnet.layer1.downsample is None and isinstance(resnet.layer2.downsample, nn.Sequential)
    assert resnet.fc.in_features == 8


def test_layer_can_be_replaced_by_attribute():
    model = build_model({"builtin": "digits-cnn", "kwargs": {"width": 4, "hidden": 16}}).eval()
    fc1 = model.fc1
    low_rank = nn.Sequential(nn.Linear(fc1.in_features, 3, bias=False), nn.Linear(3, 16))
    model.fc1 = low_rank
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model.fc2(
            model.relu3(
                low_rank(
                    torch.flatten(
                        model.pool(model.relu2(model.bn2(model.c2(model.relu1(model.bn1(model.c1(x))))))), 1
                    )
                )
            )
        )
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize(("name", "shape"), [("digits-cnn", (1, 1, 8, 8)), ("tiny-resnet", (1, 3, 16, 16))])
def test_structured_pruning_keeps_the_model_runnable(name, shape):
    tp = pytest.importorskip("torch_pruning")
    model = build_model({"builtin": name})
    example = torch.randn(shape)
    head = model.fc2 if name == "digits-cnn" else model.fc
    before = sum(p.numel() for p in model.parameters())
    tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[head],
    ).step()
    assert model(example).shape == (1, 10)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * before


def test_build_model_errors():
    with pytest.raises(InputError, match=r"model 'digits-mlp' does not accept kwargs \{'depth': 3\}"):
        build_model({"builtin": "digits-mlp", "kwargs": {"depth": 3}})
    with pytest.raises(InputError, match="torchvision:resnet18"):
        build_model({"torchvision": "resnet18", "kwargs": {"bogus": 1}})
    with pytest.raises(InputError, match="builtin: unknown model .digits-mlpp.; did you mean 'digits-mlp'"):
        build_model({"builtin": "digits-mlpp"})
    with pytest.raises(InputError, match="one model source: builtin, torchvision, timm, huggingface or python"):
        build_model({"kwargs": {}})


def _tiny_mlp() -> nn.Module:
    return build_model({"builtin": "digits-mlp", "kwargs": {"hidden": 6}})


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_load_checkpoint_pt_and_wrapped_forms(tmp_path):
    torch.manual_seed(0)
    source = _tiny_mlp()
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    target = _tiny_mlp()
    assert not torch.equal(target.fc1.weight, source.fc1.weight)
    load_checkpoint(target, str(plain))
    _assert_same_weights(source, target)

    wrapped = tmp_path / "wrapped.pth"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped
    )
    target = _tiny_mlp()
    load_checkpoint(target, wrapped)
    _assert_same_weights(source, target)


def test_load_checkpoint_safetensors_and_spec(tmp_path):
    torch.manual_seed(1)
    source = _tiny_mlp()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    spec = ModelSpec(builtin="digits-mlp", kwargs={"hidden": 6}, checkpoint=str(path))
    _assert_same_weights(source, build_from_spec(spec))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.embed(x))


def test_load_checkpoint_tied_weights_saved_once(tmp_path):
    torch.manual_seed(2)
    source = _Tied()
    path = tmp_path / "tied.safetensors"
    save_model(source, str(path))  # keeps one name of the tied pair
    target = _Tied()
    load_checkpoint(target, path)
    assert torch.equal(target.embed.weight, source.embed.weight)
    assert target.head.weight is target.embed.weight


def test_load_checkpoint_mismatch_lists_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_model({"builtin": "digits-cnn", "kwargs": {"width": 2, "hidden": 4}}).state_dict(), path)
    with pytest.raises(InputError) as info:
        load_checkpoint(_tiny_mlp(), path)
    message = str(info.value)
    assert str(path) in message
    assert "17 problems" in message  # 14 unexpected conv/BN keys + 3 shape mismatches in fc1/fc2
    assert "unexpected c1.weight" in message and "(and 12 more)" in message

    path2 = tmp_path / "shape.safetensors"
    save_file(build_model({"builtin": "digits-mlp", "kwargs": {"hidden": 5}}).state_dict(), str(path2))
    with pytest.raises(InputError, match=r"shape of fc1.weight: checkpoint \(5, 64\), model \(6, 64\)"):
        load_checkpoint(_tiny_mlp(), path2)


class Payload:
    """A custom class: pickling it into a checkpoint must not be loadable."""

    def __init__(self):
        self.ran = False


def test_load_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _tiny_mlp().state_dict(), "extra": Payload()}, path)
    with pytest.raises(InputError, match="holds more than tensors.*re-save it as a state_dict"):
        load_checkpoint(_tiny_mlp(), path)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InputError, match="garbage.pt: cannot read checkpoint"):
        load_checkpoint(_tiny_mlp(), garbage)
    garbage.write_bytes(b"")
    with pytest.raises(InputError, match="garbage.pt: cannot read checkpoint"):
        load_checkpoint(_tiny_mlp(), garbage)

    with pytest.raises(InputError, match=r"\.safetensors, \.pt, \.pth or \.bin"):
        load_checkpoint(_tiny_mlp(), tmp_path / "weights.npy")


def test_load_checkpoint_rejects_non_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(InputError, match="expected a state_dict"):
        load_checkpoint(_tiny_mlp(), path)
