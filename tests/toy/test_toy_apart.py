"""The toy stand-ins (tiny model, synthetic data, warm-up) stay out of the training path."""

import subprocess
import sys

# Every module a training run loads on the driver and in its actors.
TRAINING_PATH = [
    "visualthinker_ray.trainer",
    "visualthinker_ray.evaluate",
    "visualthinker_ray.learner.worker",
    "visualthinker_ray.learner.group",
    "visualthinker_ray.rollout.worker",
    "visualthinker_ray.rollout.pool",
    "visualthinker_ray.rollout.hf_engine",
    "visualthinker_ray.rollout.vllm_engine",
    "visualthinker_ray.reward_pool",
    "visualthinker_ray.weight_sync.vllm_receiver",
    "visualthinker_ray.data.sat",
    "visualthinker_ray.data.cvbench",
]


def test_no_training_module_imports_the_toy_subpackage():
    code = (
        "import importlib, sys\n"
        f"for m in {TRAINING_PATH!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.startswith('visualthinker_ray.toy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the training path imports {out.stdout.strip()}"


def test_no_module_outside_toy_and_the_command_line_names_it():
    """Also lazy, in-function imports: only cli.py (the make-tiny-model, make-synthetic and warmup
    commands) may reach the toy subpackage."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "visualthinker_ray"
    naming = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if "toy" not in p.relative_to(package).parts
        and p.name != "cli.py"
        and "visualthinker_ray.toy" in p.read_text()
    ]
    assert naming == []
