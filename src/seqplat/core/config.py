"""Run configuration: one pydantic tree, resolved from recipe -> config file -> ``--set`` overrides.

Components (the cell, the task, regularizers, the quantizer) are written as ``{name: ..., <options>}``
mappings. Their options are validated by the config model the component's plugin registered, and
the resolved config stores them complete (defaults filled in), so a checkpoint or an MLflow run
holds everything needed to rebuild the model.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from seqplat.core.compiling import CompileMode, compile_mode
from seqplat.core.errors import ConfigError, SeqplatError, UnknownNameError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """How the task encoder, the stacked cells and the head are put together."""

    embedding_size: int | None = Field(
        None, ge=1, description="embedding width for token inputs / linear input projection for features "
        "(None: 128 for tokens, no projection for features)"
    )
    num_layers: int = Field(1, ge=1, description="number of stacked cells")
    input_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after the encoder")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between stacked cells")
    output_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the head")
    tie_weights: bool = Field(
        False, description="share the embedding matrix with the output layer (needs embedding_size == hidden)"
    )


class ScheduleConfig(_Strict):
    """Learning-rate schedule."""

    kind: Literal["constant", "step", "cosine", "plateau"] = Field("constant", description="schedule type")
    step_size: int = Field(1000, ge=1, description="step: multiply lr by gamma every step_size steps")
    start_step: int = Field(0, ge=0, description="step: decay only after this many steps (Zilly's delay)")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step/plateau: lr multiplier")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (constant/step/cosine)")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: final lr; plateau: lower bound")
    patience: int = Field(2, ge=0, description="plateau: evaluations without improvement before decaying")
    max_decays: int | None = Field(None, ge=0, description="plateau: stop decaying after this many (None: no limit)")


class TrainConfig(_Strict):
    """The training loop."""

    steps: int = Field(1000, ge=1, description="optimizer steps in total")
    batch_size: int = Field(32, ge=1, description="global batch size (split across processes)")
    eval_batch_size: int = Field(64, ge=1, description="batch size for validation and test")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = Field("adam", description="optimizer")
    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="momentum (sgd, rmsprop)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    eps: float = Field(1e-8, gt=0.0, description="optimizer epsilon")
    rmsprop_alpha: float = Field(
        0.99, gt=0.0, lt=1.0, description="rmsprop: smoothing constant of the squared-gradient average "
        "(torch's default 0.99; TensorFlow 1's `decay` default, used by many papers, is 0.9)"
    )
    rmsprop_initial_square_avg: float = Field(
        0.0, ge=0.0, description="rmsprop: starting value of the squared-gradient average (torch: 0; "
        "TensorFlow 1: 1.0, which makes the first steps much smaller)"
    )
    clip_norm: float | None = Field(None, gt=0.0, description="clip the global gradient norm to this value")
    clip_value: float | None = Field(None, gt=0.0, description="clip each gradient element into [-v, v]")
    clip_norm_type: float = Field(2.0, gt=0.0, description="norm for clip_norm (2: L2; 1: L1 as in Suarez RHN)")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="learning-rate schedule")
    eval_every: int = Field(500, ge=1, description="evaluate on valid every N steps (and at the end)")
    max_eval_batches: int | None = Field(
        None, ge=1, description="cap on validation batches per periodic evaluation (None: whole split)"
    )
    patience: int | None = Field(
        None, ge=1, description="early stopping: evaluations without improvement before stopping (None: off)"
    )
    target_metric: float | None = Field(
        None, description="stop once the primary valid metric reaches this value (e.g. accuracy 1.0)"
    )
    restore_best: bool = Field(True, description="test with the best validation checkpoint, not the last weights")
    checkpoint_every: int = Field(500, ge=1, description="write a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="how many step checkpoints to keep (the best is kept apart)")
    log_every: int = Field(50, ge=1, description="log train loss and throughput every N steps")
    seed: int = Field(0, ge=0, description="seed for weights, data order and dropout")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    on_nan: Literal["stop", "skip"] = Field("stop", description="NaN/Inf loss or gradients: stop or skip the batch")
    compile: CompileMode = Field(
        "off", description="torch.compile, opt-in: off; model (the whole model: its graph and compile time grow "
        "with T for cells that loop in Python); step (each cell's one-step function, run in its plain loop: "
        "compile time independent of T). true/false mean model/off. The compile time is reported",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, v: object) -> object:
        return compile_mode(v)


class TrackingConfig(_Strict):
    """MLflow tracking."""

    enabled: bool = Field(True, description="log the run to MLflow")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (None: MLFLOW_TRACKING_URI or MLflow's default in the working folder)"
    )
    experiment: str | None = Field(None, description="experiment name (None: the task's name)")
    run_name: str | None = Field(None, description="run name (None: MLflow picks one)")
    log_checkpoint: bool = Field(True, description="upload the best checkpoint as an artifact")
    register_model: str | None = Field(None, description="register the best checkpoint under this model name")
    parent_run_id: str | None = Field(None, description="MLflow run to nest this run under (seqplat suite)")
    on_unreachable: Literal["error", "local"] = Field(
        "error", description="tracking server unreachable at start: fail, or log to <run_dir>/mlflow.db and say so"
    )


class IOConfig(_Strict):
    """Where outputs go. Any fsspec URL works (local path, memory://, s3://...)."""

    output_dir: str = Field("runs", description="folder (or URL) for checkpoints; each run gets a subfolder")
    run_dir: str | None = Field(None, description="exact folder of this run (None: <output_dir>/<run name>)")


class RunConfig(_Strict):
    """A complete run: what to train, on what, and how."""

    description: str = Field("", description="free text shown by `seqplat recipes`")
    cell: dict[str, Any] = Field(default_factory=lambda: {"name": "lstm"}, description="the cell: {name, options}")
    task: dict[str, Any] = Field(
        default_factory=lambda: {"name": "copy_memory"}, description="the task: {name, options}"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="model assembly")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")
    io: IOConfig = Field(default_factory=IOConfig, description="outputs")
    regularizers: list[dict[str, Any]] = Field(default_factory=list, description="regularizers: [{name, options}]")
    quantizer: dict[str, Any] | None = Field(None, description="quantizer: {name, options} or None")

    @field_validator("cell", "task")
    @classmethod
    def _has_name(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("name"), str):
            raise ValueError("needs a 'name' (string), e.g. {name: lstm}")
        return v


# -- merging and overrides -----------------------------------------------------------------------

def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; mappings merge, everything else replaces. A component whose
    ``name`` changes is replaced whole (options of one cell do not leak into another)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if (
            isinstance(v, dict)
            and isinstance(out.get(k), dict)
            and not ("name" in v and v.get("name") != out[k].get("name"))
        ):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML (numbers, booleans, null, lists, mappings) or a plain string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key segment in '{key}'")
    value = parse_value(raw)
    out = copy.deepcopy(data)
    node = out
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            if p in node and node[p] is not None:
                raise ConfigError(f"--set {assignment!r}: '{p}' is not a mapping")
            node[p] = {}
        node = node[p]
    if parts[-1] == "name" and isinstance(node.get("name"), str) and node["name"] != value:
        node.clear()  # switching component: drop the old component's options
    node[parts[-1]] = value
    return out


def read_config_file(url: str) -> dict[str, Any]:
    """A YAML/JSON/TOML config from a local path or any fsspec URL."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file '{url}' does not exist; check the path or URL.") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"Config file '{url}' cannot be read ({type(exc).__name__}: {exc}).") from exc
    try:
        if url.endswith(".toml"):
            import tomllib

            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) if not url.endswith(".json") else json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parser error is the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            first = f"{getattr(exc, 'problem', None) or first} at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"Config file '{url}' is not valid YAML/JSON/TOML: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{url}' must hold a mapping at top level, got {type(data).__name__}.")
    return data


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per bad field: ``path: message (got value)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `seqplat config schema` lists the fields)"
            lines.append(f"{path}: {msg}")
            continue
        got = err.get("input")
        shown = repr(got) if not isinstance(got, dict) else "{...}"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{path}: {msg} (got {shown})")
    return lines


def validate_component(kind: str, spec: dict[str, Any], prefix: str, registry: Any) -> dict[str, Any]:
    """Validate ``{name, options}`` against the registered component's config model; returns the
    spec with defaults filled in."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{prefix}: needs a mapping with a 'name', e.g. {{name: ...}} (got {spec!r})")
    try:
        entry = registry.get(kind, spec["name"])
    except UnknownNameError as exc:
        raise ConfigError(f"{prefix}.name: {exc}") from exc
    options = {k: v for k, v in spec.items() if k != "name"}
    try:
        cfg = entry.obj.config_class.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix + ".")) from exc
    except (ValueError, TypeError, SeqplatError) as exc:
        raise ConfigError(f"{prefix}: {exc}") from exc
    return {"name": spec["name"], **cfg.model_dump(mode="json")}


def component_config(kind: str, spec: dict[str, Any], registry: Any | None = None) -> BaseModel:
    """The validated config object of a component spec."""
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    entry = reg.get(kind, spec["name"])
    return entry.obj.config_class.model_validate({k: v for k, v in spec.items() if k != "name"})


def validate_run(data: dict[str, Any], registry: Any | None = None, check: bool = True) -> RunConfig:
    """Validate a raw mapping into a complete :class:`RunConfig` (every component checked).

    ``check=False`` skips :func:`check_compatibility` (whether the cell and task can train together), for
    callers that use only some sections, such as ``seqplat bench``, which feeds the cell its own inputs.
    """
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    data = {k: v for k, v in data.items() if k != "base"}
    lines: list[str] = []
    run: RunConfig | None = None
    try:
        run = RunConfig.model_validate(data)
    except ValidationError as exc:
        lines.extend(format_validation_error(exc))
    defaults = RunConfig()
    raw_cell = data.get("cell", defaults.cell)
    raw_task = data.get("task", defaults.task)
    raw_regs = data.get("regularizers") or []
    raw_quant = data.get("quantizer")
    resolved: dict[str, Any] = {}
    for field_name, kind, spec in (("cell", "cell", raw_cell), ("task", "task", raw_task)):
        if any(line.startswith(field_name + ":") for line in lines):
            continue  # already reported by the run-level validation
        try:
            resolved[field_name] = validate_component(kind, spec, field_name, reg)
        except ConfigError as exc:
            lines.extend(exc.lines)
    regs = []
    if isinstance(raw_regs, list):
        for i, spec in enumerate(raw_regs):
            try:
                regs.append(validate_component("regularizer", spec, f"regularizers.{i}", reg))
            except ConfigError as exc:
                lines.extend(exc.lines)
    quant = None
    if isinstance(raw_quant, dict):
        try:
            quant = validate_component("quantizer", raw_quant, "quantizer", reg)
        except ConfigError as exc:
            lines.extend(exc.lines)
    if lines or run is None:
        raise ConfigError(lines)
    run = run.model_copy(update={"cell": resolved["cell"], "task": resolved["task"],
                                 "regularizers": regs, "quantizer": quant})
    if check:
        check_compatibility(run, reg)
    return run


def time_aware_cells(spec: dict[str, Any], registry: Any, _depth: int = 0) -> list[str]:
    """The chain of cell names, outermost first, down to the first cell in ``spec`` that reads per-step
    timestamps (the cell itself, or an inner cell of a wrapper at any depth); empty when none does."""
    cls = registry.get("cell", spec["name"]).obj
    config = component_config("cell", spec, registry)
    needs = getattr(cls, "needs_times", None)  # a cell may need times only under some options
    if (needs(config) if callable(needs) else getattr(cls, "uses_time", False)):
        return [spec["name"]]
    inner = getattr(cls, "inner_cell_specs", None)
    if _depth < 16 and callable(inner):
        for sub in inner(config):
            chain = time_aware_cells(sub, registry, _depth + 1)
            if chain:
                return [spec["name"], *chain]
    return []


def check_compatibility(run: RunConfig, registry: Any) -> None:
    """Fail at config time on combinations that cannot work."""
    cell_cls = registry.get("cell", run.cell["name"]).obj
    task_cls = registry.get("task", run.task["name"]).obj
    timed = time_aware_cells(run.cell, registry)
    if timed and not getattr(task_cls, "provides_times", False):
        where = "" if timed == [run.cell["name"]] else f" (through its inner cell '{timed[-1]}')"
        raise ConfigError(
            f"cell.name: cell '{run.cell['name']}'{where} reads per-step timestamps but task '{run.task['name']}' "
            f"provides none; choose a task with timestamps or set the cell's option to use step indices if it has one"
        )
    if getattr(task_cls, "stream", False) and not getattr(cell_cls, "supports_state_carry", True):
        raise ConfigError(
            f"cell.name: cell '{run.cell['name']}' cannot carry state across chunks, which the stream task "
            f"'{run.task['name']}' needs"
        )
    if run.tracking.register_model and not (run.tracking.enabled and run.tracking.log_checkpoint):
        raise ConfigError("tracking.register_model: needs tracking.enabled=true and tracking.log_checkpoint=true")
    if run.train.clip_norm is not None and run.train.clip_value is not None:
        raise ConfigError("train.clip_value: set either train.clip_norm or train.clip_value, not both")


def resolve_recipe(name: str, registry: Any | None = None, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe's raw mapping with its ``base`` chain merged in (base first)."""
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    if name in _seen:
        raise ConfigError(f"recipe '{name}' extends itself through base: {' -> '.join(_seen + (name,))}")
    try:
        data = copy.deepcopy(reg.get("recipe", name).obj)
    except UnknownNameError as exc:
        raise ConfigError(str(exc)) from exc
    base = data.pop("base", None)
    if base:
        data = deep_merge(resolve_recipe(base, reg, _seen + (name,)), data)
    return data


def build_run_config(
    plugin: str | None = None,
    recipe: str | None = None,
    config_files: tuple[str, ...] | list[str] = (),
    overrides: tuple[str, ...] | list[str] = (),
    registry: Any | None = None,
    check: bool = True,
) -> RunConfig:
    """Resolve a run: plugin default recipe (or ``recipe``), then config files, then overrides
    (``check``: see :func:`validate_run`)."""
    from seqplat.registry import get_registry

    reg = registry or get_registry()
    defaults = RunConfig()
    data: dict[str, Any] = {"cell": dict(defaults.cell), "task": dict(defaults.task)}
    if recipe is not None:
        if "/" not in recipe and plugin:
            recipe = f"{plugin}/{recipe}"
        data = resolve_recipe(recipe, reg)
    elif plugin is not None:
        if plugin not in reg.plugins:
            raise ConfigError(f"--plugin: {UnknownNameError('plugin', plugin, reg.plugins)}")
        info = reg.plugins[plugin]
        if info.broken:
            raise ConfigError(
                f"--plugin: plugin '{plugin}' is broken ({info.error}); run `seqplat plugins info {plugin}` "
                f"or disable it with SEQPLAT_BLOCK_PLUGINS={plugin}"
            )
        default = f"{plugin}/default"
        if default not in reg.entries["recipe"]:
            raise ConfigError(f"--plugin: plugin '{plugin}' has no default recipe '{default}'; use --recipe")
        data = resolve_recipe(default, reg)
    for url in config_files:
        data = deep_merge(data, read_config_file(url))
    for assignment in overrides:
        data = apply_override(data, assignment)
    return validate_run(data, reg, check)
