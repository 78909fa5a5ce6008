"""`python -m visualthinker_ray <command>`: the project's command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from visualthinker_ray.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS

log = logging.getLogger("visualthinker_ray")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the embedded tiny CPU job)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. algorithm.beta=0.0"
    )


def cmd_make_tiny_model(args) -> int:
    from visualthinker_ray.toy.tiny_model import make_tiny_model

    t0 = time.time()
    out = make_tiny_model(
        args.out,
        seed=args.seed,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        vision_depth=args.vision_depth,
        vision_embed_dim=args.vision_width,
        init=args.init,
        rope_theta=args.rope_theta,
    )
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"tiny Qwen2-VL written to {out} ({size_mb:.1f} MB, {time.time() - t0:.1f} s, seed {args.seed})")
    return 0


def cmd_make_synthetic(args) -> int:
    from visualthinker_ray.toy.synthetic import make_synthetic

    make_synthetic(
        args.out, n_train=args.train, n_test=args.test, seed=args.seed, image_size=args.image_size,
        question_types=args.question_types, cvbench_tasks=args.cvbench_tasks,
        same_shape_sizes=args.same_shape_sizes,
    )  # fmt: skip
    return 0


def cmd_show_config(args) -> int:
    from visualthinker_ray.config import config_reference, dump_config, load_config

    if args.reference:
        print(config_reference())
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_generate(args) -> int:
    from visualthinker_ray.config import load_config
    from visualthinker_ray.generate_pass import run_generation_pass

    cfg = load_config(args.config, args.overrides)
    run_generation_pass(cfg, num_prompts=args.prompts, show_samples=args.samples)
    return 0


def cmd_train(args) -> int:
    from visualthinker_ray.config import load_config
    from visualthinker_ray.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume)
    try:
        trainer.fit()
    finally:
        trainer.shutdown()
    _report_run(trainer)
    return 0


def cmd_scale(args) -> int:
    import ray

    from visualthinker_ray.control import find_control

    control = find_control(args.job, args.address)
    status = ray.get(control.request_rollout.remote(args.rollout), timeout=60)
    print(
        f"asked job {args.job!r} for {args.rollout} rollout worker(s); at its last step it had "
        f"{status.get('rollout_serving', '?')} serving and {status.get('rollout_joining', '?')} starting"
    )
    if status.get("scale_with_cluster"):
        print("note: this job follows the cluster's rollout resources (rollout.scale_with_cluster), which "
              "overrides this request at the next step: resize the rollout node group instead")  # fmt: skip
    return 0


def _report_run(trainer) -> None:
    """What a finished run shows: the held-out accuracy table and a PNG of its curves."""
    from visualthinker_ray.evaluate import format_progress
    from visualthinker_ray.plot import plot_run

    print(format_progress(trainer.evaluations))
    try:
        png = plot_run(trainer.log_dir, trainer.log_dir / "training.png")
        print(f"curves: {png}")
    except Exception as e:  # the run itself is done and saved: a plot failure must not fail it
        log.warning(
            "could not plot the run's curves (%s); try: python -m visualthinker_ray plot --logdir %s",
            e,
            trainer.log_dir,
        )


def cmd_eval(args) -> int:
    from visualthinker_ray.config import load_config
    from visualthinker_ray.evaluate import run_eval

    cfg = load_config(args.config, args.overrides)
    run_eval(cfg, args.model, args.data or cfg.data.eval, args.out)
    return 0


def cmd_warmup(args) -> int:
    import json

    from visualthinker_ray.toy.warmup import GroundedFamilies, format_and_accuracy, warmup

    families = None
    if args.question_types or args.cvbench_tasks or args.same_shape_sizes:
        families = GroundedFamilies(
            tuple(args.question_types) if args.question_types else None,
            tuple(args.cvbench_tasks) if args.cvbench_tasks else None,
            args.same_shape_sizes,
        )
    summary = warmup(
        args.model, args.data, args.out, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        seed=args.seed, limit=args.limit, log_every=args.log_every,
        lettered_fraction=args.lettered_fraction, reasoning=args.reasoning, families=families,
    )  # fmt: skip
    if args.check_prompts > 0:
        check = format_and_accuracy(
            args.out, args.data, n_prompts=args.check_prompts, group_size=args.check_group_size,
            max_new_tokens=args.max_new_tokens, seed=args.seed,
        )  # fmt: skip
        print(
            f"[warmup] check on {check['prompts']} held-out prompts x {args.check_group_size} (T=1.0): "
            f"format {check['format']:.3f}, accuracy {check['accuracy']:.3f} (chance {check['chance']:.3f}), "
            f"answer is an option {check['option_rate']:.3f}, mean length {check['mean_tokens']:.1f} tokens, "
            f"truncated {check['truncated']:.3f}"
        )
        for text in check.pop("samples")[:2]:
            print(f"  sample: {text!r}")
        summary["check"] = check
        path = f"{args.out}/warmup.json"
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def cmd_plot(args) -> int:
    from visualthinker_ray.plot import plot_run

    out = plot_run(args.logdir, args.out or f"{args.logdir}/training.png", args.title)
    print(f"plot written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visualthinker-ray",
        description="GRPO post-training of Qwen2-VL (VisualThinker-R1-Zero) as a Ray application.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and vLLM's own INFO logs"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny-model", help="write a tiny random Qwen2-VL in HF format (CPU tests, demos)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--hidden-size", type=int, default=128, help="a multiple of 64")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--vision-depth", type=int, default=2, help="vision transformer blocks")
    p.add_argument("--vision-width", type=int, default=32, help="vision embedding width (a multiple of 16)")
    p.add_argument(
        "--init",
        choices=("hf", "fan_in"),  # toy.tiny_model.INITS (not imported here: torch is slow to import)
        default="hf",
        help="weight init: hf (std 0.02) or fan_in (std 1/sqrt(fan_in); image features reach the LM)",
    )
    p.add_argument(
        "--rope-theta",
        type=float,
        default=1_000_000.0,
        help="text M-RoPE base (Qwen2-VL: 1e6); 10 gives image columns clearly different rotations",
    )
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("make-synthetic", help="render synthetic SAT- and CV-Bench-format parquet data")
    p.add_argument("--out", required=True, help="output folder (gets SAT/ and CV-Bench/)")
    p.add_argument("--train", type=int, default=512, help="SAT train rows")
    p.add_argument("--test", type=int, default=128, help="CV-Bench rows (and SAT val/test rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112, help="square image side in pixels")
    from visualthinker_ray.toy.synthetic import add_family_options  # PIL only: cheap at start-up

    add_family_options(p)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("generate", help="a graded generation pass over training prompts, printed as a table")
    _add_config_args(p)
    p.add_argument(
        "--prompts", type=int, default=16, help="how many prompts (each gets algorithm.group_size)"
    )
    p.add_argument("--samples", type=int, default=2, help="how many completions to print in full")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="GRPO training: rollout workers, reward pool and learner group on Ray")
    _add_config_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint under checkpoint.dir"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("scale", help="resize the rollout pool of a running `train` job (no restart)")
    p.add_argument("--rollout", type=int, required=True, help="rollout workers wanted")
    p.add_argument("--job", default="visualthinker", help="the job's resources.job_name")
    p.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, else the local one)")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("eval", help="CV-Bench evaluation (greedy) through rollout workers")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="HF checkpoint folder or hub id")
    p.add_argument("--data", help="CV-Bench folder, parquet file or hub id (default: data.eval)")
    p.add_argument("--out", help="JSON results file (default: <logging.dir>/cvbench_eval.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "warmup",
        help="supervised format warm-up of the tiny model (R1-Zero format, random answers): "
        "the base-model stand-in",
    )
    p.add_argument("--model", required=True, help="the tiny model folder (make-tiny-model)")
    p.add_argument(
        "--data", required=True, help="SAT folder with SAT_train.parquet (and SAT_val for the check)"
    )
    p.add_argument("--out", required=True, help="output folder for the warmed-up model")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument(
        "--lettered-fraction", type=float, default=0.5,
        help="share of examples shown CV-Bench style (lettered choices), so evaluation prompts are known",
    )  # fmt: skip
    p.add_argument(
        "--reasoning", choices=["template", "grounded"], default="template",
        help="template: fixed sentences on --data's records; grounded: fresh synthetic questions whose "
        "reasoning says where the asked-about objects are (a base that can see; needs thousands of steps)",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use the first N training rows")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--check-prompts", type=int, default=32, help="held-out prompts for the check (0: skip)")
    p.add_argument("--check-group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    # With --reasoning grounded: draw only these families (match the data RL trains on).
    add_family_options(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("plot", help="PNG of reward, held-out accuracy and response length from a run's logs")
    p.add_argument("--logdir", required=True, help="the run's logging.dir")
    p.add_argument("--out", help="PNG path (default: <logdir>/training.png)")
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("show-config", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(p)
    p.add_argument(
        "--reference", action="store_true", help="print every key, default and meaning as Markdown"
    )
    p.set_defaults(func=cmd_show_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        for noisy in ("httpx", "datasets", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from visualthinker_ray.config import ConfigError
    from visualthinker_ray.errors import InputError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, InputError) as e:
        # Errors the user can fix: the message says what to do; no traceback unless --verbose.
        # Anything else (a bug) keeps its traceback.
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
