"""Read back what the W&B (offline) and MLflow (local) sinks stored, through their own files and
client, for the tracker tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of CRC'd records


def wandb_runs(log_dir: Path) -> list[Path]:
    return sorted((Path(log_dir) / "wandb").glob("offline-run-*"))


def _wandb_records(run_dir: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    raw = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert raw[:4] == b":W&B", "not a W&B run file"
    pos, chunk = 7, b""
    while pos + 7 <= len(raw):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
    return rows


def wandb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(trainer/step, value), ...]} as the W&B charts show them."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in wandb_history(run_dir):
        step = row["trainer/step"]
        for key, value in row.items():
            internal = key.startswith(("_", "samples/")) or key == "trainer/step"  # W&B's, the table's
            if not internal and isinstance(value, (int, float)):
                out.setdefault(key, []).append((step, float(value)))
    return out


def wandb_tables(run_dir: Path) -> list[tuple[int, dict]]:
    """[(trainer/step, {"columns": [...], "data": [...]})] of the logged sample tables."""
    tables = []
    for row in wandb_history(run_dir):
        if row.get("samples/_type") == "table-file":
            tables.append(
                (row["trainer/step"], json.loads((run_dir / "files" / row["samples/path"]).read_text()))
            )
    return tables


def mlflow_run(log_dir: Path):
    from mlflow import MlflowClient

    run_id = json.loads((Path(log_dir) / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(Path(log_dir) / 'mlflow.db').resolve()}")
    return client, client.get_run(run_id)


def mlflow_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    client, run = mlflow_run(log_dir)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
