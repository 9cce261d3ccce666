import json

import pytest
from click.testing import CliRunner

from seqplat.cli import main


def invoke(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env)


def error_lines(result):
    return [ln for ln in result.output.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "--plugin", "gam_rhm"], "Error: --plugin: Unknown plugin 'gam_rhm'. Did you mean 'gam_rhn'?"),
        (["train", "--plugin", "baselines", "--set", "train.stepz=3"],
         "Error: train.stepz: unknown field (check the spelling; `seqplat config schema` lists the fields)"),
        (["train", "--plugin", "baselines", "--set", "train.lr=fast"],
         "Error: train.lr: Input should be a valid number, unable to parse string as a number (got 'fast')"),
        (["train", "--recipe", "baselines/nope"], "Error: Unknown recipe 'baselines/nope'."),
        (["config", "show", "--plugin", "baselines", "--set", "cell.name=lstn"],
         "Error: cell.name: Unknown cell 'lstn'. Did you mean 'lstm'?"),
    ],
    ids=["unknown-plugin", "typo-field", "wrong-type", "unknown-recipe", "unknown-cell"],
)
def test_bad_input_gives_one_clear_line_and_exit_2(args, expected):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.output
    assert lines[0].startswith(expected), lines[0]
    assert "Traceback" not in result.output


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    result = invoke("train", "--config", str(bad))
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"Error: Config file '{bad}' is not valid YAML/JSON/TOML: expected ',' or ']', but got '<stream end>' "
        f"at line 2, column 1"
    ]
    result = invoke("train", "--config", str(tmp_path / "missing.yaml"))
    missing = tmp_path / "missing.yaml"
    assert error_lines(result) == [f"Error: Config file '{missing}' does not exist; check the path or URL."]


def test_missing_data_file_names_the_file_and_the_fix(tmp_path):
    result = invoke("train", "--recipe", "baselines/ptb_char_small", "--set", "tracking.enabled=false",
                    env={"SEQPLAT_DATA": str(tmp_path)})
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert line.startswith(f"Error: No ptb/ptb.char.train.txt under SEQPLAT_DATA={tmp_path}")


def test_debug_shows_traceback():
    result = invoke("--debug", "train", "--plugin", "gam_rhm")
    assert result.exit_code == 2


def test_config_show_json_has_stable_keys_and_parameter_count():
    result = invoke("config", "show", "--recipe", "baselines/ptb_char_small", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"config", "num_parameters"}
    assert data["num_parameters"] == 999_186
    assert data["config"]["cell"]["name"] == "lstm"


def test_config_schema_and_listings_are_json():
    schema = json.loads(invoke("config", "schema").output)
    assert set(schema["properties"]) >= {"cell", "task", "model", "train", "tracking", "io"}
    cell_schema = json.loads(invoke("config", "schema", "--cell", "lstm").output)
    assert "hidden_size" in cell_schema["properties"]
    for kind in ("cells", "tasks", "recipes", "regularizers", "quantizers"):
        result = invoke(kind, "--json")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert all({"name", "plugin", "description"} <= set(r) for r in rows)
    cells = {r["name"]: r for r in json.loads(invoke("cells", "--json").output)}
    assert {o["name"] for o in cells["lstm"]["options"]} == {"hidden_size", "bias", "forget_bias", "impl"}
    assert all(o["description"] for o in cells["lstm"]["options"])


def test_every_registered_component_describes_every_field():
    from seqplat.registry import get_registry

    reg = get_registry()
    missing = []
    for kind in ("cell", "task", "regularizer", "quantizer"):
        for name in reg.names(kind):
            for field, info in reg.get(kind, name).obj.config_class.model_fields.items():
                if not info.description:
                    missing.append(f"{kind} {name}.{field}")
    assert not missing, f"fields without a description: {missing}"


def test_baselines_default_trains_quickly(tmp_path):
    result = invoke("train", "--plugin", "baselines", "--no-progress", "--set", "train.steps=30",
                    "--set", "train.eval_every=30", "--set", f"io.output_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    assert "mlflow run:" in result.output and "test:" in result.output
