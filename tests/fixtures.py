"""Tiny recipes and models shared by the tests (one place, not copied per file)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

    from compresspipe.artifacts.model import ModelState

# Small enough for a whole run in a couple of seconds on 2 cores.
TINY_RECIPE: dict[str, Any] = {
    "compresspipe": 1,
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 32}, "input_shape": [1, 8, 8]},
    "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2, "max_samples": 600},
    "evaluate": {"latency": {"batch_sizes": [1, 8], "warmup": 1, "iters": 3, "threads": 1}},
    "stages": [{"type": "train", "epochs": 2, "lr": 3.0e-3}],
}


SMALL_CNN: dict[str, Any] = {"builtin": "digits-cnn", "kwargs": {"width": 8, "hidden": 32}}
CNN: dict[str, Any] = {**SMALL_CNN, "input_shape": [1, 8, 8]}  # the small CNN as a recipe's model block


def run(folder: Path, recipe: dict[str, Any], out: str = "run", **options: Any) -> Any:
    """Run a recipe in-process into folder/out (the executor as the CLI calls it); returns its RunResult."""
    from compresspipe.recipe import load_recipe
    from compresspipe.run.executor import RunOptions, run_recipe
    from compresspipe.ui import UI

    path = write_recipe(folder, recipe, f"{out}.yaml")
    parsed = load_recipe(path, allow_code=bool(options.get("allow_code")))
    return run_recipe(parsed, path, RunOptions(out=folder / out, **options), UI(quiet=True))


def cli(*args: Any) -> Any:
    """`compresspipe ARGS` through the real app (typer's CliRunner); returns the click Result."""
    from typer.testing import CliRunner

    from compresspipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@functools.cache
def _trained_weights() -> dict[str, torch.Tensor]:
    """digits-cnn (small) trained briefly, once per session: int8 agreement needs a model with clear margins."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from compresspipe.models.factory import build_model

    torch.manual_seed(0)
    module = build_model(SMALL_CNN)
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(2):
        for i in range(0, len(x), 256):
            opt.zero_grad()
            nn.functional.cross_entropy(module(x[i:i + 256]), y[i:i + 256]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def trained_cnn() -> ModelState:
    """The small digits-cnn with trained weights (clear margins, so int8 agreement is meaningful)."""
    from compresspipe.artifacts.model import ModelState
    from compresspipe.models.factory import build_model

    module = build_model(SMALL_CNN)
    module.load_state_dict(_trained_weights())
    return ModelState(module.eval(), dict(SMALL_CNN), (1, 8, 8), 10)


def digits_cnn_recipe() -> dict:
    """tiny_recipe on the small digits-cnn, no stages."""
    recipe = tiny_recipe(model={**SMALL_CNN, "input_shape": [1, 8, 8]}, stages=[])
    recipe["data"]["eval_batch_size"] = 64
    return recipe


def stage_context(folder: Path, recipe: dict[str, Any], name: str = "stage", index: int = 1,
                  history: dict[str, Any] | None = None, input_metrics: dict[str, Any] | None = None,
                  stage_dir: Path | None = None) -> tuple[Any, Any]:
    """(validated recipe, StageContext) as the executor builds them, for running one stage directly."""
    import torch

    from compresspipe.data.config import text_target
    from compresspipe.data.sources import load_data
    from compresspipe.recipe import load_recipe
    from compresspipe.stages.context import StageContext
    from compresspipe.ui import UI

    folder.mkdir(parents=True, exist_ok=True)
    parsed = load_recipe(write_recipe(folder, recipe, f"{name}-context.yaml"))
    shape = tuple(parsed.model.input_shape) if parsed.model.input_shape else None
    data = load_data(text_target(parsed.data, parsed.task), parsed.seed, shape, parsed.task)  # as the executor does
    ctx = StageContext(recipe=parsed, index=index, name=name, stage_dir=stage_dir or folder,
                       device=torch.device("cpu"), seed=parsed.seed + index, data=data, ui=UI(quiet=True),
                       history=history or {}, input_metrics=input_metrics or {})
    return parsed, ctx


def tiny_recipe(**changes: Any) -> dict[str, Any]:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe.update(changes)
    return recipe


def write_recipe(folder: Path, data: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def install_plugin(folder: Path, module: str, code: str, entry_points: str) -> dict[str, str]:
    """A plugin package on disk (module + dist-info with entry points); returns the env to see it."""
    import os

    (folder / f"{module}.py").write_text(code)
    dist = folder / f"{module}-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    env = {k: v for k, v in os.environ.items() if k != "COMPRESSPIPE_NO_PLUGINS"}
    env["PYTHONPATH"] = str(folder)
    return env


# A BERT-style classifier small enough for a whole run in seconds (2 layers, hidden 32, 2 heads).
TINY_BERT: dict[str, Any] = {"model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}
TINY_TEXT_DATA: dict[str, Any] = {"dataset": "synthetic-text", "vocab_size": 64, "seq_len": 16, "num_classes": 2,
                                  "samples": 256, "batch_size": 32, "eval_batch_size": 64}


def text_recipe(**changes: Any) -> dict[str, Any]:
    """tiny_recipe on a tiny Hugging Face BERT built from a config, trained on synthetic-text."""
    recipe = tiny_recipe(name="text", task="sequence_classification",
                         model={"huggingface": {"config": dict(TINY_BERT)}}, data=dict(TINY_TEXT_DATA),
                         stages=[{"type": "train", "epochs": 2, "lr": 3.0e-3}])
    recipe.update(changes)
    return recipe


TINY_VIT_TIMM: dict[str, Any] = {"timm": "vit_tiny_patch16_224",
                                 "kwargs": {"img_size": 16, "patch_size": 4, "depth": 2, "num_heads": 2,
                                            "embed_dim": 32, "num_classes": 10}}
TINY_VIT_HF: dict[str, Any] = {"model_type": "vit", "image_size": 16, "patch_size": 4, "num_channels": 1,
                               "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 64}

# A local nn.Module built by a factory in a file (the `python:` source), as a user would write one.
USER_MODEL = '''
import torch
from torch import nn


class Tagger(nn.Module):
    """Token ids and a mask in, class logits out: a small model of the user's own."""

    def __init__(self, vocab: int = 64, width: int = 16, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        h = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1)
        return self.head(torch.relu(self.fc1(h)))


def build(**kwargs):
    return Tagger(**kwargs)
'''

# A small CNN of the user's own (conv, batch norm, pooling, a linear head) for image data.
USER_CNN = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, channels: int = 1, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(x)


def build(**kwargs):
    return Net(**kwargs)
'''
