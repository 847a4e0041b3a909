"""decoder LMs in quantize and export: no layer that holds weights is left out unseen (GPT-2's Conv1D); the file
states the longest sequence the model takes."""

import pytest

from compresspipe.run.setup import build_baseline
from compresspipe.stages.quantize.stage import QuantizeStage
from tests.fixtures import stage_context, tiny_recipe

pytest.importorskip("transformers")

TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32,
             "bos_token_id": 0, "eos_token_id": 0}
LM_DATA = {"dataset": "synthetic-text", "vocab_size": 128, "seq_len": 16, "samples": 32, "batch_size": 16,
           "eval_batch_size": 16}


@pytest.mark.parametrize("method", ["dynamic", "weight_only"])
def test_gpt2_conv1d_layers_are_quantized_and_what_stays_float_is_listed(tmp_path, method):
    """GPT-2's Conv1D is a Linear with its weight stored [in, out]: dynamic and weight-only quantize it like one (and
    compute what it computed); embeddings stay float and are listed with their share of the weights."""
    import torch

    from compresspipe.models.inputs import forward

    recipe = tiny_recipe(name="lm", task="language_modeling", model={"huggingface": {"config": dict(TINY_GPT2)}},
                         data=dict(LM_DATA), stages=[{"type": "quantize", "method": method}])
    parsed, ctx = stage_context(tmp_path, recipe)
    state = build_baseline(parsed, ctx.data)
    x = next(iter(ctx.data.loader("val", 4)))[0]
    before = forward(state.module.eval(), x).detach()
    result = QuantizeStage(parsed.stages[0]).run(state, ctx)
    table = result.details["tables"]["per layer"]
    conv1d = [r for r in table if r["type"] == "Conv1D"]
    assert len(conv1d) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert all(r["quantized"] == "yes" for r in conv1d), conv1d
    assert any(r["type"] == "Embedding" and r["quantized"] == "no" for r in table)
    note = next(n for n in result.notes if "holding weights stay float32" in n)
    assert "Embedding x2" in note and "Conv1D" not in note
    after = forward(result.state.module.eval(), x).detach()
    # int8 weights: the logits move a little, not the layout (a transposed weight would scramble them)
    assert torch.allclose(after, before, atol=0.1 * float(before.abs().max()))
    assert not torch.equal(after, before)
    # the norms are named as such, not as layers this stage failed to handle
    assert all(r["reason"] == "normalisation stays float32" for r in table if r["type"] == "LayerNorm")


def test_an_exported_language_model_states_its_longest_sequence(tmp_path):
    from types import SimpleNamespace

    import onnx
    import torch
    from onnx import TensorProto, helper
    from transformers import GPT2Config, GPT2LMHeadModel

    from compresspipe.runtimes.onnx_float import add_metadata, max_positions

    gpt2 = GPT2LMHeadModel(GPT2Config(**TINY_GPT2))
    assert max_positions(gpt2) == 32 and max_positions(SimpleNamespace(model=gpt2)) == 32  # wrapped too
    assert max_positions(torch.nn.Linear(2, 2)) is None
    path = tmp_path / "m.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(path))
    job = SimpleNamespace(io=SimpleNamespace(task="language_modeling", inputs=[], classes=None, preprocessing=None),
                          module=SimpleNamespace(model=gpt2))
    add_metadata(path, job)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["compresspipe.max_sequence_length"] == "32" and meta["compresspipe.task"] == "language_modeling"
