"""Where metrics go: TensorBoard event files (always), optionally W&B and MLflow, and a console
progress bar with ETA.

Every sink gets the same scalars and the same sample completions. A resumed run continues the same
W&B / MLflow run (their ids are kept in <logging.dir>/trackers.json); the steps it redoes after the
last checkpoint are logged again at their step numbers.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from visualthinker_ray.errors import InputError

log = logging.getLogger(__name__)

# Shown on the progress bar, in this order, when present.
CONSOLE_KEYS = [
    ("reward/total", "reward"),
    ("reward/accuracy", "acc"),
    ("reward/format", "fmt"),
    ("response_length/mean", "len"),
    ("learner/kl", "kl"),
    ("time/step_s", "s/step"),
]

# The Python packages each optional tracker needs (pip extra "trackers").
TRACKER_PACKAGES = {"wandb": ["wandb"], "mlflow": ["mlflow", "sqlalchemy", "alembic"]}
SAMPLE_COLUMNS = ["step", "prompt_id", "gold", "reward", "completion"]


def check_trackers(trackers: list[str]) -> None:
    """Fail before any actor starts when a tracker's package is missing."""
    for name in trackers:
        missing = [p for p in TRACKER_PACKAGES.get(name, []) if importlib.util.find_spec(p) is None]
        if missing:
            raise InputError(
                f"logging.trackers names {name!r} but {', '.join(missing)} is not installed: "
                "pip install 'visualthinker-ray[trackers]', or remove it from logging.trackers"
            )


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def samples_markdown(samples: list[dict]) -> str:
    parts = []
    for s in samples:
        parts.append(
            f"**{html.escape(s['prompt_id'])}** (gold: `{html.escape(s['gold'])}`, reward {s['total']:.2f})\n\n"
            f"    {html.escape(s['text']).replace(chr(10), chr(10) + '    ')}\n"
        )
    return "\n".join(parts)


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"learner.lr": "0.0005", ...}: a nested config as the flat string params MLflow takes."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def mlflow_key(key: str) -> str:
    """MLflow takes letters, digits, _ - . / and spaces in a metric name (on every platform)."""
    return re.sub(r"[^\w./\- ]", "_", key)


class TensorBoardSink:
    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides what a killed one logged after its last checkpoint (those steps are redone).
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def samples(self, step: int, samples: list[dict]) -> None:
        self.writer.add_text("samples", samples_markdown(samples), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbSink:
    """W&B's own step counter only grows, so every log carries the trainer's step as `trainer/step`,
    which the charts use as their x axis (redone steps after a resume are then kept, not dropped)."""

    def __init__(self, run_id: str | None, project: str, name: str, log_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=name, id=run_id, resume="allow" if run_id else None,
            dir=str(log_dir), config=config,
        )  # fmt: skip
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")
        self.run_id = self.run.id

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "trainer/step": step})

    def samples(self, step: int, samples: list[dict]) -> None:
        rows = [[step, s["prompt_id"], s["gold"], s["total"], s["text"]] for s in samples]
        self.run.log({"samples": self.wandb.Table(columns=SAMPLE_COLUMNS, data=rows), "trainer/step": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowSink:
    def __init__(
        self, run_id: str | None, experiment: str, name: str, log_dir: Path, uri: str | None, config: dict
    ):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(log_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                artifacts = (log_dir / "mlflow-artifacts").resolve().as_uri()
                experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = [Param(k, v) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                self.client.log_batch(run_id, params=params[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.uri = uri

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def samples(self, step: int, samples: list[dict]) -> None:
        self.client.log_text(self.run_id, samples_markdown(samples), f"samples/step_{step:06d}.md")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Tracker:
    def __init__(
        self,
        log_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        trackers: list[str] = (),
        project: str = "visualthinker-ray",
        run_name: str | None = None,
        config: dict | None = None,
        mlflow_tracking_uri: str | None = None,
    ):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # The trainer already called check_trackers before its actors started; other callers
        # (tests, scripts) get the same clear error here rather than an ImportError in a sink.
        check_trackers(list(trackers))
        name = run_name or self.log_dir.resolve().name
        ids_file = self.log_dir / "trackers.json"
        # the same W&B / MLflow run when resuming; a run from step 0 starts new ones
        ids = json.loads(ids_file.read_text()) if start_step and ids_file.exists() else {}
        self.sinks: list[Any] = [TensorBoardSink(self.log_dir, start_step)]
        if "wandb" in trackers:
            self.sinks.append(WandbSink(ids.get("wandb"), project, name, self.log_dir, config or {}))
            ids["wandb"] = self.sinks[-1].run_id
        if "mlflow" in trackers:
            uri = mlflow_tracking_uri
            self.sinks.append(MlflowSink(ids.get("mlflow"), project, name, self.log_dir, uri, config or {}))
            ids["mlflow"] = self.sinks[-1].run_id
        if trackers:
            ids_file.write_text(json.dumps(ids))
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def log_scalars(self, step: int, metrics: dict[str, Any]) -> None:
        values = numeric(metrics)
        for sink in self.sinks:
            sink.scalars(step, values)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few completions (prompt id, gold, completion, reward) as text or a table."""
        for sink in self.sinks:
            sink.samples(step, samples)

    def step_done(self, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {short: f"{metrics[key]:.3g}" for key, short in CONSOLE_KEYS if key in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            try:
                sink.close(failed)
            except Exception:  # noqa: BLE001  a tracker that cannot close must not hide the run's error
                log.exception("closing %s failed", type(sink).__name__)


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in a TensorBoard log folder: {tag: [(step, value), ...]} sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}
