"""ONNX files of causal language models that generate: a key/value cache in and out of every call.

A Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2, ...) is exported with the inputs and outputs Optimum's
ORTModelForCausalLM and ONNX Runtime GenAI name them:

  inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64 (1 = token, 0 = padding),
           position_ids [batch, seq] int64 (each token's position among the real tokens: the mask's running
           count - 1), past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] float
  outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

Every axis but kv_heads and head_dim is dynamic; the first call passes a cache of length 0 (prefill), each later
call the last token and the cache the previous call returned (decode). Positions come from the mask, as Optimum
computes them, so a batch of prompts of different lengths is padded on the left (the mask's zeros first) and
generates as each prompt would alone. Files written before position_ids was an input take positions from the
cache length: right padding only; every helper here feeds whichever inputs the file has.

`KVSession` lets the rest of compresspipe (verification, perplexity, timing) run such a file as if it had no
cache: it feeds an empty one. `greedy` and `decode_speed` drive the cache as a generation loop does.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
EXPORT_PAST = 3  # cache length of the example the exporter traces (0 and 1 would be specialised)


def language_model(module: nn.Module, task: str) -> nn.Module | None:
    """The transformers causal LM inside a compresspipe model (HFModel.model), when it can take a cache."""
    inner = getattr(module, "model", None)
    if task != "language_modeling" or inner is None or not hasattr(inner, "config") or not hasattr(inner, "generate"):
        return None
    return inner


def cache_layout(lm: nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's cache, read off one tiny call (any attention layout: GQA, GPT-2)."""
    device = next(lm.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, return_dict=True)
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in out.past_key_values.layers]


class KVCacheLM(nn.Module):
    """forward(input_ids, attention_mask, past) -> (logits, present...): the cache as flat tensors."""

    def __init__(self, lm: nn.Module, layers: int):
        super().__init__()
        # `model`, as in HFModel: the exported nodes carry the PyTorch layer names (model.model.layers.0...)
        self.model, self.layers = lm, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        flat: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def names(layers: int) -> tuple[list[str], list[str]]:
    past = [PAST.format(i, kv) for i in range(layers) for kv in ("key", "value")]
    present = [PRESENT.format(i, kv) for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def positions(mask: np.ndarray, seq: int) -> np.ndarray:
    """position_ids of the last `seq` tokens: each real token's index among the real tokens of its row (the mask's
    running count - 1, as Optimum and transformers' generate compute it). Padding keeps its column index: no real
    token attends to it, and right-padded rows get exactly the positions PyTorch gives them without the input."""
    column = np.broadcast_to(np.arange(mask.shape[-1]), mask.shape)
    pos = np.where(mask != 0, np.cumsum(mask, axis=-1) - 1, column)
    return pos[:, -seq:].astype(np.int64)


def takes_positions(raw: Any) -> bool:
    """Whether the file has a position_ids input (files written before it had none)."""
    return any(i.name == "position_ids" for i in raw.get_inputs())


def token_feed(raw: Any, ids: np.ndarray, mask: np.ndarray, positioned: bool | None = None) -> dict[str, np.ndarray]:
    """The token inputs of a call: position_ids too when the file takes them (`positioned`: known already, as in a
    loop that asks once)."""
    out = {"input_ids": ids, "attention_mask": mask}
    if takes_positions(raw) if positioned is None else positioned:
        out["position_ids"] = positions(mask, ids.shape[1])
    return out


def export_kv(lm: nn.Module, path: Path, opset: int, batch: int, seq: int,
              external_data: bool = False) -> dict[str, str]:
    """Write `path` with a cache; returns the metadata that describes it."""
    from torch.export import Dim

    layout = cache_layout(lm)
    layers = len(layout)
    wrapper = KVCacheLM(lm, layers).eval()
    dtype = next((p.dtype for p in lm.parameters() if p.is_floating_point()), torch.float32)
    ids = torch.randint(0, 2, (batch, seq))
    mask = torch.ones(batch, EXPORT_PAST + seq, dtype=torch.long)
    pos = torch.arange(EXPORT_PAST, EXPORT_PAST + seq).expand(batch, seq).contiguous()
    past = tuple(torch.zeros(batch, heads, EXPORT_PAST, dim, dtype=dtype) for heads, dim in layout for _ in range(2))
    b, s, p, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    shapes = ({0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    inputs, outputs = names(layers)
    torch.onnx.export(wrapper, (ids, mask, pos, past), str(path), dynamo=True, verbose=False, opset_version=opset,
                      input_names=inputs, output_names=outputs, dynamic_shapes=shapes, external_data=external_data)
    config = lm.config
    special = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    import json

    return {"compresspipe.kv_cache": json.dumps({
        "layout": "optimum", "layers": layers, "kv_heads": [h for h, _ in layout], "head_dim": [d for _, d in layout],
        "inputs": "input_ids, attention_mask, position_ids, past_key_values.{i}.key/value [batch, kv_heads, past, "
                  "head_dim]",
        "outputs": "logits, present.{i}.key/value", "padding": "left or right (position_ids follow the mask)"}),
        "compresspipe.vocab_size": str(getattr(config, "vocab_size", "")),
        "compresspipe.special_tokens": json.dumps({k: v for k, v in special.items() if v is not None})}


def has_cache(sess: Any) -> bool:
    return any(i.name.startswith("past_key_values.") for i in sess.get_inputs())


def empty_cache(sess: Any, batch: int) -> dict[str, np.ndarray]:
    """A cache of length 0 for every past input of the session (prefill)."""
    out = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            out[i.name] = np.zeros((batch, int(i.shape[1]), 0, int(i.shape[3])), dtype=dtype)
    return out


class KVSession:
    """An ONNX Runtime session of a file with a cache, run as if it had none: every call is a prefill (an empty
    cache is fed; the logits come back first). `raw` is the session itself."""

    def __init__(self, raw: Any):
        self.raw = raw  # what the caller feeds: the token inputs (position_ids follow from the mask, added here)
        self._inputs = [i for i in raw.get_inputs() if not i.name.startswith("past_key_values.")
                        and i.name != "position_ids"]

    def get_inputs(self) -> list[Any]:
        return self._inputs

    def get_outputs(self) -> list[Any]:
        return self.raw.get_outputs()[:1]

    def get_modelmeta(self) -> Any:
        return self.raw.get_modelmeta()

    def run(self, output_names: Any, feed: dict[str, Any]) -> list[Any]:
        ids = feed["input_ids"]
        mask = feed.get("attention_mask", np.ones_like(ids))
        tokens = {**token_feed(self.raw, ids, mask), **feed}
        return list(self.raw.run(["logits"], {**tokens, **empty_cache(self.raw, int(ids.shape[0]))}))


def _step(raw: Any, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray],
          positioned: bool | None = None) -> tuple[np.ndarray, dict]:
    outs = raw.run(None, {**token_feed(raw, ids, mask, positioned), **past})
    names_out = [o.name for o in raw.get_outputs()]
    present = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names_out[1:], outs[1:], strict=True)}
    return outs[0], present


def greedy(raw: Any, prompt: np.ndarray, tokens: int) -> list[int]:
    """Greedy decoding of `tokens` tokens after `prompt` ([1, P] int64) through the cache, as a generation loop."""
    ids, mask = prompt.astype(np.int64), np.ones_like(prompt, dtype=np.int64)
    past = empty_cache(raw, 1)
    positioned = takes_positions(raw)
    out: list[int] = []
    for _ in range(tokens):
        logits, past = _step(raw, ids, mask, past, positioned)
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        ids = np.array([[nxt]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    return out


def greedy_torch(module: nn.Module, prompt: torch.Tensor, tokens: int) -> list[int]:
    """The same decoding by the PyTorch model, each step on the whole sequence (no cache: the reference)."""
    from compresspipe.models.inputs import forward

    seq = prompt.clone()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(tokens):
            logits = forward(module, {"input_ids": seq, "attention_mask": torch.ones_like(seq)})
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]], dtype=seq.dtype)], dim=1)
    return out


def _vocab(raw: Any) -> int:
    """The vocabulary size the session's logits declare (2 when the axis is symbolic): token ids to feed."""
    size = raw.get_outputs()[0].shape[2]
    return int(size) if isinstance(size, int) else 2


DECODE_PROMPT = 32  # tokens already in the cache when the deploy timer times a decode step


class DecodeStep:
    """One decode step at `batch` through a cache that already holds `prompt` tokens: what a generation loop
    repeats for every new token. The deploy timer times this call for files with a key/value cache, so their
    latency (and speedup, recommendation, min_speedup gate) is per generated token, not a whole-sequence pass."""

    def __init__(self, raw: Any, batch: int, prompt: int = DECODE_PROMPT):
        ids = np.random.default_rng(0).integers(0, _vocab(raw), (batch, prompt)).astype(np.int64)
        logits, past = _step(raw, ids, np.ones_like(ids), empty_cache(raw, batch))
        self.raw = raw
        self.per_token_after = prompt  # how the deploy timer tells a decode step from a forward
        nxt = logits[:, -1].argmax(-1).astype(np.int64).reshape(batch, 1)
        # the whole feed is built once: the timer times ONNX Runtime's call, not the Python that prepares it
        self.feed = {**token_feed(raw, nxt, np.ones((batch, prompt + 1), dtype=np.int64)), **past}

    def __call__(self) -> Any:
        return self.raw.run(None, self.feed)


def decode_speed(raw: Any, batch: int, prompt: int, tokens: int, rounds: int = 3) -> dict[str, float]:
    """Tokens per second at this batch size: prefill of `prompt` tokens, then `tokens` decode steps, each through
    the cache (median over rounds; every sequence of the batch counts)."""
    rng = np.random.default_rng(0)
    vocab, positioned = _vocab(raw), takes_positions(raw)
    prefill, decode = [], []
    for _ in range(rounds):
        ids = rng.integers(0, vocab, (batch, prompt)).astype(np.int64)
        mask = np.ones_like(ids)
        t0 = time.perf_counter()
        logits, past = _step(raw, ids, mask, empty_cache(raw, batch), positioned)
        t1 = time.perf_counter()
        for _ in range(tokens):
            nxt = logits[:, -1].argmax(-1).astype(np.int64).reshape(batch, 1)
            mask = np.ones((batch, mask.shape[1] + 1), dtype=np.int64)
            logits, past = _step(raw, nxt, mask, past, positioned)
        t2 = time.perf_counter()
        prefill.append(batch * prompt / (t1 - t0))
        decode.append(batch * tokens / (t2 - t1))
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode)}
