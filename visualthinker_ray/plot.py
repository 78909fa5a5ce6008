"""A PNG of a training run from its TensorBoard logs: reward, held-out accuracy, response length."""

from __future__ import annotations

from pathlib import Path

from visualthinker_ray.errors import InputError
from visualthinker_ray.tracking import read_scalars

PANELS = [
    ("Training reward", ["reward/total", "reward/format", "reward/accuracy"]),
    ("Held-out accuracy (CV-Bench format)", ["eval/accuracy/overall", "eval/accuracy/*"]),
    ("Training accuracy by question type", ["accuracy_by_type/*"]),
    ("Response length and self-reflection", ["response_length/mean", "response/self_reflection_rate"]),
]


def _matching(scalars: dict, patterns: list[str]) -> list[str]:
    tags = []
    for p in patterns:
        if p.endswith("/*"):
            tags += sorted(t for t in scalars if t.startswith(p[:-1]) and t not in tags and t not in patterns)
        elif p in scalars:
            tags.append(p)
    return tags


def plot_run(log_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"log folder {log_dir} does not exist (it is the run's logging.dir)")
    scalars = read_scalars(log_dir)
    if not scalars:
        raise InputError(f"no TensorBoard scalars under {log_dir}: is it a training run's logging.dir?")
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for ax, (panel, patterns) in zip(axes.flat, PANELS, strict=True):
        tags = _matching(scalars, patterns)
        right = None
        for tag in tags:
            steps, values = zip(*scalars[tag], strict=True)
            # Length is in tokens, the rest are rates: give length its own axis.
            if tag == "response_length/mean":
                right = ax.twinx()
                right.plot(steps, values, color="tab:gray", label=tag)
                right.set_ylabel("tokens")
                right.legend(loc="upper right", fontsize=8)
            else:
                ax.plot(
                    steps, values, marker="o" if tag.startswith("eval/") else None, markersize=3, label=tag
                )
        ax.set_title(panel if tags else f"{panel} (not logged)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tags and any(t != "response_length/mean" for t in tags):
            ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or str(log_dir))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
