"""The leaderboard: the reports of several ``seqplat suite`` runs merged into one Markdown page.

Each suite folder (any fsspec URL) holds ``results.json`` (written by :func:`seqplat.core.suite.write_report`)
and ``report.md``. A *context* file (YAML) adds what the runs cannot know: the page's introduction, the
budget line of every protocol, the paper's own figure beside a recipe and free notes::

    intro: |
      Text under the title.
    machine: 2-core x86-64 CPU, one thread per run   # used when a suite did not record its machine
    protocols:
      ptb_char_1m:
        budget: "PTB characters, 1.0M parameters, ..."
        papers:
          fs_rnn/ptb_char_1m: "1.190 (FS-LSTM-2, 7.2M, 200 epochs)"
        notes: "..."

Protocols named in the context but without a suite folder are listed as not yet measured, with the
command that measures them; recipes of a measured protocol that the suite did not run are named too.
"""

from __future__ import annotations

import json
import posixpath
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from seqplat.core.errors import ConfigError

_ACCURACY = {"accuracy", "acc", "f1", "macro_f1"}


@dataclass
class SuiteReport:
    """One suite folder, read back."""

    url: str
    protocol: str
    primary: str
    runs: list[dict[str, Any]]
    commit: str | None = None
    written: str | None = None
    machine: str | None = None
    shared: str | None = None  # the report's note on runs sharing the machine (--jobs)
    extra: dict[str, Any] = field(default_factory=dict)


def count_commits(commits: Iterable[str | None]) -> dict[str, int]:
    """Runs per commit (its first 10 hex digits; ``unknown`` for a run that recorded none), first seen first."""
    counts: dict[str, int] = {}
    for c in commits:
        key = c[:10] if c else "unknown"
        counts[key] = counts.get(key, 0) + 1
    return counts


def format_commit_counts(counts: dict[str, int]) -> str:
    """``abc (3 runs), def (1 run)``."""
    return ", ".join(f"{c} ({n} run{'s' if n != 1 else ''})" for c, n in counts.items())


def _commits(rep: SuiteReport) -> str:
    """The commits the runs trained at (``abc (3 runs), def (1 run)``), else the commit the report was written at."""
    counts = count_commits(str(r["commit"]) for r in rep.runs if r.get("status") == "finished" and r.get("commit"))
    if not counts:
        return (rep.commit or "unknown")[:10]
    return next(iter(counts)) if len(counts) == 1 else format_commit_counts(counts)


def read_suite(url: str) -> SuiteReport:
    """Read ``results.json`` (and the commit line of ``report.md``) of one suite folder."""
    fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    path = posixpath.join(root, "results.json")
    if not fs.exists(path):
        raise ConfigError(f"{url}: no results.json here; give the --out folder of a finished `seqplat suite` run")
    with fs.open(path, "r") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{url}/results.json: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    report = SuiteReport(url=url, protocol=data["protocol"], primary=data["primary_metric"], runs=data["runs"],
                         commit=data.get("commit"), machine=data.get("machine"))
    md_path = posixpath.join(root, "report.md")
    if fs.exists(md_path):
        with fs.open(md_path, "r") as f:
            md = f.read()
        m = re.search(r"^Commit: ([0-9a-f]{7,40}|unknown)\. Written ([^.\n]*)", md, flags=re.M)
        if m:
            report.commit = report.commit or (m.group(1) if m.group(1) != "unknown" else None)
            report.written = m.group(2)
        m = re.search(r"(\d+ runs trained at a time \(--jobs \d+\))", md)
        if m:
            report.shared = m.group(1)
    return report


def load_context(url: str | None) -> dict[str, Any]:
    """The context YAML (empty when ``url`` is None)."""
    if url is None:
        return {}
    try:
        with fsspec.open(url, "r") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"--context: file not found: {url}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--context: {url} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("protocols", {}), dict):
        raise ConfigError(f"--context: {url} must be a mapping with an optional 'protocols' mapping")
    return data


def _is_accuracy(primary: str) -> bool:
    return primary in _ACCURACY or primary.endswith("accuracy")


def _fmt(values: list[float], digits: int, scale: float = 1.0) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:,.{digits}f}"
    return f"{statistics.fmean(vals):,.{digits}f} ± {statistics.stdev(vals):,.{digits}f}"


def _steps(values: list[int | None]) -> str:
    """Training steps: one number when every seed ran the same, else each seed's."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{vals[0]:,}" if len(set(vals)) == 1 else " / ".join(f"{v:,}" for v in vals)


def _rows(report: SuiteReport, papers: dict[str, str]) -> list[str]:
    primary = report.primary
    acc = _is_accuracy(primary)
    scale, digits = (100.0, 2) if acc else (1.0, 4 if primary in ("loss", "mse") else 3)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in report.runs:
        groups.setdefault(r["recipe"], []).append(r)

    def order(recipe: str) -> tuple[int, str]:
        cell = groups[recipe][0]["cell"]
        return (0 if recipe.startswith("baselines/") else 1 if cell == "lstm" else 2, recipe)

    rows = []
    for recipe in sorted(groups, key=order):
        runs = groups[recipe]
        ok = [r for r in runs if r["status"] == "finished"]
        params = sorted({r["num_parameters"] for r in ok if r.get("num_parameters") is not None})
        valid = [r["valid_metrics"].get(primary) for r in ok]
        test = [r["test_metrics"].get(primary) for r in ok]
        status = "" if len(ok) == len(runs) else f" ({len(runs) - len(ok)} failed)"
        rows.append(
            f"| {runs[0]['cell']} | `{recipe}` | {papers.get(recipe, '-')} "
            f"| {', '.join(f'{p:,}' for p in params) or '-'} | {_fmt(valid, digits, scale)} "
            f"| {_fmt(test, digits, scale)} | {_fmt([r.get('train_tokens_per_s') for r in ok], 0)} "
            f"| {_fmt([r.get('peak_memory_mb') for r in ok], 0)} | {_fmt([r.get('wall_time_s') for r in ok], 0)} "
            f"| {_steps([r.get('steps') for r in ok])} | {', '.join(str(r['seed']) for r in ok) or '-'}{status} |"
        )
    return rows


def render(reports: list[SuiteReport], context: dict[str, Any], registry: Any | None = None) -> str:
    """The leaderboard page: one section per protocol (context order first, then the others)."""
    from seqplat.core.suite import protocol_cells

    protos: dict[str, Any] = context.get("protocols") or {}
    by_protocol: dict[str, SuiteReport] = {}
    for rep in reports:
        if rep.protocol in by_protocol:
            raise ConfigError(f"{rep.url}: a second suite of protocol '{rep.protocol}' "
                              f"(first: {by_protocol[rep.protocol].url}); give one folder per protocol")
        by_protocol[rep.protocol] = rep
    names = list(protos) + [p for p in by_protocol if p not in protos]
    lines = ["# Leaderboard", ""]
    if context.get("intro"):
        lines += [str(context["intro"]).strip(), ""]
    lines += ["| protocol | measured | commit | written | machine |", "|---|---|---|---|---|"]
    for name in names:
        rep = by_protocol.get(name)
        if rep is None:
            lines.append(f"| [`{name}`](#{name}) | not yet measured | - | - | - |")
        else:
            machine = rep.machine or context.get("machine") or "not recorded"
            lines.append(f"| [`{name}`](#{name}) | {len(rep.runs)} runs | {_commits(rep)} "
                         f"| {rep.written or '-'} | {machine}{'; ' + rep.shared if rep.shared else ''} |")
    lines.append("")
    for name in names:
        meta = protos.get(name) or {}
        rep = by_protocol.get(name)
        lines += [f"## `{name}`", ""]
        if meta.get("budget"):
            lines += [str(meta["budget"]).strip(), ""]
        command = f"seqplat suite --protocol {name} --jobs 2 --set train.threads=1 --out docs/leaderboard/{name}"
        if rep is None:
            lines += ["Not yet measured. Command: `" + command + "`", ""]
        else:
            metric = rep.primary + (" (%)" if _is_accuracy(rep.primary) else "")
            lines += [
                f"Metric: **{metric}**; valid and test are the mean ± standard deviation over the seeds listed.",
                "",
                f"| cell | recipe | paper | params | valid {metric} | test {metric} | tokens/s | peak memory (MB) "
                f"| wall time (s) | steps | seeds |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
                *_rows(rep, meta.get("papers") or {}),
                "",
            ]
            try:
                known = [c.recipe for c in protocol_cells(name, registry)]
            except ConfigError:
                known = []
            missing = [r for r in known if r not in {run["recipe"] for run in rep.runs}]
            if missing:
                lines += ["Installed recipes of this protocol not in this suite run (not yet measured): "
                          + ", ".join(f"`{r}`" for r in missing) + ".", ""]
            lines += [f"Command: `{command}` (with `--cells` naming the recipes above).", ""]
        if meta.get("notes"):
            lines += [str(meta["notes"]).strip(), ""]
    return "\n".join(lines).rstrip() + "\n"
