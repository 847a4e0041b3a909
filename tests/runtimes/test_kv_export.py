"""Causal LMs export to ONNX files that generate: a key/value cache in and out (Optimum's names), greedy decoding
through the cache gives PyTorch's tokens, and the file says what a runtime needs (vocabulary, special tokens,
cache layout, maximum length)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.fixtures import run, tiny_recipe
from tests.stages.test_prune_decoder import LM_DATA, TINY_GPT2, TINY_LLAMA

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("config, kv_heads", [(TINY_LLAMA, 2), (TINY_GPT2, 4)], ids=["llama-gqa", "gpt2"])
def test_an_lm_onnx_file_has_a_cache_and_generates_what_pytorch_does(tmp_path, config, kv_heads):
    import onnxruntime as ort

    from compresspipe.artifacts.model import load_model
    from compresspipe.runtimes.kv_cache import greedy, greedy_torch

    # deploy torch: the export stage writes the one ONNX file this test reads
    recipe = tiny_recipe(name="kv", task="language_modeling", model={"huggingface": {"config": dict(config)}},
                         data=dict(LM_DATA), deploy={"runtime": "torch"},
                         stages=[{"type": "export", "formats": ["onnx"]}])
    result = run(tmp_path, recipe)
    path = tmp_path / "run" / "01-export" / "export" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert inputs["past_key_values.0.key"][1] == kv_heads and isinstance(inputs["past_key_values.0.key"][2], str)
    assert [o.name for o in sess.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["compresspipe.kv_cache"])["layers"] == layers
    assert meta["compresspipe.vocab_size"] == "128" and meta["compresspipe.max_sequence_length"] == "64"
    mask = next(i for i in json.loads(meta["compresspipe.inputs"]) if i["name"] == "attention_mask")
    assert mask["range"] == [0, 2]  # values 0 and 1 ([low, high)), not "always 1"
    # the export stage checked generation; so does this test, with prompts of its own
    row = result.report["stages"][-1]
    assert any("greedy decoding through its key/value cache: 2 of 2" in n for n in row["notes"]), row["notes"]
    module = load_model(tmp_path / "run" / "01-export").module.eval()
    prompt = torch.tensor([[5, 17, 33, 2, 90, 41]])
    assert greedy(sess, prompt.numpy(), 10) == greedy_torch(module, prompt, 10)
    # prefill and the first decode step agree with the whole-sequence logits
    ids = np.array([[5, 17, 33, 2]], dtype=np.int64)
    full = torch.from_numpy(sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                                  "position_ids": np.arange(4)[None], **_empty(sess)})[0])
    with torch.no_grad():
        ref = module(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert torch.allclose(full, ref, atol=1e-4)
    _left_padded_batch_generates_as_each_prompt_alone(sess)


def _left_padded_batch_generates_as_each_prompt_alone(sess):
    """Prompts of different lengths in one batch, padded on the left: prefill and three decode steps give each row
    the logits it gets alone (positions follow the mask, not the cache length)."""
    from compresspipe.runtimes.kv_cache import _step, empty_cache

    prompts = [[5, 17, 33, 2, 90, 41], [7, 3]]
    alone = []
    for p in prompts:
        ids, mask, past, rows = np.array([p]), np.ones((1, len(p)), dtype=np.int64), empty_cache(sess, 1), []
        for _ in range(4):
            logits, past = _step(sess, ids, mask, past)
            rows.append(logits[0, -1])
            ids = np.array([[int(logits[0, -1].argmax())]])
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        alone.append(rows)
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    past = empty_cache(sess, 2)
    for step in range(4):
        logits, past = _step(sess, ids, mask, past)
        for row in range(2):
            assert np.allclose(logits[row, -1], alone[row][step], atol=1e-4), (row, step)
        ids = logits[:, -1].argmax(-1).reshape(2, 1)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=mask.dtype)], axis=1)


def _empty(sess):
    from compresspipe.runtimes.kv_cache import empty_cache

    return empty_cache(sess, 1)


def test_a_file_whose_cache_does_not_follow_pytorch_fails_verification():
    """The export stage's judge: a float file that decodes other tokens than PyTorch is not shipped."""
    from types import SimpleNamespace

    from compresspipe.stages.export import ExportConfig
    from compresspipe.stages.export.stage import ExportStage

    stage = ExportStage(ExportConfig(type="export", formats=["onnx"]))
    job = SimpleNamespace(config=ExportConfig(type="export"), state=SimpleNamespace(edits=[]), dtype=torch.float32)
    ex = SimpleNamespace(int8=False)
    good = {"max_abs_diff": 0.0, "generation": {"prompts": 2, "tokens": 8, "matched_tokens": 16,
                                                "identical_sequences": 2}}
    assert stage._judge("onnx", ex, good, job) == "pass"
    bad = {**good, "generation": {**good["generation"], "matched_tokens": 12, "identical_sequences": 1}}
    assert "greedy decoding" in stage._judge("onnx", ex, bad, job)


def test_a_huggingface_folder_with_the_runs_tokenizer_loads_in_transformers(tmp_path):
    """format huggingface: config, safetensors and the run's byte tokenizer; transformers loads both and the
    model computes what the PyTorch model does. A quantized model is refused, naming the formats that ship it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compresspipe.errors import StageError

    data = {"dataset": "text", "tokenizer": "byte", "seq_len": 32, "max_samples": 96, "batch_size": 16,
            "eval_batch_size": 16}
    model = {"huggingface": {"config": {**TINY_LLAMA, "vocab_size": 257}}}
    recipe = tiny_recipe(name="hf", task="language_modeling", model=model, data=data,
                         stages=[{"type": "export", "formats": ["huggingface"]}])
    run(tmp_path, recipe)
    folder = tmp_path / "run" / "01-export" / "export" / "huggingface"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.encode("héllo") == list("héllo".encode()) and tok.eos_token_id == 256
    lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    assert lm.config.vocab_size == 257
    manifest = json.loads((folder.parent / "manifest.json").read_text())
    assert any(f["file"] == "huggingface/model.safetensors" for f in manifest["files"])

    quantized = {**recipe, "stages": [{"type": "quantize", "method": "weight_only", "dtype": "int4"},
                                      {"type": "export", "formats": ["huggingface"]}]}
    with pytest.raises(StageError, match="onnx_int4"):
        run(tmp_path, quantized, out="q")
