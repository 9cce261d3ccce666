import json

import pytest

from seqplat.core.config import apply_override, build_run_config, deep_merge, parse_value
from seqplat.core.errors import ConfigError


@pytest.fixture
def recipe(register_plugin, tmp_path):
    import seqplat

    class P:
        @staticmethod
        @seqplat.hookimpl
        def register_recipes(register):
            register("toyp/default", {"cell": {"name": "lstm", "hidden_size": 8}, "task": {"name": "toy_stream"},
                                      "train": {"lr": 0.1, "steps": 7}})
            register("toyp/child", {"base": "toyp/default", "train": {"steps": 9}})

    register_plugin(P(), "toyp")


def test_precedence_recipe_then_file_then_set(recipe, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.2\n  batch_size: 3\n")
    run = build_run_config(plugin="toyp")
    assert run.train.lr == 0.1 and run.train.steps == 7
    run = build_run_config(plugin="toyp", config_files=[str(f)])
    assert run.train.lr == 0.2 and run.train.batch_size == 3
    run = build_run_config(plugin="toyp", config_files=[str(f)], overrides=["train.lr=3e-4"])
    assert run.train.lr == 3e-4 and run.train.batch_size == 3


def test_recipe_base_chain(recipe):
    run = build_run_config(recipe="toyp/child")
    assert run.train.steps == 9 and run.train.lr == 0.1


def test_component_defaults_are_filled_in(recipe):
    run = build_run_config(plugin="toyp")
    assert run.cell == {"name": "lstm", "hidden_size": 8, "bias": True, "forget_bias": 0.0, "impl": "fused"}


def test_switching_component_drops_old_options(recipe):
    run = build_run_config(plugin="toyp", overrides=["cell.name=gru"])
    assert run.cell["name"] == "gru" and run.cell["hidden_size"] == 128


def test_config_file_from_fsspec_url(recipe):
    import fsspec

    with fsspec.open("memory://cfg/run.json", "w") as f:
        f.write(json.dumps({"train": {"steps": 11}}))
    assert build_run_config(plugin="toyp", config_files=["memory://cfg/run.json"]).train.steps == 11


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["train.lr=-1"], ["train.lr: Input should be greater than 0 (got -1)"]),
        (["train.stepz=3"], ["train.stepz: unknown field (check the spelling; `seqplat config schema` lists"]),
        (["train.steps=many"], ["train.steps: Input should be a valid integer, unable to parse string as an integer"]),
        (["cell.hidden_size=0"], ["cell.hidden_size: Input should be greater than or equal to 1 (got 0)"]),
        (["cell.name=lstn"], ["cell.name: Unknown cell 'lstn'. Did you mean 'lstm'?"]),
    ],
    ids=["range", "typo", "type", "cell-option", "unknown-cell"],
)
def test_one_line_per_bad_field(recipe, overrides, expected):
    with pytest.raises(ConfigError) as exc:
        build_run_config(plugin="toyp", overrides=overrides)
    assert len(exc.value.lines) == len(expected)
    for line, want in zip(exc.value.lines, expected, strict=True):
        assert line.startswith(want)


def test_several_bad_fields_reported_together(recipe):
    with pytest.raises(ConfigError) as exc:
        build_run_config(plugin="toyp", overrides=["train.lr=0", "cell.hidden_size=-3"])
    assert [line.split(":")[0] for line in exc.value.lines] == ["train.lr", "cell.hidden_size"]


def test_bad_config_files(recipe, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_run_config(plugin="toyp", config_files=[str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML/JSON/TOML"):
        build_run_config(plugin="toyp", config_files=[str(bad)])
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_run_config(plugin="toyp", config_files=[str(notmap)])
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot be read"):
        build_run_config(plugin="toyp", config_files=[str(binary)])


def test_parse_value_and_overrides():
    assert parse_value("3e-4") == 3e-4
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("gru") == "gru"
    assert apply_override({"a": {"b": 1}}, "a.c=2") == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "train.lr")
    assert deep_merge({"cell": {"name": "a", "x": 1}}, {"cell": {"name": "b"}}) == {"cell": {"name": "b"}}


def test_time_aware_cell_on_task_without_times_fails_at_config_time(register_plugin):
    import seqplat
    from seqplat.plugins.baselines.cells import LSTMCell

    class TimeLSTM(LSTMCell):
        uses_time = True

    class P:
        @staticmethod
        @seqplat.hookimpl
        def register_cells(register):
            register("time_lstm", TimeLSTM)

    register_plugin(P(), "timep")
    with pytest.raises(ConfigError, match="reads per-step timestamps but task 'toy_stream' provides none"):
        build_run_config(overrides=["cell.name=time_lstm", "task.name=toy_stream"])
