"""What a newcomer waits for: the README's two commands, timed from `git clone`.

Run: python3 bench/bench_fresh_clone.py [--dir /tmp/vtr-fresh] [--ref HEAD] [--skip-tests]
     [--no-pip-cache] [--results bench/results/fresh_clone.json] [-- key=value ...]

Clones this repository (the committed tree at --ref, nothing uncommitted) into an empty folder and
runs there, one after the other: `bash scripts/quickstart.sh` (set-up, data, the embedded default
job to its table and plot) and `bash scripts/test.sh` (the test command). It times the phases of
the main command from the lines it prints: the environment set-up, the data and start-model check,
the start of RL (the trainer's "training steps" line, after the step-0 evaluation) and the end.
The pip cache of the machine is used unless --no-pip-cache (then every wheel is downloaded again).
Arguments after `--` are config overrides for the main command (e.g. the smoke variant
`algorithm.max_steps=3`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (phase, the first output line that ends it)
MILESTONES = [
    ("environment", re.compile(r"^\[setup\] (done in|.* is up to date)")),
    ("data", re.compile(r"^start model .*: checksums match")),
    ("rl_start", re.compile(r"training steps \d+-\d+")),
]


def run_timed(cmd: list[str], cwd: Path, env: dict, log_path: Path, t0: float) -> tuple[int, dict, list[str]]:
    """Run `cmd`, tee its output to log_path, and note when each milestone's line first appears."""
    seen: dict[str, float] = {}
    lines: list[str] = []
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line)  # the commands' own progress output
            lines.append(line.rstrip("\n"))
            for name, pattern in MILESTONES:
                if name not in seen and pattern.search(line.strip()):
                    seen[name] = time.monotonic() - t0
        rc = proc.wait()
    return rc, seen, lines


def held_out_table(lines: list[str]) -> list[str]:
    start = next((i for i, line in enumerate(lines) if line.strip() == "held-out accuracy"), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("step 0 ->")), len(lines) - 1)
    return lines[start : end + 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/vtr-fresh", help="the clone's folder (emptied first)")
    p.add_argument("--ref", default="HEAD", help="the commit to clone")
    p.add_argument("--skip-tests", action="store_true", help="time the main command only")
    p.add_argument("--skip-main", action="store_true", help="time the test command only")
    p.add_argument("--no-pip-cache", action="store_true", help="download every wheel again")
    p.add_argument("--results", default="bench/results/fresh_clone.json")
    p.add_argument("overrides", nargs="*", help="config overrides for the main command")
    args = p.parse_args()

    clone = Path(args.dir)
    if clone.exists():
        shutil.rmtree(clone)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS")}
    if args.no_pip_cache:
        env["PIP_NO_CACHE_DIR"] = "1"
    commit = subprocess.run(
        ["git", "rev-parse", args.ref], cwd=ROOT, capture_output=True, text=True, check=True
    )
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", "--no-local", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "--quiet", commit.stdout.strip()], cwd=clone, check=True)
    print(f"[fresh-clone] cloned {commit.stdout.strip()[:10]} into {clone}", flush=True)
    rc, seen, lines = 0, {}, []
    if not args.skip_main:
        main = ["bash", "scripts/quickstart.sh", *args.overrides]
        rc, seen, lines = run_timed(main, clone, env, clone / "quickstart.log", t0)
    main_s = time.monotonic() - t0
    if rc != 0:
        sys.exit(f"[fresh-clone] the main command failed (exit {rc}); its output: {clone / 'quickstart.log'}")
    table = held_out_table(lines)
    phases, last = [], 0.0
    for name, _ in MILESTONES:
        if name in seen:
            phases.append((name, seen[name] - last))
            last = seen[name]
    phases.append(("rl_to_end", main_s - last))

    tests = None
    if not args.skip_tests:
        print("[fresh-clone] running the test command", flush=True)
        t1 = time.monotonic()
        rc, _, test_lines = run_timed(["bash", "scripts/test.sh"], clone, env, clone / "test.log", t1)
        summary = next((line for line in reversed(test_lines) if re.search(r"\d+ (passed|failed)", line)), "")
        tests = {"exit_code": rc, "wall_s": round(time.monotonic() - t1, 1), "summary": summary.strip("= ")}

    print("\n| phase | from clone, s | phase, s |\n| --- | --- | --- |")
    for name, _ in MILESTONES:
        if name in seen:
            print(f"| {name} | {seen[name]:.0f} | {dict(phases)[name]:.0f} |")
    if not args.skip_main:
        print(f"| main command done | {main_s:.0f} | {dict(phases)['rl_to_end']:.0f} |")
    if tests:
        print(f"| test command | | {tests['wall_s']:.0f} ({tests['summary']}) |")
    print("\n".join(table))
    result = {
        "bench": "fresh_clone",
        "commit": commit.stdout.strip(),
        "overrides": args.overrides,
        "pip_cache": not args.no_pip_cache,
        "milestones_s": {k: round(v, 1) for k, v in seen.items()},
        "main_command_s": None if args.skip_main else round(main_s, 1),
        "held_out_table": table,
        "test_command": tests,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "command": " ".join(["bench/bench_fresh_clone.py", *sys.argv[1:]]),
    }
    out = ROOT / args.results
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[fresh-clone] results: {out}")
    if tests and tests["exit_code"] != 0:
        sys.exit(f"[fresh-clone] the test command failed; its output: {clone / 'test.log'}")


if __name__ == "__main__":
    main()
