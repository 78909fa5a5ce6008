"""Where metrics go: TensorBoard event files and a console progress bar with ETA."""

from __future__ import annotations

import html
import logging
from pathlib import Path

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


class Tracker:
    def __init__(self, log_dir: str | Path, total_steps: int, start_step: int = 0, progress: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # A resumed run hides what a killed one logged after its last checkpoint (those steps are redone).
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_step + 1 if start_step else None)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def log_scalars(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few completions as text (prompt question, gold, completion, rewards)."""
        parts = []
        for s in samples:
            parts.append(
                f"**{html.escape(s['prompt_id'])}** (gold: `{html.escape(s['gold'])}`, reward {s['total']:.2f})\n\n"
                f"    {html.escape(s['text']).replace(chr(10), chr(10) + '    ')}\n"
            )
        self.writer.add_text("samples", "\n".join(parts), step)
        self.writer.flush()

    def step_done(self, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {short: f"{metrics[key]:.3g}" for key, short in CONSOLE_KEYS if key in metrics}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars in a TensorBoard log folder: {tag: [(step, value), ...]} sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}
