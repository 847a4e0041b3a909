"""Peak resident memory of a language model's ONNX file as it generates, measured in a process of its own.

A process's peak resident set (`VmHWM`) only grows, so a figure per file cannot come from the compresspipe
process that has loaded PyTorch, the training data and other files before. A child process that imports only
ONNX Runtime and numpy records its resident memory (`runtime_mib`: the runtime's own), loads the file, runs a
prefill of `prompt` tokens and `tokens` decode steps through the key/value cache at `batch`, and reports its peak
(`peak_mib`): what a box that ships this file needs, the runtime included. `file_mib` is the difference: the
weights, ONNX Runtime's buffers and the cache. Linux only (`/proc/self/status`); elsewhere the figure is None.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)

path, batch, threads, prompt, tokens = sys.argv[1], *map(int, sys.argv[2:6])
runtime = status("VmRSS:")
options = ort.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
inputs = sess.get_inputs()
vocab = sess.get_outputs()[0].shape[2]
vocab = vocab if isinstance(vocab, int) else 2
past = {i.name: np.zeros((batch, int(i.shape[1]), 0, int(i.shape[3])),
                         np.float16 if i.type == "tensor(float16)" else np.float32)
        for i in inputs if i.name.startswith("past_key_values.")}
ids = np.random.default_rng(0).integers(0, vocab, (batch, prompt)).astype(np.int64)
mask = np.ones_like(ids)
names = [o.name for o in sess.get_outputs()]
positioned = any(i.name == "position_ids" for i in inputs)
for _ in range(tokens + 1):
    feed = {"input_ids": ids, "attention_mask": mask, **past}
    if positioned:  # no padding here: positions run from the cache length
        feed["position_ids"] = np.arange(mask.shape[1] - ids.shape[1], mask.shape[1], dtype=np.int64)[None].repeat(batch, 0)
    outs = sess.run(None, feed)
    past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], outs[1:])}
    ids = outs[0][:, -1].argmax(-1).astype(np.int64).reshape(batch, 1)
    mask = np.ones((batch, mask.shape[1] + 1), dtype=np.int64)
print(json.dumps({"runtime_mib": runtime, "peak_mib": status("VmHWM:")}))
"""

TIMEOUT_S = 300.0


def peak_memory(path: Path, batch: int, threads: int, prompt: int = 32, tokens: int = 16,
                timeout: float = TIMEOUT_S) -> dict[str, float] | None:
    """{"peak_mib", "runtime_mib", "file_mib"} of generating with the file at `batch`; None where it cannot be
    measured (not Linux, or the child failed: the caller says so rather than guessing a figure)."""
    if not Path("/proc/self/status").exists():
        return None
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(batch), str(threads), str(prompt),
                               str(tokens)], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
        peak, runtime = float(out["peak_mib"]), float(out["runtime_mib"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return {"peak_mib": peak, "runtime_mib": runtime, "file_mib": max(0.0, peak - runtime)}
