"""Blocks that train with parallel branches, written folded (models.reparam) vs as trained: the float ONNX file
of timm's MobileOne-S0, RepGhost 0.5x and RepVGG-A0 (random init, 3x224x224, batch 1, one thread), timed
interleaved in ONNX Runtime in one process. Both files compute the same function; the ratio is what folding buys.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TITLE = "reparameterizable models: the float ONNX file folded vs as trained, ONNX Runtime, batch 1, one thread"
MODELS = ["mobileone_s0", "repghostnet_050", "repvgg_a0"]
ROUNDS, ITERS = 9, 5


def run() -> list[dict[str, Any]]:
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch

    from compresspipe.models.reparam import inference_form

    rows = []
    with tempfile.TemporaryDirectory(prefix="cp-bench-reparam-") as tmp:
        for name in MODELS:
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=1000).eval()
            folded, count = inference_form(model)
            x = torch.randn(1, 3, 224, 224)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            sessions = {}
            for tag, module in (("trained", model), ("folded", folded)):
                path = Path(tmp) / f"{name}.{tag}.onnx"
                torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["input"],
                                  output_names=["logits"], opset_version=17)
                sessions[tag] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"input": x.numpy()}
            out = {t: s.run(None, feed)[0] for t, s in sessions.items()}
            times: dict[str, list[float]] = {t: [] for t in sessions}
            for _ in range(ROUNDS):  # interleaved: load on the machine hits both alike
                for tag, sess in sessions.items():
                    sess.run(None, feed)
                    t0 = time.perf_counter()
                    for _ in range(ITERS):
                        sess.run(None, feed)
                    times[tag].append((time.perf_counter() - t0) / ITERS * 1000)
            ratios = [a / b for a, b in zip(times["trained"], times["folded"], strict=True)]
            rows.append({
                "case": name, "blocks folded": count,
                "trained ms": statistics.median(times["trained"]), "folded ms": statistics.median(times["folded"]),
                "speedup x": statistics.median(ratios),
                "max |diff| rel": float(np.abs(out["trained"] - out["folded"]).max()
                                        / max(1e-12, float(np.abs(out["trained"]).max()))),
            })
    return rows
