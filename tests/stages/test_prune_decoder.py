"""prune on decoder LMs: heads (grouped-query attention kept consistent), MLP width and blocks removed by the blocks'
known structure, in seconds; the artifact and a saved Hugging Face folder reload to the same logits."""

import time

import pytest
import torch

from compresspipe.artifacts.edits import apply_edit
from compresspipe.artifacts.model import load_model, save_model
from compresspipe.errors import ArtifactError, RecipeError, StageConfigError
from compresspipe.models.inputs import forward
from compresspipe.recipe import load_recipe
from compresspipe.run.setup import build_baseline
from compresspipe.stages.prune.stage import PruneStage, graph_time_bound
from tests.fixtures import cli, stage_context, tiny_recipe, write_recipe

# 3 blocks, hidden 64, grouped-query attention (4 query heads, 2 key/value heads), vocab 128
TINY_LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
              "max_position_embeddings": 64}
TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0}
TINY_QWEN2 = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
              "max_position_embeddings": 64}
LM_DATA = {"dataset": "synthetic-text", "vocab_size": 128, "seq_len": 16, "samples": 64, "batch_size": 16,
           "eval_batch_size": 16}


def lm_recipe(config, **prune):
    stage = {"type": "prune", "amount": 0.5, **prune}
    return tiny_recipe(name="lm", task="language_modeling", model={"huggingface": {"config": dict(config)}},
                       data=dict(LM_DATA), stages=[stage])


def _setup(tmp_path, config, **prune):
    recipe, ctx = stage_context(tmp_path, lm_recipe(config, **prune))
    return PruneStage(recipe.stages[0]), build_baseline(recipe, ctx.data), ctx


def _batch(ctx):
    return next(iter(ctx.data.loader("val", 4)))[0]


def _inner(state):
    return state.module.model


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_plan_takes_seconds(tmp_path, config):
    stage, state, ctx = _setup(tmp_path, config, heads=0.5, blocks=0.34)
    t0 = time.perf_counter()
    plan = stage.plan(state, ctx)
    assert time.perf_counter() - t0 < 5
    assert plan.state is not None and "attention heads per layer now [2, 2]" in plan.notes
    assert _inner(plan.state).config.num_hidden_layers == 2 and _inner(state).config.num_hidden_layers == 3


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
def test_cli_plan_on_a_decoder(tmp_path, config):
    path = write_recipe(tmp_path, lm_recipe(config, heads=0.5))
    result = cli("plan", path, "--json")
    assert result.exit_code == 0, result.output
    assert "attention heads 4 -> 2 per block" in result.stdout


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2, TINY_QWEN2], ids=["llama", "gpt2", "qwen2"])
def test_pruned_artifact_reloads_to_the_same_logits(tmp_path, config):
    stage, state, ctx = _setup(tmp_path, config, heads=0.5, blocks=0.34 if config is not TINY_QWEN2 else None)
    before = sum(p.numel() for p in state.module.parameters())
    result = stage.run(state, ctx)
    assert result.kind == "structural" and sum(p.numel() for p in state.module.parameters()) < 0.7 * before
    save_model(result.state, tmp_path / "out")
    back = load_model(tmp_path / "out")
    x = _batch(ctx)
    with torch.no_grad():
        assert torch.equal(forward(result.state.module, x), forward(back.module, x))
    assert [e["kind"] for e in back.edits] == ["decoder", "resize"]
    assert back.module.model.config.to_dict() == result.state.module.model.config.to_dict()


def test_llama_config_follows_and_a_saved_folder_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    stage, state, ctx = _setup(tmp_path, TINY_LLAMA, amount=0.25, heads=0.5, blocks=0.34)
    result = stage.run(state, ctx)
    config = _inner(result.state).config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            config.intermediate_size) == (2, 2, 1, 16, 72)
    attn = _inner(result.state).model.layers[1].self_attn
    assert attn.layer_idx == 1 and attn.num_key_value_groups == 2
    _inner(result.state).save_pretrained(tmp_path / "hf")  # what transformers reads: config.json + safetensors
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = _batch(ctx)
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, forward(result.state.module, x), atol=1e-5)


def test_gqa_whole_groups_keep_the_best_group_with_its_queries(tmp_path):
    stage, state, ctx = _setup(tmp_path, TINY_LLAMA, amount=0.0, heads=0.5)
    attn = _inner(state).model.layers[0].self_attn
    d = attn.head_dim
    with torch.no_grad():  # key/value group 0 (query heads 0, 1) is nearly dead: group 1 must stay
        for proj in (attn.k_proj, attn.v_proj):
            proj.weight[:d] *= 1e-3
        attn.q_proj.weight[:2 * d] *= 1e-3
    kept_k = attn.k_proj.weight[d:].clone()
    kept_q = attn.q_proj.weight[2 * d:].clone()
    stage.run(state, ctx)
    attn = _inner(state).model.layers[0].self_attn
    assert torch.equal(attn.k_proj.weight, kept_k) and torch.equal(attn.q_proj.weight, kept_q)
    assert attn.num_key_value_groups == 2 and attn.o_proj.in_features == 2 * d


def test_gqa_queries_mode_removes_as_many_query_heads_from_every_group(tmp_path):
    stage, state, ctx = _setup(tmp_path, TINY_LLAMA, amount=0.0, heads=0.5, kv_groups="queries")
    attn = _inner(state).model.layers[0].self_attn
    d = attn.head_dim
    with torch.no_grad():  # query head 1 (group 0) and query head 2 (group 1) are weak
        attn.q_proj.weight[d:3 * d] *= 1e-3
    q = attn.q_proj.weight.clone()
    stage.run(state, ctx)
    attn = _inner(state).model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, torch.cat([q[:d], q[3 * d:]]))
    assert attn.k_proj.out_features == 2 * d and attn.num_key_value_groups == 1
    config = _inner(state).config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 2)


def test_gpt2_conv1d_layers_shrink(tmp_path):
    stage, state, ctx = _setup(tmp_path, TINY_GPT2, amount=0.5, heads=0.5)
    result = stage.run(state, ctx)
    block = _inner(state).transformer.h[0]
    assert block.attn.c_attn.weight.shape == (64, 96) and block.attn.c_proj.weight.shape == (32, 64)
    assert block.mlp.c_fc.weight.shape == (64, 128) and _inner(state).config.n_inner == 128
    assert any("GPT-2's config cannot state fewer heads" in n for n in result.notes)


def test_unknown_decoder_layout_is_refused_in_seconds_naming_the_block(tmp_path):
    phi3 = {"model_type": "phi3", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "max_position_embeddings": 64, "pad_token_id": 0}
    path = write_recipe(tmp_path, lm_recipe(phi3, heads=0.5))
    t0 = time.perf_counter()
    result = cli("plan", path)
    assert result.exit_code == 2 and time.perf_counter() - t0 < 30
    assert "model.model.layers.0 (Phi3DecoderLayer) is neither" in result.output.replace("\n", "")


@pytest.mark.parametrize(("change", "message"), [
    ({"per_layer": {"*mlp": 0.3}}, "per_layer: not available for decoder LMs"),
    ({"exclude": ["model.model.layers.0.mlp"]}, "select the MLP of 2 of 3 decoder blocks"),
])
def test_what_a_decoder_config_cannot_state_is_refused(tmp_path, change, message):
    stage, state, ctx = _setup(tmp_path, TINY_LLAMA, **change)
    with pytest.raises(StageConfigError, match=message):
        stage.plan(state, ctx)


def test_blocks_needs_a_decoder_and_structured_pruning(tmp_path):
    recipe, ctx = stage_context(tmp_path, tiny_recipe(stages=[{"type": "prune", "amount": 0.5, "blocks": 0.5}]))
    with pytest.raises(StageConfigError, match="blocks: removes whole blocks of decoder LMs"):
        PruneStage(recipe.stages[0]).plan(build_baseline(recipe, ctx.data), ctx)
    path = write_recipe(tmp_path, lm_recipe(TINY_LLAMA, method="magnitude", blocks=0.5))
    with pytest.raises(RecipeError, match="blocks removes whole decoder blocks"):
        load_recipe(path)


def test_a_tampered_decoder_edit_is_refused(tmp_path):
    _, state, _ = _setup(tmp_path, TINY_LLAMA)
    edit = {"kind": "decoder", "version": 1, "model": "model", "layers": "model.model.layers", "keep": [0, 1]}
    for bad, message in (({"config": {"vocab_size": 3}}, "may set"), ({"keep": [1, 0]}, "increasing"),
                         ({"keep": [0, 5]}, "increasing"), ({"layers": "model.lm_head"}, "not a list of blocks")):
        with pytest.raises(ArtifactError, match=message):
            apply_edit(state.module, {**edit, **bad})


def test_graph_analysis_has_a_time_bound_naming_where_it_was(tmp_path, monkeypatch):
    from compresspipe.stages.prune import stage as prune_stage

    _, ctx = stage_context(tmp_path, tiny_recipe())
    monkeypatch.setattr(prune_stage, "GRAPH_SECONDS", 0.5)
    where: list[str] = []
    t0 = time.perf_counter()
    with pytest.raises(StageConfigError, match=r"did not finish within 0 s \(at model.layers.0.mlp\)"), \
            graph_time_bound(ctx, 1, where):
        where.append("model.layers.0.mlp")
        while True:  # a dependency analysis that never ends
            pass
    assert time.perf_counter() - t0 < 5
