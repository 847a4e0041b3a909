from typer.testing import CliRunner

from compresspipe.cli import app
from tests.fixtures import tiny_recipe, write_recipe

runner = CliRunner()


def test_verify_passes_on_a_fresh_run_and_fails_after_a_weight_edit(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe())
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(path), "--out", str(run), "-q"]).exit_code == 0
    ok = runner.invoke(app, ["verify", str(run)], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    assert "baseline" in ok.output and "FAIL" not in ok.output
    weights = run / "01-train" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(run), "--json"], catch_exceptions=False)
    assert bad.exit_code == 1
    assert "train" in bad.output and "was modified" in bad.output
    assert '"stage": "baseline"' in bad.output


def test_verify_needs_a_run_folder(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path)])
    assert result.exit_code == 2 and "not a finished compresspipe run" in result.output


def test_verify_reproduces_a_run_that_missed_its_gates(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(gates={"min_size_reduction": 8}))
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", str(path), "--out", str(run), "-q"]).exit_code == 1
    result = runner.invoke(app, ["verify", str(run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output
