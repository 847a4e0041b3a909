"""Structured pruning of decoder language models, driven by the blocks' known structure (no graph trace).

Torch-Pruning's dependency grouping takes minutes on a Llama-style model and cannot see GPT-2's `Conv1D`; but a
decoder block's couplings are known: an attention layer's heads are rows of its q/k/v projections and columns of
its output projection, and with grouped-query attention every key/value head serves a fixed group of query heads;
an MLP's intermediate channels are rows of gate/up (GPT-2: columns of c_fc) and columns of down (rows of c_proj).
This module finds the blocks of the Llama/Mistral/Qwen2 family and of GPT-2, removes whole heads (whole KV groups,
or the same number of query heads in every group), MLP width and whole blocks, and keeps the Hugging Face config
in step (`num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`, `num_hidden_layers`).

Every block is pruned alike, because a Hugging Face config holds one head count and one width for all of them.
Blocks are dropped and the config updated by the `decoder` edit (replayed when the artifact is loaded); the new
tensor shapes travel in the usual `resize` edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, StrictInt
from torch import nn

from compresspipe.artifacts.edits import MAX_DIM, EditKind, EditModel, get_submodule, set_submodule
from compresspipe.errors import ArtifactError, StageConfigError

Family = Literal["llama", "gpt2"]
# config keys the `decoder` edit may set: the sizes pruning changes, under each family's names
CONFIG_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
               "n_layer", "n_inner")
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
KNOWN = ("Llama/Mistral/Qwen2-style blocks (self_attn.q_proj/k_proj/v_proj/o_proj, mlp.gate_proj/up_proj/down_proj) "
         "and GPT-2 blocks (attn.c_attn/c_proj, mlp.c_fc/c_proj)")


@dataclass
class Block:
    """One decoder block: its name and the names of its attention and MLP modules."""

    name: str
    attention: str
    mlp: str


@dataclass
class Decoder:
    """Where a decoder LM keeps its blocks and its config, and their sizes."""

    family: Family
    root: str  # the transformers model holding `config`
    layers: str  # the ModuleList of blocks
    blocks: list[Block]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    config: Any = field(repr=False)

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _family(block: Any) -> tuple[Family, str, str] | None:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is not None and mlp is not None \
            and all(type(getattr(attn, n, None)) is nn.Linear for n in LLAMA_ATTENTION) \
            and all(type(getattr(mlp, n, None)) is nn.Linear for n in LLAMA_MLP):
        return "llama", "self_attn", "mlp"
    attn = getattr(block, "attn", None)
    if attn is not None and mlp is not None and all(_is_conv1d(getattr(attn, n, None)) for n in ("c_attn", "c_proj")) \
            and all(_is_conv1d(getattr(mlp, n, None)) for n in ("c_fc", "c_proj")) \
            and not getattr(attn, "is_cross_attention", False):
        return "gpt2", "attn", "mlp"
    return None


def _causal_lm(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The transformers causal LM inside `model` (itself or a wrapper's child), with its name: a class transformers
    lists as a causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...)."""
    import sys

    if "transformers" not in sys.modules:
        return None  # no transformers model can be inside
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "model_type") and type(module).__name__ in causal:
            return name, module
    return None


def find_decoder(model: nn.Module, stage: str) -> Decoder | None:
    """The decoder blocks of a Hugging Face causal LM, or None when the model is not one. A causal LM whose blocks
    are of no known layout is a StageConfigError naming its first block: tracing it would take minutes."""
    found = _causal_lm(model)
    if found is None:
        return None
    root, lm = found
    config = lm.config
    depth = getattr(config, "num_hidden_layers", None)
    for name, module in lm.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != depth or depth == 0:
            continue
        layers = f"{root}.{name}" if root else name
        kinds = [_family(b) for b in module]
        if kinds[0] is None or any(k != kinds[0] for k in kinds):
            bad = next(i for i, k in enumerate(kinds) if k is None or k != kinds[0])
            raise StageConfigError(stage, f"structured pruning of decoder LMs knows {KNOWN}; {layers}.{bad} "
                                          f"({type(module[bad]).__name__}) is neither. Use method: magnitude")
        family, attn_name, mlp_name = kinds[0]  # type: ignore[misc]
        blocks = [Block(f"{layers}.{i}", f"{layers}.{i}.{attn_name}", f"{layers}.{i}.{mlp_name}")
                  for i in range(len(module))]
        first: Any = module[0]
        if family == "llama":
            attn = first.self_attn
            head_dim = int(attn.head_dim)
            heads = attn.q_proj.out_features // head_dim
            kv_heads = attn.k_proj.out_features // head_dim
            intermediate = first.mlp.gate_proj.out_features
        else:
            attn = first.attn
            head_dim, heads = int(attn.head_dim), int(attn.num_heads)
            kv_heads = heads
            intermediate = first.mlp.c_fc.nf
        return Decoder(family, root, layers, blocks, heads, kv_heads, head_dim, intermediate, config)
    raise StageConfigError(stage, f"structured pruning of decoder LMs knows {KNOWN}; {type(lm).__name__} has no "
                                  f"list of {depth} blocks (config.num_hidden_layers). Use method: magnitude")


# -- what to keep ----------------------------------------------------------------------------------


@dataclass
class Sizes:
    """What one pruning step leaves: heads (with their KV heads), MLP width, which blocks."""

    heads: int
    kv_heads: int
    intermediate: int
    keep_blocks: list[int]


def target_sizes(dec: Decoder, heads: float, mlp: float, blocks: float, groups: str,
                 round_to: int | None) -> tuple[Sizes, list[str]]:
    """Sizes after removing the fractions asked for (never more than asked: counts round down), and notes."""
    notes: list[str] = []
    kv, q = dec.kv_heads, dec.heads
    if heads > 0:
        if groups == "whole" and kv > 1:
            kv = dec.kv_heads - min(int(heads * dec.kv_heads), dec.kv_heads - 1)
            q = kv * dec.group
        else:
            if groups == "whole":
                notes.append("one key/value head serves every query head: query heads are removed in its group")
            q = kv * (dec.group - min(int(heads * dec.group), dec.group - 1))
        if q == dec.heads:
            notes.append(f"heads: {heads} of {dec.kv_heads if groups == 'whole' and dec.kv_heads > 1 else dec.heads} "
                         "rounds down to no head removed")
    width = dec.intermediate - int(mlp * dec.intermediate)
    if round_to:
        width = min(dec.intermediate, math.ceil(width / round_to) * round_to)
    depth = len(dec.blocks)
    keep = depth - min(int(blocks * depth), depth - 1)
    return Sizes(q, kv, max(width, 1), list(range(keep))), notes


# -- scores --------------------------------------------------------------------------------------------

Scorer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _score(scorer: Scorer, w: torch.Tensor) -> torch.Tensor:
    return scorer(w.detach(), None if w.grad is None else w.grad.detach()).float()


def head_scores(dec: Decoder, attn: Any, scorer: Scorer) -> torch.Tensor:
    """Score of each query head, [kv_heads, group]: its q rows and its columns of the output projection, plus its
    KV head's share (k and v rows, split evenly among the group)."""
    if dec.family == "llama":
        q, k, v, o = (_score(scorer, m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    else:
        c_attn, c_proj = _score(scorer, attn.c_attn.weight).t(), _score(scorer, attn.c_proj.weight).t()
        split = attn.split_size
        q, k, v, o = c_attn[:split], c_attn[split:2 * split], c_attn[2 * split:], c_proj
    heads, kv, d = q.shape[0] // dec.head_dim, k.shape[0] // dec.head_dim, dec.head_dim
    per_q = q.reshape(heads, d, -1).sum((1, 2)) + o.reshape(o.shape[0], heads, d).sum((0, 2))
    per_kv = k.reshape(kv, d, -1).sum((1, 2)) + v.reshape(kv, d, -1).sum((1, 2))
    group = heads // kv
    return per_q.reshape(kv, group) + (per_kv / group)[:, None]


def mlp_scores(dec: Decoder, mlp: Any, scorer: Scorer) -> torch.Tensor:
    if dec.family == "llama":
        return (_score(scorer, mlp.gate_proj.weight).sum(1) + _score(scorer, mlp.up_proj.weight).sum(1)
                + _score(scorer, mlp.down_proj.weight).sum(0))
    return _score(scorer, mlp.c_fc.weight).sum(0) + _score(scorer, mlp.c_proj.weight).sum(1)


def block_influence(model: nn.Module, dec: Decoder, batches: Iterator[Any], forward: Callable[[Any], Any]
                    ) -> list[float]:
    """Per block, how much it changes its input: 1 - the mean cosine similarity of the hidden states it receives
    and returns, over the tokens of a few batches (ShortGPT's block influence; the blocks that change least go)."""
    layers: Any = get_submodule(model, dec.layers)
    sums = [0.0] * len(layers)
    count = 0
    seen: dict[int, torch.Tensor] = {}
    hooks = []

    def before(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
            h = out[0] if isinstance(out, tuple | list) else out
            cos = nn.functional.cosine_similarity(seen[i].float(), h.float(), dim=-1)
            sums[i] += float((1 - cos).mean())
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        hooks.append(layer.register_forward_hook(after(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for x in batches:
                forward(x)
                count += 1
    finally:
        for h in hooks:
            h.remove()
    return [s / max(count, 1) for s in sums]


# -- surgery ---------------------------------------------------------------------------------------------


def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.detach().clone().contiguous(), requires_grad=old.requires_grad)


def _linear_out(layer: Any, keep: torch.Tensor) -> None:
    layer.weight = _param(layer.weight, layer.weight[keep])
    if layer.bias is not None:
        layer.bias = _param(layer.bias, layer.bias[keep])
    layer.out_features = len(keep)


def _linear_in(layer: Any, keep: torch.Tensor) -> None:
    layer.weight = _param(layer.weight, layer.weight[:, keep])
    layer.in_features = len(keep)


def _conv1d_out(layer: Any, keep: torch.Tensor) -> None:
    layer.weight = _param(layer.weight, layer.weight[:, keep])
    layer.bias = _param(layer.bias, layer.bias[keep])
    layer.nf = len(keep)


def _conv1d_in(layer: Any, keep: torch.Tensor) -> None:
    layer.weight = _param(layer.weight, layer.weight[keep])
    layer.nx = len(keep)


def _rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def prune_attention(dec: Decoder, attn: Any, sizes: Sizes, scorer: Scorer) -> None:
    """Keep the best `sizes.kv_heads` KV groups (whole-group mode) or the best heads of every group."""
    scores = head_scores(dec, attn, scorer)  # [kv, group]
    kv, group = scores.shape
    new_group = sizes.heads // sizes.kv_heads
    if (sizes.kv_heads, new_group) == (kv, group):
        return
    keep_kv = torch.sort(torch.topk(scores.sum(1), sizes.kv_heads, largest=True).indices).values
    picked = scores[keep_kv]
    keep_in_group = torch.sort(torch.topk(picked, new_group, dim=1).indices, dim=1).values
    q_heads = (keep_kv[:, None] * group + keep_in_group).reshape(-1)
    d = dec.head_dim
    if dec.family == "llama":
        _linear_out(attn.q_proj, _rows(q_heads, d))
        _linear_out(attn.k_proj, _rows(keep_kv, d))
        _linear_out(attn.v_proj, _rows(keep_kv, d))
        _linear_in(attn.o_proj, _rows(q_heads, d))
        attn.num_key_value_groups = new_group
        for name in ("num_heads", "num_attention_heads"):
            if type(getattr(attn, name, None)) is int:
                setattr(attn, name, sizes.heads)
        if type(getattr(attn, "num_key_value_heads", None)) is int:
            attn.num_key_value_heads = sizes.kv_heads
    else:
        split = attn.split_size
        rows = _rows(q_heads, d)
        _conv1d_out(attn.c_attn, torch.cat([rows, rows + split, rows + 2 * split]))
        _conv1d_in(attn.c_proj, rows)
        attn.split_size = len(rows)
        attn.num_heads = sizes.heads


def prune_mlp(dec: Decoder, mlp: Any, width: int, scorer: Scorer) -> None:
    scores = mlp_scores(dec, mlp, scorer)
    if width >= len(scores):
        return
    keep = torch.sort(torch.topk(scores, width).indices).values
    if dec.family == "llama":
        _linear_out(mlp.gate_proj, keep)
        _linear_out(mlp.up_proj, keep)
        _linear_in(mlp.down_proj, keep)
        if type(getattr(mlp, "intermediate_size", None)) is int:
            mlp.intermediate_size = width
    else:
        _conv1d_out(mlp.c_fc, keep)
        _conv1d_in(mlp.c_proj, keep)


def config_changes(dec: Decoder, sizes: Sizes) -> dict[str, int]:
    """The Hugging Face config values of the pruned model (GPT-2 cannot state fewer heads: see notes)."""
    if dec.family == "llama":
        return {"num_hidden_layers": len(sizes.keep_blocks), "num_attention_heads": sizes.heads,
                "num_key_value_heads": sizes.kv_heads, "head_dim": dec.head_dim,
                "intermediate_size": sizes.intermediate}
    return {"n_layer": len(sizes.keep_blocks), "n_inner": sizes.intermediate}


# -- the `decoder` edit: drop blocks, set the config ---------------------------------------------


class DecoderEdit(EditModel):
    """{"kind": "decoder", "version": 1, "model": name, "layers": name, "keep": [block index, ...],
    "config": {key: int}}: keep these blocks of the ModuleList `layers` (renumbered from 0), and set these sizes
    in the config of the transformers model `model`."""

    model: str
    layers: str
    keep: list[StrictInt] = Field(max_length=100_000)
    config: dict[str, StrictInt] = Field(default_factory=dict)


def decoder_edit(dec: Decoder, sizes: Sizes) -> dict[str, Any]:
    return {"kind": "decoder", "version": DECODER.version, "model": dec.root, "layers": dec.layers,
            "keep": list(sizes.keep_blocks), "config": config_changes(dec, sizes)}


def _apply_decoder(model: nn.Module, edit: DecoderEdit) -> nn.Module:
    lm = get_submodule(model, edit.model)
    config = getattr(lm, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise ArtifactError(f"decoder edit names {edit.model!r}, which has no Hugging Face config")
    layers: Any = get_submodule(model, edit.layers)
    if not isinstance(layers, nn.ModuleList):
        raise ArtifactError(f"decoder edit names {edit.layers!r}, which is not a list of blocks")
    keep = edit.keep
    if not keep or sorted(set(keep)) != keep or keep[-1] >= len(layers) or keep[0] < 0:
        raise ArtifactError(f"decoder edit keeps blocks {keep[:8]}: they must be increasing indices below "
                            f"{len(layers)}, at least one")
    for key, value in edit.config.items():
        if key not in CONFIG_KEYS:
            raise ArtifactError(f"decoder edit sets config.{key}; it may set {', '.join(CONFIG_KEYS)}")
        if not 0 < value <= MAX_DIM:
            raise ArtifactError(f"decoder edit sets config.{key} to {value}, out of range")
    depth = len(layers)
    for key, value in edit.config.items():
        setattr(config, key, value)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == depth:
        config.layer_types = [types[i] for i in keep]
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, block in enumerate(kept):
        for module in block.modules():  # the KV cache is indexed by layer_idx
            if type(getattr(module, "layer_idx", None)) is int:
                setattr(module, "layer_idx", new_index)  # noqa: B010
    return set_submodule(model, edit.layers, kept)


DECODER = EditKind("decoder", 1, DecoderEdit, _apply_decoder)
