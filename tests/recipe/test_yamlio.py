import math

import pytest

from compresspipe.errors import RecipeError
from compresspipe.recipe.yamlio import format_loc, parse_yaml_text, read_text_file


def parse(text):
    return parse_yaml_text(text, "r.yaml").data


def test_yaml12_scalars_close_the_yaml11_traps():
    data = parse("a: 1e-3\nb: no\nc: on\nd: 010\ne: 0x1f\nf: '1e-3'\ng: .inf\nh: ~\ni: True\nj: 1_000\n")
    assert data == {"a": 0.001, "b": "no", "c": "on", "d": 10, "e": 31, "f": "1e-3", "g": math.inf,
                    "h": None, "i": True, "j": "1_000"}


def test_duplicate_keys_are_errors_with_both_lines():
    with pytest.raises(RecipeError) as exc:
        parse("a: 1\nb:\n  c: 1\n  c: 2\n")
    (problem,) = exc.value.problems
    assert (problem.line, problem.path) == (4, "b.c")
    assert "duplicate key 'c'" in problem.message and "line 3" in problem.message


@pytest.mark.parametrize("text", [
    "a: !!python/object/apply:os.system ['echo hi']\n",
    "a: !!python/name:os.system\n",
    "a: !custom 3\n",
    "a: !!binary aGk=\n",
])
def test_object_constructing_tags_are_rejected(text):
    with pytest.raises(RecipeError, match="not allowed"):
        parse(text)


def test_merge_keys_and_alias_bombs_are_refused():
    with pytest.raises(RecipeError, match="merge keys"):
        parse("base: &b {x: 1}\nother:\n  <<: *b\n")
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
    with pytest.raises(RecipeError, match="alias bomb"):
        parse(bomb)


def test_syntax_error_has_a_line():
    with pytest.raises(RecipeError) as exc:
        parse("a: [1, 2\nb: 3\n")
    assert exc.value.problems[0].line is not None
    assert "not valid YAML" in str(exc.value)


def test_positions_point_at_values():
    doc = parse_yaml_text("a:\n  - x: 1\n    y: [2, 3]\n", "r.yaml")
    assert doc.where(("a", 0, "y", 1)) == (3, 12)
    assert doc.where(("a", 0, "missing")) == doc.where(("a", 0))
    assert format_loc(("stages", 2, "amount")) == "stages[2].amount"


def test_non_utf8_and_binary_files_are_rejected(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        read_text_file(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x00\x01\x02")
    with pytest.raises(RecipeError, match="binary"):
        read_text_file(binary)
    with pytest.raises(RecipeError, match="not found"):
        read_text_file(tmp_path / "nope.yaml")
