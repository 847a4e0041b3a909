"""Hugging Face transformers models: built from a config (never downloaded), behind a plain forward.

`HFModel` wraps a transformers model so that the rest of compresspipe sees what it sees everywhere: named
tensors in (the inputs spec), one logits tensor out. The Auto class follows the recipe's task. Configs are
checked before use (`recipe.spec.check_hf_config`): no remote code, no quantization backends, no hub kernels.
Weights come from the folder's safetensors (sharded or not) or a `.bin` read with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresspipe.errors import InputError
from compresspipe.recipe.spec import HF_AUTO_CLASSES, check_hf_config, hf_task, hf_unsupported

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class HFModel(nn.Module):
    """A transformers model with a plain forward: the inputs spec's tensors in, the logits tensor out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                ) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "pixel_values": pixel_values}
        out = self.model(**{k: v for k, v in given.items() if v is not None}, return_dict=True)
        return out.logits  # type: ignore[no-any-return]


class HFVisionModel(HFModel):
    """An image model: one positional tensor (pixel_values) in, as every image dataset gives it."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(pixel_values=pixel_values, return_dict=True).logits  # type: ignore[no-any-return]


def _config_object(config: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = {k: v for k, v in {**config, **kwargs}.items() if k not in ("transformers_version", "_name_or_path")}
    check_hf_config(data)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"Hugging Face config of model_type {model_type!r}: {exc}") from None


def resolve_config(source: Any, kwargs: dict[str, Any], task: str, num_labels: int | None,
                   classes: list[str] | None) -> dict[str, Any]:
    """The complete config an artifact records: the folder's or given config, kwargs applied, and the label count
    and names from the data where the config does not fix them."""
    config = dict(read_folder_config(Path(source)) if isinstance(source, str) else source["config"])
    fixed = any(k in config or k in kwargs for k in ("num_labels", "id2label"))
    obj = _config_object(config, kwargs)
    if task == "regression":
        obj.problem_type = "regression"
    if task != "language_modeling" and num_labels is not None and (not fixed or classes):
        names = classes if classes and len(classes) == num_labels else [f"LABEL_{i}" for i in range(num_labels)]
        if not fixed or obj.num_labels == num_labels:
            obj.id2label = dict(enumerate(names))
            obj.label2id = {n: i for i, n in enumerate(names)}
    data = obj.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        data.pop(key, None)
    return json.loads(json.dumps(data))  # plain JSON (int keys of id2label become strings)


def read_folder_config(folder: Path) -> dict[str, Any]:
    from compresspipe.recipe.spec import read_hf_folder

    try:
        return read_hf_folder(folder)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def build(source: Any, kwargs: dict[str, Any], task: str) -> HFModel:
    """A freshly initialised model from a config mapping (`{"config": {...}}`) or a local folder's config.json."""
    import transformers

    config = read_folder_config(Path(source)) if isinstance(source, str) else source["config"]
    obj = _config_object(config, kwargs)
    obj._attn_implementation = getattr(obj, "_attn_implementation", None) or "eager"
    which = hf_task(task, obj.model_type)
    why = hf_unsupported(task, obj.model_type)
    if why:
        raise InputError(why)
    auto = getattr(transformers, HF_AUTO_CLASSES[which])
    try:
        model = auto.from_config(obj, attn_implementation=obj._attn_implementation)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(f"cannot build {HF_AUTO_CLASSES[which]} for {obj.model_type!r}: {exc}") from None
    model.eval()
    return HFVisionModel(model) if which == "image_classification" else HFModel(model)


def folder_weights(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: safetensors (sharded or not), else a .bin (read without
    unpickling objects); empty when the folder holds a config only."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{index}: not a safetensors index ({exc})") from None
        paths = [folder / s for s in shards]
        for p in paths:
            if p.parent != folder or not p.is_file():
                raise InputError(f"{index} names shard {p.name!r}, which is not a file in {folder}")
        return paths
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return []


def load_folder_weights(model: HFModel, folder: Path) -> list[str]:
    """Load the folder's weights into `model` strictly, except a task head the folder does not have (a backbone
    checkpoint fine-tuned for a new task): those layers stay freshly initialised. Returns notes."""
    from compresspipe.models.factory import check_state, read_state

    files = folder_weights(folder)
    if not files:
        return [f"{folder} holds no weights (model.safetensors): the model starts from random weights"]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_state(path))
    inner = model.model
    prefix = getattr(inner, "base_model_prefix", "")
    expected = inner.state_dict()
    if prefix and not any(k.startswith(prefix + ".") for k in state) and any(k.startswith(prefix + ".")
                                                                              for k in expected):
        state = {f"{prefix}.{k}": v for k, v in state.items()}  # saved from the bare base model
    head = [k for k in expected if k not in state and not (prefix and k.startswith(prefix + "."))]
    check_state(inner, {**{k: expected[k] for k in head}, **state}, folder)
    inner.load_state_dict({**{k: expected[k] for k in head}, **state}, strict=True)
    if head:
        return [f"{folder}: no weights for the task head ({', '.join(sorted(head)[:4])}"
                f"{' ...' if len(head) > 4 else ''}); it starts from random weights"]
    return []
