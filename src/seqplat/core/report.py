"""Run reports: the learning-curve plot and the final metrics table logged with every run."""

from __future__ import annotations

from typing import Any


def learning_curve_png(history: dict[str, list[list[float]]], path: str, title: str = "",
                       primary: str = "loss") -> None:
    """Train loss and the validation metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    tl = history.get("train_loss", [])
    if tl:
        axes[0].plot([p[0] for p in tl], [p[1] for p in tl], label="train loss")
    vl = history.get("valid_loss", [])
    if vl:
        axes[0].plot([p[0] for p in vl], [p[1] for p in vl], "o-", label="valid loss")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    key = f"valid_{primary}"
    vp = history.get(key, [])
    if vp:
        axes[1].plot([p[0] for p in vp], [p[1] for p in vp], "o-", color="C2")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def metrics_markdown(result: Any, run: Any, task: Any) -> str:
    """The final metrics of a run as a Markdown table."""
    lines = [f"# {run.cell['name']} on {run.task['name']}", "", "| metric | valid | test |", "|---|---|---|"]
    for k in sorted(set(result.valid_metrics) | set(result.test_metrics)):
        v = result.valid_metrics.get(k)
        t = result.test_metrics.get(k)
        lines.append(f"| {k} | {'' if v is None else f'{v:.4f}'} | {'' if t is None else f'{t:.4f}'} |")
    lines += [
        "",
        f"- parameters: {result.num_parameters:,}",
        f"- steps: {result.steps}",
        f"- train tokens/s: {result.train_tokens_per_s:,.0f}",
        f"- peak memory: {result.peak_memory_mb:,.0f} MB",
    ]
    if getattr(task, "baseline", None) is not None:
        lines.append(f"- memoryless baseline ({task.primary_metric}): {task.baseline:.4f}")
    return "\n".join(lines) + "\n"
