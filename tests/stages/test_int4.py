"""int4 weight-only for decoder LMs: group-wise 4-bit Linear and Conv1D layers in PyTorch hold exactly the weights
of the onnx_int4 file (ONNX Runtime's MatMulNBits), the file ships and is judged against its float source, and
nothing holding weights stays float unseen."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.fixtures import run, tiny_recipe
from tests.stages.test_prune_decoder import LM_DATA, TINY_GPT2, TINY_LLAMA

pytest.importorskip("onnxruntime")


def _matmul_nbits_file(path, b: np.ndarray, block: int, algorithm: str = "rtn") -> None:
    """y = x @ B as ONNX, then ONNX Runtime's own 4-bit block quantizer (round-to-nearest or HQQ) on it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    k, n = b.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "B"], ["y"], name="fc/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    config = (HQQWeightOnlyQuantConfig(block_size=block, bits=4) if algorithm == "hqq"
              else DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, algo_config=config)
    with warnings.catch_warnings():  # ONNX Runtime's HQQ hands torch a read-only numpy weight (it only reads it)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        quantizer.process()
    quantizer.model.save_model_to_file(str(path), False)
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["MatMulNBits"]


@pytest.mark.parametrize("kind, algorithm", [("linear", "rtn"), ("conv1d", "rtn"), ("linear", "hqq"),
                                             ("conv1d", "hqq")])
def test_pytorch_4bit_layer_computes_what_onnx_runtime_matmulnbits_computes(tmp_path, kind, algorithm):
    import onnxruntime as ort

    from compresspipe.stages.quantize.nbits import QuantMatMulNBits

    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(72, 24, bias=False)  # 72 is not a multiple of the block: the last block is padded
        b = layer.weight.detach().t().contiguous().numpy()
    else:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(24, 72)  # GPT-2's layout: weight [in, out]
        nn.init.normal_(layer.weight, std=0.5)
        nn.init.zeros_(layer.bias)
        b = layer.weight.detach().contiguous().numpy()
    q = QuantMatMulNBits.from_float(layer, 32, algorithm)
    assert q.conv1d == (kind == "conv1d") and q.algorithm == algorithm
    x = torch.randn(5, 72)
    _matmul_nbits_file(tmp_path / "m.onnx", b, 32, algorithm)
    ours = q(x).detach().numpy()
    theirs = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    assert np.allclose(ours, theirs, atol=1e-4, rtol=1e-4), np.abs(ours - theirs).max()
    # and the 4-bit weights are not the float ones: the test would pass trivially otherwise
    assert not np.allclose(ours, (x @ torch.from_numpy(b)).numpy(), atol=1e-3)


def test_hqq_fits_4bit_groups_closer_to_the_weights_than_round_to_nearest():
    from compresspipe.stages.quantize.nbits import QuantMatMulNBits

    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    with torch.no_grad():  # heavy tails, as trained weights have
        layer.weight.copy_(torch.distributions.StudentT(3.0).sample(layer.weight.shape) * 0.02)
    error = {a: (QuantMatMulNBits.from_float(layer, 32, a).weight() - layer.weight).abs().mean().item()
             for a in ("rtn", "hqq")}
    assert error["hqq"] < 0.97 * error["rtn"], error


def _lm(config, *stages):
    return tiny_recipe(name="lm4", task="language_modeling", model={"huggingface": {"config": dict(config)}},
                       data=dict(LM_DATA), deploy={"runtime": "onnxruntime", "rounds": 3},
                       evaluate={"latency": {"batch_sizes": [1], "warmup": 1, "iters": 2, "threads": 1}},
                       stages=[{"type": "train", "epochs": 1, "lr": 3.0e-3}, *stages])


@pytest.mark.int8  # int8 compute: MatMulNBits' int8 kernels differ by CPU (AVX2-only, VNNI), as the int8 files' do
@pytest.mark.parametrize("config, linears, group, export, algorithm, compute, head", [
    ({**TINY_LLAMA, "tie_word_embeddings": True}, 3 * 7 + 1, 16, False, "rtn", "int8", "int4"),
    (TINY_GPT2, 3 * 2, 32, True, "hqq", "float", "float")],  # GPT-2: the MLPs excluded (below)
    ids=["llama-rtn-int8compute-head4", "gpt2-hqq-float-nomlp"])
def test_int4_weight_only_ships_a_matmulnbits_file_that_follows_its_float_model(tmp_path, config, linears, group,
                                                                                export, algorithm, compute, head):
    import onnx
    from onnx import helper

    from compresspipe.artifacts.model import load_model
    from compresspipe.models.inputs import forward

    quantize = {"type": "quantize", "method": "weight_only", "dtype": "int4"}
    if group != 32:
        quantize["group_size"] = group
    if algorithm != "rtn":
        quantize["algorithm"] = algorithm
    if compute != "int8":  # int8 compute is the default
        quantize["int4_compute"] = compute
    if head != "auto":
        quantize["head"] = head
    if config is TINY_GPT2:  # what the recipe excludes stays float in the file too, and is named there
        quantize["exclude"] = ["*mlp*"]
    stages = [quantize] + ([{"type": "export", "formats": ["onnx_int4"]}] if export else [])
    report = run(tmp_path, _lm(config, *stages)).report
    row = next(s for s in report["stages"] if s["name"] == "quantize")
    assert row["format"] == "onnx_int4", row["format"]
    assert row["fidelity"]["passed"] and row["fidelity"]["source"] == "float model"
    path = tmp_path / "run" / ("03-export/export" if export else "02-quantize/deploy") / "model.int4.onnx"
    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}
    packed = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(packed) == linears  # every Linear / Conv1D selected; lm_head too with head: int4
    assert not [n for n in model.graph.node if n.op_type == "Gemm" and n.input[1] in weights]
    # what the stage kept float (the head, the excluded MLPs) is float in the file too: a MatMul on a float table (a tied head kept float reads the embedding table through a Transpose, or the exporter's copy of it)
    producer = {o: n for n in model.graph.node for o in n.output}
    float_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and (
        n.input[1] in weights or n.input[1] in producer and producer[n.input[1]].op_type == "Transpose"
        and producer[n.input[1]].input[0] in weights)]
    assert len(float_matmuls) == (head == "float") + (3 * 2 if config is TINY_GPT2 else 0), float_matmuls
    # the recipe's group size is the file's block size; HQQ's zero points are floats (rtn: packed 4-bit)
    assert {helper.get_attribute_value(a) for n in packed for a in n.attribute if a.name == "block_size"} == {group}
    # int4_compute reaches the file as MatMulNBits' accuracy_level (4: int8 activations, 0: float)
    levels = {helper.get_attribute_value(a) for n in packed for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4 if compute == "int8" else 0}
    assert any(("int8 compute" if compute == "int8" else "float activations") in n for n in row["notes"])
    zero_types = {t.data_type for t in model.graph.initializer if t.name in {n.input[3] for n in packed}}
    assert zero_types == {onnx.TensorProto.FLOAT if algorithm == "hqq" else onnx.TensorProto.UINT8}
    assert any(algorithm.upper() in n if algorithm == "hqq" else "round-to-nearest" in n for n in row["notes"])
    # what stays float is named, with the reason
    kept = [n for n in row["notes"] if n.startswith("model.int4.onnx: weights kept float")]
    assert kept and "embedding table" in kept[0], row["notes"]
    assert ("model.lm_head: language model head, kept float (quantize.head: float" in kept[0]) == (head == "float")
    assert ("model.transformer.h.0.mlp.c_fc: not 4-bit in the quantize stage" in kept[0]) == (config is TINY_GPT2)
    table = row["details"]["tables"]["per layer"]
    assert all(r["quantized"] == ("no" if r["layer"] == "model.lm_head" and head == "float" else "yes")
               for r in table if r["type"] in ("Linear", "Conv1D") and ".mlp." not in r["layer"])
    # files with a key/value cache are timed per generated token (a decode step), and the table says so
    for r in (row, float_row := next(s for s in report["stages"] if s["name"] == "train")):
        assert r["timed"] == "decode step (32 tokens cached)", r["timed"]
        assert r["decode_tokens_per_s"]["1"] == pytest.approx(1000 / r["latency_ms"]["1"])
        # and their peak memory measured in a process of their own, the runtime's own under it
        assert r["peak_memory_mib"]["1"] > r["runtime_memory_mib"] > 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "decode b1" in md and "timed per generated token" in md and "peak mem b1" in md
    # the file is less than a third of the float one (all 4-bit), and the recommendation weighed both
    assert row["bytes"] < float_row["bytes"] / (1.2 if config is TINY_GPT2 else 3)  # GPT-2: its MLPs float
    assert {c["format"] for c in report["recommendation"]["candidates"]} == {"onnx", "onnx_int4"}
    # the artifact reloads (4-bit buffers, no pickle) and computes what the stage measured
    state = load_model(tmp_path / "run" / "02-quantize")
    x = torch.randint(1, 128, (2, 16))
    logits = forward(state.module.eval(), {"input_ids": x, "attention_mask": torch.ones_like(x)})
    assert torch.isfinite(logits).all()
    if export:  # the export stage verified its file once: the deploy measurement does not repeat its notes
        export_row = next(s for s in report["stages"] if s["name"] == "export")
        greedy = [n for n in export_row["notes"] if n.startswith("model.int4.onnx: greedy decoding")]
        assert len(greedy) == 1, greedy
        manifest = json.loads((tmp_path / "run" / "03-export" / "export" / "manifest.json").read_text())
        assert "model.int4.onnx" in json.dumps(manifest)


@pytest.mark.parametrize("stage", [{"method": "static", "algorithm": "hqq"},
                                   {"method": "weight_only", "dtype": "int8", "algorithm": "hqq"}])
def test_hqq_outside_4bit_weight_only_is_refused_naming_what_it_needs(stage):
    from pydantic import ValidationError

    from compresspipe.stages.quantize import QuantizeConfig

    with pytest.raises(ValidationError, match="algorithm hqq fits 4-bit weight groups: it needs method weight_only"):
        QuantizeConfig.model_validate({"type": "quantize", **stage})


@pytest.mark.parametrize("method, dtype", [("static", "int8"), ("weight_only", "int8")])
def test_int4_compute_outside_4bit_weight_only_is_refused(method, dtype):
    from pydantic import ValidationError

    from compresspipe.stages.quantize import QuantizeConfig

    with pytest.raises(ValidationError, match="int4_compute sets how the onnx_int4 file's 4-bit MatMuls compute"):
        QuantizeConfig.model_validate({"type": "quantize", "method": method, "dtype": dtype, "int4_compute": "float"})
    assert QuantizeConfig.model_validate({"type": "quantize", "method": "weight_only", "dtype": "int4",
                                          "int4_compute": "float"}).int4_compute == "float"


@pytest.mark.parametrize("vocab, head, float_head", [(128, "auto", True), (4096, "auto", False), (4096, "float", True),
                                                      (128, "int4", False)])
def test_the_language_model_head_stays_float_where_that_is_cheap(vocab, head, float_head):
    from transformers import AutoConfig, AutoModelForCausalLM

    from compresspipe.stages.quantize import QuantizeConfig
    from compresspipe.stages.quantize.stage import QuantizeStage, output_layer

    config = AutoConfig.for_model(**{**TINY_LLAMA, "vocab_size": vocab, "tie_word_embeddings": True})
    model = nn.Module()
    model.model = AutoModelForCausalLM.from_config(config)  # as compresspipe wraps it (HFModel.model)
    assert output_layer(model) == "model.lm_head"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    stage = QuantizeStage(QuantizeConfig(type="quantize", method="weight_only", dtype="int4", head=head))
    notes: list[str] = []
    kept = stage._float_head(model, layers, notes)
    assert ("model.lm_head" in kept) == float_head, (kept, notes)
    if head == "auto":  # the share decides, and the run says which way and why
        text = kept.get("model.lm_head", "") + " ".join(notes)
        assert ("8.2% of the 4-bit weights" if vocab == 128 else "74% of the weights to hold in 4 bits") in text


def test_head_is_a_setting_of_int4_weight_only():
    from pydantic import ValidationError

    from compresspipe.stages.quantize import QuantizeConfig

    with pytest.raises(ValidationError, match="head sets whether a language model head is 4-bit"):
        QuantizeConfig(type="quantize", method="weight_only", dtype="int8", head="float")
    assert QuantizeConfig(type="quantize", method="static").head == "auto"  # the default is always accepted


def test_an_int4_file_that_fails_its_gate_with_a_4bit_head_says_what_to_try():
    from compresspipe.stages.ship import head_hint

    assert "quantize.head: float" in str(head_hint(language_model=True, head_float=False))
    assert head_hint(language_model=True, head_float=True) is None  # the head is float already
    assert head_hint(language_model=False, head_float=False) is None  # no language model head to keep
