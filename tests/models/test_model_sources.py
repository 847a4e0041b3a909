"""Model sources beyond the builtins: timm, Hugging Face (a config or a local folder) and the user's own Python
file. Each is checked without importing torch, refuses downloads and remote code, and round-trips through the
artifact (save -> load -> same outputs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compresspipe.artifacts.io import ModelIO
from compresspipe.artifacts.model import ModelState, load_model, save_model
from compresspipe.errors import ArtifactError, InputError, RecipeError
from compresspipe.models.code import allowing_code
from compresspipe.models.factory import build_model, check_source, load_checkpoint, recorded_source
from compresspipe.models.inputs import example, forward
from compresspipe.recipe import load_recipe
from compresspipe.recipe.spec import InputTensor, ModelSpec
from tests.fixtures import (
    TINY_BERT,
    TINY_TEXT_DATA,
    TINY_VIT_HF,
    TINY_VIT_TIMM,
    USER_MODEL,
    cli,
    text_recipe,
    tiny_recipe,
    write_recipe,
)

pytest.importorskip("timm")
pytest.importorskip("transformers")

TEXT_IO = ModelIO(inputs=[InputTensor(name="input_ids", shape=[16], dtype="int64", dynamic={0: "sequence"},
                                      range=(0, 64)),
                          InputTensor(name="attention_mask", shape=[16], dtype="int64", dynamic={0: "sequence"},
                                      range=(1, 2))], task="sequence_classification")


def _round_trip(tmp_path: Path, state: ModelState, **load_kw) -> ModelState:
    save_model(state, tmp_path)
    loaded = load_model(tmp_path, **load_kw)
    x = example(state.spec, 3, seed=1)
    with torch.no_grad():
        assert torch.equal(forward(state.module.eval(), x), forward(loaded.module, x))
    assert loaded.source == state.source and loaded.spec == state.spec
    return loaded


@pytest.mark.parametrize(("source", "io"), [
    (TINY_VIT_TIMM, ModelIO.single([3, 16, 16])),
    ({"timm": "resnet10t", "kwargs": {"num_classes": 4}}, ModelIO.single([3, 16, 16])),
    ({"huggingface": {"config": TINY_BERT}}, TEXT_IO),
    ({"huggingface": {"config": TINY_VIT_HF}}, ModelIO.single([1, 16, 16])),
])
def test_library_models_round_trip(tmp_path, source, io):
    spec = ModelSpec.model_validate(source)
    task = io.task
    recorded = recorded_source(spec, task, 3, ["a", "b", "c"] if "huggingface" in source else None)
    module = build_model(recorded, task).eval()
    state = ModelState(module, recorded, tuple(io.inputs[0].shape), 3, io=io)
    loaded = _round_trip(tmp_path, state)
    if "huggingface" in source:  # the config is recorded whole, with the label names from the data
        config = json.loads((tmp_path / "model.json").read_text())["source"]["huggingface"]["config"]
        assert config["id2label"] == {"0": "a", "1": "b", "2": "c"} and loaded.module.config.num_labels == 3


def test_timm_names_are_checked_and_weights_never_fetched():
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        ModelSpec.model_validate({"timm": "resnet81"})
    with pytest.raises(ValueError, match="would download weights"):
        ModelSpec.model_validate({"timm": "resnet18", "kwargs": {"pretrained": True}})
    with pytest.raises(ValueError, match="checkpoint_path would load or fetch timm weights"):
        ModelSpec.model_validate({"timm": "resnet18", "kwargs": {"checkpoint_path": "x.pth"}})
    assert ModelSpec.model_validate({"timm": "resnet18.a1_in1k"}).timm == "resnet18"  # a weight tag is dropped


def test_huggingface_hub_names_remote_code_and_kernels_are_exit_2(tmp_path):
    hub = write_recipe(tmp_path, text_recipe(model={"huggingface": "bert-base-uncased"}), "hub.yaml")
    result = cli("validate", hub)
    assert result.exit_code == 2 and "is not a local folder" in result.output and "never downloads" in result.output
    assert "Traceback" not in result.output
    for extra, message in ((("auto_map", {"AutoModel": "x.Model"}), "remote code"),
                           (("attn_implementation", "kernels-community/flash"), "only eager or sdpa"),
                           (("quantization_config", {"quant_method": "bitsandbytes"}), "quantization backend")):
        config = {**TINY_BERT, extra[0]: extra[1]}
        bad = write_recipe(tmp_path, text_recipe(model={"huggingface": {"config": config}}), "bad.yaml")
        result = cli("validate", bad)
        assert result.exit_code == 2 and message in result.output, result.output
    gpt = write_recipe(tmp_path, text_recipe(model={"huggingface": {"config": {"model_type": "vit"}}}), "t.yaml")
    result = cli("validate", gpt)
    assert result.exit_code == 2 and "has no AutoModelForSequenceClassification" in result.output


def test_huggingface_folder_with_weights_and_a_bin_file(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertModel

    config = AutoConfig.for_model(**{**TINY_BERT, "num_labels": 2})
    torch.manual_seed(3)
    saved = AutoModelForSequenceClassification.from_config(config)
    folder = tmp_path / "bert"
    saved.save_pretrained(folder)  # config.json + model.safetensors
    assert (folder / "model.safetensors").is_file()
    recipe = load_recipe(write_recipe(tmp_path, text_recipe(model={"huggingface": "bert"}), "r.yaml"))
    from compresspipe.run.setup import prepare

    setup = prepare(recipe, fingerprint=False)
    state = setup.baseline()
    x = example(TEXT_IO, 2)
    with torch.no_grad():
        assert torch.allclose(forward(state.module, x), saved.eval()(**x).logits)
    assert "config" in state.source["huggingface"]  # the artifact needs no folder
    _round_trip(tmp_path / "artifact", state)

    # a bare backbone saved as a pickle-free .bin: the task head starts fresh, with a note
    backbone = BertModel(config)
    folder2 = tmp_path / "backbone"
    folder2.mkdir()
    (folder2 / "config.json").write_text(json.dumps({**TINY_BERT, "num_labels": 2}))
    torch.save(backbone.state_dict(), folder2 / "pytorch_model.bin")
    from compresspipe.models import hf

    model = hf.build(str(folder2), {}, "sequence_classification")
    notes = hf.load_folder_weights(model, folder2)
    assert notes and "task head" in notes[0]
    assert torch.equal(model.model.bert.embeddings.word_embeddings.weight, backbone.embeddings.word_embeddings.weight)


def test_python_model_needs_allow_code_and_its_file_must_not_change(tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    model = {"python": "mymodel.py:build", "kwargs": {"width": 8}}
    path = write_recipe(tmp_path, text_recipe(model=model), "py.yaml")
    result = cli("validate", path)
    assert result.exit_code == 2 and "--allow-code" in result.output and "Traceback" not in result.output
    assert cli("validate", path, "--allow-code").exit_code == 0
    result = cli("plan", path)
    assert result.exit_code == 2 and "--allow-code" in result.output

    recipe = load_recipe(path, allow_code=True)
    with allowing_code():
        source = recorded_source(recipe.model, recipe.task)
        module = build_model(source).eval()
    assert len(source["sha256"]) == 64 and source["python"].endswith("mymodel.py:build")
    with pytest.raises(InputError, match="--allow-code"):
        build_model(source)  # the permission is per run, not per process
    state = ModelState(module, source, (16,), 2, io=TEXT_IO)
    folder = tmp_path / "artifact"
    _round_trip(folder, state, allow_code=True)
    with pytest.raises(ArtifactError, match="--allow-code"):
        load_model(folder)
    (tmp_path / "mymodel.py").write_text(USER_MODEL + "\n# edited\n")
    with pytest.raises(ArtifactError, match="changed since the model was made"):
        load_model(folder, allow_code=True)
    with allowing_code(), pytest.raises(InputError, match="sha256: String should match pattern"):
        check_source({"python": "x.py:build", "sha256": "0" * 63})


def test_sources_validate_without_importing_torch(tmp_path):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    recipes = [write_recipe(tmp_path, tiny_recipe(model={**TINY_VIT_TIMM, "input_shape": [3, 16, 16]},
                                                  data={"dataset": "synthetic", "shape": [3, 16, 16]}), "timm.yaml"),
               write_recipe(tmp_path, text_recipe(), "hf.yaml"),
               write_recipe(tmp_path, text_recipe(model={"python": "mymodel.py:build"}), "py.yaml")]
    code = ("import sys; from compresspipe.cli import main; sys.argv=['compresspipe', 'validate', '--allow-code', "
            "*sys.argv[1:]]\ntry:\n    main()\nexcept SystemExit:\n    assert 'torch' not in sys.modules; raise")
    out = subprocess.run([sys.executable, "-c", code, *map(str, recipes)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_checkpoint_dtypes_are_never_cast_silently(tmp_path):
    from safetensors.torch import save_file

    model = build_model({"builtin": "digits-mlp", "kwargs": {"hidden": 4}})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in (torch.int64, torch.bool, torch.complex64):
        broken = dict(state, **{"fc1.weight": state["fc1.weight"].to(bad)})
        save_file(broken, str(tmp_path / "w.safetensors"))
        with pytest.raises(InputError, match=r"dtype of fc1.weight: checkpoint .*, model float32 \(not cast"):
            load_checkpoint(model, tmp_path / "w.safetensors")
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "half.safetensors"))
    load_checkpoint(model, tmp_path / "half.safetensors")  # float16 into float32 is a float: fine


def test_recipe_errors_name_the_flag_and_the_folder(tmp_path):
    with pytest.raises(RecipeError, match="--allow-code"):
        load_recipe(write_recipe(tmp_path, text_recipe(model={"python": "nope.py:build"})))
    with pytest.raises(RecipeError, match="expects 'path/to/file.py:factory'"):
        load_recipe(write_recipe(tmp_path, text_recipe(model={"python": "nope.py"})), allow_code=True)


def test_opted_in_code_stays_the_code_that_was_checked(tmp_path):
    """A pin is checked where it is written, a pin YAML reads as a number says to quote it, a module beside the
    model file is refused (only the model file is hashed), and verify --fast finds an edited model file."""
    import hashlib

    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    model = {"python": "mymodel.py:build", "kwargs": {"width": 8}, "sha256": "a" * 64}
    path = write_recipe(tmp_path, text_recipe(model=model), "pin.yaml")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "sha256:" in text)
    result = cli("validate", path, "--allow-code")
    assert result.exit_code == 2 and f"pin.yaml:{line}:" in result.output and "model.sha256" in result.output
    assert "does not match its pin" in result.output and "Traceback" not in result.output
    path.write_text(path.read_text().replace("a" * 64, "0" * 64))  # unquoted zeros: YAML reads the number 0
    result = cli("validate", path, "--allow-code")
    assert result.exit_code == 2 and "quote it" in result.output, result.output
    good = hashlib.sha256((tmp_path / "mymodel.py").read_bytes()).hexdigest()
    path.write_text(path.read_text().replace("0" * 64, good))
    assert cli("validate", path, "--allow-code").exit_code == 0

    (tmp_path / "helper.py").write_text("WIDTH = 8\n")
    (tmp_path / "withhelper.py").write_text("from helper import WIDTH\n" + USER_MODEL)
    sibling = write_recipe(tmp_path, text_recipe(model={"python": "withhelper.py:build"}), "sibling.yaml")
    result = cli("plan", sibling, "--allow-code")
    assert result.exit_code == 2 and "imports 'helper' from its own folder" in result.output, result.output

    run_path = write_recipe(tmp_path, text_recipe(model={"python": "mymodel.py:build", "kwargs": {"width": 8}},
                                                  stages=[{"type": "train", "epochs": 1}]), "run.yaml")
    assert cli("run", run_path, "--out", tmp_path / "run", "-q", "--allow-code").exit_code == 0
    assert cli("verify", tmp_path / "run", "--fast", "--allow-code").exit_code == 0
    (tmp_path / "mymodel.py").write_text(USER_MODEL + "\n# edited\n")
    result = cli("verify", tmp_path / "run", "--fast", "--allow-code")
    assert result.exit_code != 0 and "changed since the run" in result.output, result.output
    result = cli("verify", tmp_path / "run", "--fast")  # without the opt-in, nothing of it is trusted either
    assert result.exit_code == 2 and "--allow-code" in result.output


@pytest.mark.parametrize("changes", [{"hidden_size": 100_000, "intermediate_size": 400_000},
                                     {"num_hidden_layers": 10**7}, {"vocab_size": 10**10}])
def test_a_huggingface_config_too_large_for_this_machine_is_exit_2_before_anything_is_built(tmp_path, changes):
    config = {**TINY_BERT, **changes}
    path = write_recipe(tmp_path, text_recipe(model={"huggingface": {"config": config}}), "huge.yaml")
    for command in ("validate", "run"):
        result = cli(command, path, *(["--out", tmp_path / "out"] if command == "run" else []))
        assert result.exit_code == 2 and "GiB of float32 weights" in result.output, result.output
        assert "huge.yaml:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_sequence_longer_than_the_models_positions_is_exit_2_at_its_line_before_anything_is_written(tmp_path):
    recipe = text_recipe(data={**TINY_TEXT_DATA, "seq_len": 64})  # TINY_BERT has 32 positions
    path = write_recipe(tmp_path, recipe, "long.yaml")
    for command in ("validate", "run"):
        result = cli(command, path, *(["--out", tmp_path / "out"] if command == "run" else []))
        out = " ".join(result.output.split())
        assert result.exit_code == 2 and "data.seq_len" in out and "at most 32 positions" in out, result.output
        assert "long.yaml:" in out and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    # at the limit it is fine
    assert cli("validate", write_recipe(tmp_path, text_recipe(data={**TINY_TEXT_DATA, "seq_len": 32}))).exit_code == 0
