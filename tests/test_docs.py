"""The README a user acts on matches the code: its config keys exist, its commands and flags parse,
the files and figures it names are in the repository, and it stays a page (at most 20 KB)."""

import re
import sys
from pathlib import Path

import pytest

from visualthinker_ray.cli import build_parser
from visualthinker_ray.config import Config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def subcommands() -> dict:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


def test_readme_is_at_most_20_kb():
    assert len(README.encode()) <= 20_000, "move detail to docs/ (the README is for users)"


def test_every_config_key_the_readme_names_exists():
    sections = set(Config.model_fields)
    named = set(re.findall(r"\b(" + "|".join(sections) + r")\.([a-z_]+)\b", README))
    assert len(named) > 20  # the pattern finds them
    named -= {("algorithm", "betta"), ("checkpoint", "py")}  # the bad-key example; a module
    unknown = [f"{s}.{k}" for s, k in sorted(named) if k not in type(getattr(Config(), s)).model_fields]
    assert not unknown, f"README names config keys the code does not have: {unknown}"


def test_every_command_and_flag_in_the_readme_parses():
    commands = subcommands()
    rows = re.findall(r"^\| `([a-z-]+)( [^`]*)?` \|", README, flags=re.M)
    assert {name for name, _ in rows} == set(commands), "the command table lists every subcommand"
    for name, usage in rows:
        flags = set(re.findall(r"--[a-z-]+", usage))
        known = {opt for action in commands[name]._actions for opt in action.option_strings}
        assert flags <= known, f"{name}: {flags - known} not accepted"
    for name in re.findall(r"python -m visualthinker_ray ([a-z-]+)", README):
        assert name in commands, name


@pytest.mark.parametrize("doc", ["README.md", "bench/README.md", "docs/README.md", "cluster/README.md"])
def test_every_repository_file_a_document_names_exists(doc):
    text = (REPO / doc).read_text()
    base = (REPO / doc).parent
    links = [m for m in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in m]
    paths = re.findall(
        r"`((?:bench|docs|jobs|scripts|cluster|start_models|tests|visualthinker_ray)/[\w./-]+\.\w+)`", text
    )
    assert links or paths
    missing = [p for p in links if not (base / p).exists()] + [p for p in paths if not (REPO / p).exists()]
    missing = [p for p in missing if p != "bench/results/gpu_check.json"]  # written by the GPU check
    assert not missing, f"{doc} names files that are not in the repository: {missing}"


EXPERIMENTS = REPO / "docs" / "experiments"


@pytest.mark.parametrize(
    "script", sorted(p.name for p in EXPERIMENTS.glob("*.py") if "\nROOT = " in p.read_text())
)
def test_every_experiment_script_finds_the_repository(script, monkeypatch):
    """The research scripts run from docs/experiments/: their paths (config, artifacts, results)
    hang off ROOT, which must be the repository root."""
    import importlib.util

    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # as when the script runs: its helpers beside it
    spec = importlib.util.spec_from_file_location(f"experiment_{script[:-3]}", EXPERIMENTS / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert Path(module.ROOT) == REPO


def test_every_benchmark_result_file_is_cited_by_a_document():
    """bench/results/ holds what the documents show; a file nobody cites goes."""
    docs = [
        REPO / "README.md",
        REPO / "bench" / "README.md",
        *REPO.glob("docs/**/*.md"),
        *REPO.glob("cluster/*.md"),
    ]
    text = "\n".join(p.read_text() for p in docs)
    uncited = [p.name for p in sorted((REPO / "bench" / "results").iterdir()) if p.name not in text]
    assert not uncited, f"no document cites {uncited}: cite them where their figures are, or delete them"
