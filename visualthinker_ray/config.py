"""The typed config tree: YAML file + dotted command-line overrides, validated by pydantic.

The defaults ARE the embedded tiny CPU job (tiny model, synthetic data, local Ray), so every
command runs with no config at all; `jobs/sat_qwen2vl_2b.yaml` overrides them with the paper's
recipe for a GPU cluster. Every section forbids unknown keys: a typo fails at start with the key's
full dotted name and the closest valid keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The image limits of every command that reads images (28 x 28 pixels make one merged vision token):
# 4 to 16 tokens per image, what the tiny model's 112-pixel synthetic images need.
DEFAULT_MIN_PIXELS = 28 * 28 * 4
DEFAULT_MAX_PIXELS = 28 * 28 * 16


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says which and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field(
        "artifacts/tiny-model", description="HF hub id or local folder of a Qwen2-VL checkpoint"
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto: bfloat16 on GPU, float32 on CPU. bfloat16 on the CPU runs it too: vLLM serves "
        "bf16, the learner computes in bf16 over float32 master weights, the sync sends bf16",
    )
    # The image limits must be the same in the engine and the learner: both read them from here.
    min_pixels: int = Field(DEFAULT_MIN_PIXELS, gt=0, description="image processor min_pixels")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, gt=0, description="image processor max_pixels (paper: 401408)"
    )
    prompt_style: Literal["base", "instruct"] = Field(
        "base",
        description="base: R1-Zero template ending in <think>; instruct: the checkpoint's chat template",
    )
    freeze_vision: bool = Field(False, description="keep the vision tower's weights fixed")
    gradient_checkpointing: bool = Field(False, description="activation checkpointing in the learner")

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self


class DataConfig(_Section):
    train: str = Field("artifacts/data/SAT", description="SAT hub id (array/SAT), folder or parquet file")
    train_split: str = Field("train", description="SAT split (train, static, val, test)")
    train_limit: int | None = Field(None, gt=0, description="use the first N rows (paper: 15000)")
    shuffle_options: bool = Field(
        True, description="shuffle answer options with data.seed (reference run: yes)"
    )
    skip_multi_image: bool = Field(True, description="skip two-image SAT rows (counted and logged)")
    lettered_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="show this fraction of training questions the CV-Bench way (bare question, "
        "lettered options), drawn per row with data.seed; the SAT layout otherwise (paper: 0)",
    )
    eval: str = Field(
        "artifacts/data/CV-Bench",
        description="CV-Bench hub id (nyu-visionx/CV-Bench), folder or parquet file",
    )
    seed: int = Field(0, description="option shuffling, data order and sampling seeds")


class RolloutConfig(_Section):
    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm wherever it imports; hf is the fallback")
    num_workers: int = Field(1, ge=1, description="rollout worker actors")
    gpus_per_worker: float = Field(0, ge=0, description="0 on CPU")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism per worker")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM GPU memory fraction")
    max_model_len: int = Field(2048, gt=0, description="vLLM context length (prompt + completion)")
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature (paper: 1.0); the learner uses it too"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1.0: off)")
    max_new_tokens: int = Field(64, gt=0, description="paper: 700")
    eval_max_new_tokens: int = Field(64, gt=0, description="paper: 1024 (greedy)")
    stop: list[str] = Field(default_factory=list, description="stop strings, kept in the completion")
    sync_skip_frozen: bool = Field(
        True,
        description="after the first full sync over a group, leave out parameters that cannot change "
        "(model.freeze_vision)",
    )
    sync_bucket_mb: float = Field(
        256,
        gt=0,
        description="weight-sync bucket size (MiB): fewer collectives vs. a bigger flat buffer on each side",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="dead or hung rollout workers replaced within restart_window_s; one more ends the run",
    )
    restart_window_s: float = Field(3600.0, gt=0, description="the window max_restarts counts in")
    hang_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a worker that answers no health check this long (SIGSTOP, a hang) is replaced",
    )
    generate_timeout_s: float = Field(
        3600.0, gt=0, description="bound on one generation call; past it its worker is replaced"
    )
    scale_with_cluster: bool = Field(
        False,
        description="resize the pool every step to the resources.rollout_resource units the cluster has",
    )


class RewardPlugin(_Section):
    name: str
    function: str = Field(
        description="'module:function' with signature fn(completion, gold, choices) -> float"
    )
    weight: float = 1.0

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, v: str) -> str:
        module, sep, attr = v.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"expected 'module:function', got {v!r}")
        return v


class RewardConfig(_Section):
    num_workers: int = Field(1, ge=1, description="grading actors (CPU)")
    timeout_s: float = Field(5.0, gt=0, description="per-completion grading time limit")
    format_weight: float = Field(1.0, description="weight of the format reward")
    accuracy_weight: float = Field(1.0, description="weight of the accuracy reward")
    plugins: list[RewardPlugin] = Field(
        default_factory=list, description="extra rewards: [{name, function: 'module:function', weight}]"
    )


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1, description="learner ranks (one per GPU)")
    gpus_per_worker: float = Field(0, ge=0, description="0 on CPU")
    lr: float = Field(1e-6, gt=0, description="AdamW learning rate (paper: 1e-6)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="decay to 0 at the last step"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up optimizer steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clipping")
    micro_batch_tokens: int = Field(8192, gt=0, description="token budget of one forward/backward")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per rollout batch and epoch")
    update_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of each learner rank on the CPU. None: by mode (learner/worker.py "
        "cpu_plan): synchronous, the ranks share every core (generation and update take turns); "
        "pipelined, one rank takes the upper half of the cores beside vLLM. Ignored on the GPU",
    )
    cpu_affinity: list[int] | None = Field(
        None,
        description="CPU cores each learner rank's process may run on (CPU only). None: pipelined with "
        "one rank, the cores of its threads counted from the top (vLLM's CPU worker binds from core 0); "
        "otherwise any",
    )


class AlgorithmConfig(_Section):
    group_size: int = Field(8, ge=1, description="G completions per prompt")
    prompts_per_step: int = Field(8, ge=1, description="prompts per RL step (x group_size completions)")
    beta: float = Field(0.04, ge=0, description="k3 KL weight against the frozen reference; 0 skips it")
    clip_low: float = Field(0.2, ge=0, description="PPO ratio clip below 1")
    clip_high: float = Field(0.2, ge=0, description="PPO ratio clip above 1 (DAPO clip-higher if > clip_low)")
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = Field(
        "seq_mean_token_mean", description="reference run / DAPO / Dr.GRPO (sum over rollout.max_new_tokens)"
    )
    scale_adv_by_std: bool = Field(True, description="divide by the group std (False: Dr.GRPO)")
    adv_eps: float = Field(1e-4, gt=0, description="added to the group std")
    epochs: int = Field(2, ge=1, description="passes over the training prompts (paper: 2)")
    max_steps: int | None = Field(None, ge=1, description="stop after N steps (default: run all epochs)")
    loss: Literal["grpo", "dr_grpo", "gspo"] = Field(
        "grpo",
        description="grpo: loss_agg and scale_adv_by_std as set (the reference run by default); dr_grpo: "
        "token sums over a constant, no std scaling; gspo: one clipped ratio per sequence (clip_low/high "
        "default to 3e-4/4e-4)",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="0: generate, grade, update, sync in turn; k: generation runs up to k policy versions "
        "ahead of the update (1 = one-step-off). Data is never older than k: generation of a batch waits "
        "for weights recent enough, so nothing is dropped",
    )
    tis_cap: float | None = Field(
        2.0,
        gt=0,
        description="importance weights pi_proximal / pi_engine on every token's policy term, bounded "
        "by this (truncated, or masked with is_mode=mask): corrects one-step-off staleness and the "
        "engine's numerics (bf16 vLLM against the learner); null: off, the weights only logged",
    )
    is_level: Literal["token", "sequence", "geometric"] = Field(
        "token",
        description="importance weight per token, per sequence (product over its tokens), or the "
        "sequence's geometric mean (GSPO's length normalisation)",
    )
    is_mode: Literal["truncate", "mask"] = Field(
        "truncate",
        description="truncate: min(weight, tis_cap); mask: drop tokens (sequences) whose weight leaves "
        "[is_low, tis_cap] (counted in learner/is_truncated_frac)",
    )
    is_low: float | None = Field(
        None, ge=0, description="lower bound of is_mode=mask (e.g. 0.5); None: no lower bound"
    )
    dynamic_sampling: bool = Field(
        False, description="replace groups whose rewards are all equal by groups of further prompts"
    )
    dynamic_sampling_max_rounds: int = Field(
        2, ge=1, description="extra generation rounds per step at most; then dropped groups fill the batch"
    )

    @model_validator(mode="after")
    def _loss_variant(self) -> AlgorithmConfig:
        """Fill in what `loss` implies; a key set to something else contradicts it."""
        implied = {
            "grpo": {},
            "dr_grpo": {"loss_agg": "seq_mean_token_sum_norm", "scale_adv_by_std": False},
            "gspo": {"loss_agg": "seq_mean_token_mean"},
        }[self.loss]
        defaults = {"gspo": {"clip_low": 3e-4, "clip_high": 4e-4}}.get(self.loss, {})
        for key, value in implied.items():
            if key in self.model_fields_set and getattr(self, key) != value:
                raise ValueError(
                    f"algorithm.loss={self.loss} needs {key}={value} (got {getattr(self, key)!r})"
                )
            object.__setattr__(self, key, value)  # bypasses validate_assignment (no re-validation loop)
        for key, value in defaults.items():
            if key not in self.model_fields_set:
                object.__setattr__(self, key, value)
        return self

    @model_validator(mode="after")
    def _is_bounds(self) -> AlgorithmConfig:
        if self.is_low is not None and (
            self.is_mode != "mask" or self.tis_cap is None or self.is_low >= self.tis_cap
        ):
            raise ValueError(
                f"algorithm.is_low={self.is_low} needs algorithm.is_mode=mask and algorithm.tis_cap "
                f"above it (got is_mode={self.is_mode}, tis_cap={self.tis_cap})"
            )
        return self

    @property
    def ratio_level(self) -> str:
        return "sequence" if self.loss == "gspo" else "token"


class ResourcesConfig(_Section):
    ray_address: str | None = Field(None, description="None: join RAY_ADDRESS if set, else start a local Ray")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda where available")
    # KubeRay worker groups advertise these custom resources so each pool lands on its own group.
    rollout_resource: str | None = Field(None, description="custom Ray resource each rollout worker asks for")
    learner_resource: str | None = Field(None, description="custom Ray resource each learner rank asks for")
    reward_resource: str | None = Field(None, description="custom Ray resource each grader asks for")
    collective_timeout_s: float = Field(600.0, gt=0, description="bound on every collective")
    job_name: str = Field(
        "visualthinker", min_length=1, description="how `scale --job` finds this run on the Ray cluster"
    )


class LoggingConfig(_Section):
    dir: str = Field("runs/tiny", description="TensorBoard logs, steps.jsonl, config, final HF export")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="experiment trackers besides TensorBoard (always on), with the same metrics and "
        "sample completions: wandb (WANDB_MODE=offline works without network), mlflow; install "
        "with pip install 'visualthinker-ray[trackers]'",
    )
    project: str = Field(
        "visualthinker-ray", description="W&B project and MLflow experiment the run is logged to"
    )
    run_name: str | None = Field(None, description="W&B / MLflow run name (default: the last part of dir)")
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a local "
        "sqlite:///<dir>/mlflow.db with artifacts in <dir>/mlflow-artifacts)",
    )
    sample_every: int = Field(10, ge=1, description="log sample completions every K steps")
    probe_every: int = Field(
        10,
        ge=1,
        description="the sync alarm: after the sync of every K-th step (and of step 1) every rollout "
        "engine and the learner score the same fixed probe sequences on the weights they now share",
    )
    probe_size: int = Field(
        4, ge=1, description="probe sequences (completions of the first batch, one per prompt)"
    )
    probe_mismatch_warn: float | None = Field(
        None,
        gt=0,
        description="warn when the probe's worst engine differs from the learner by more than this "
        "(mean nats per token): a failed, partial or skipped sync. None: 0.05 when the model runs in "
        "bf16 (its numerics alone measured ~1e-3 here), 1e-3 in float32 (~1e-6)",
    )
    logprob_mismatch_warn: float = Field(
        0.1,
        gt=0,
        description="warn when the p99 of |engine - learner| token log-probs passes this (nats): on bf16 "
        "GPUs a weight-sync bug shows up only as this drift",
    )


class CheckpointConfig(_Section):
    dir: str | None = Field(None, description="default: <logging.dir>/checkpoints")
    every: int = Field(50, ge=1, description="checkpoint every K steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept")


class EvalConfig(_Section):
    every: int | None = Field(
        None, ge=1, description="evaluate every K training steps (None: only at the end)"
    )
    at_start: bool = Field(
        True, description="evaluate the starting model before step 1 (the baseline of the curve)"
    )
    at_end: bool = Field(True, description="evaluate the final model (skipped if step K just did)")
    limit: int | None = Field(None, gt=0, description="evaluate on the first N rows")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _rollout_resource_to_follow(self) -> Config:
        if self.rollout.scale_with_cluster and not self.resources.rollout_resource:
            raise ValueError(
                "rollout.scale_with_cluster counts the cluster's resources.rollout_resource units: set "
                "resources.rollout_resource to the custom resource your rollout nodes advertise"
            )
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The defaults, updated by the YAML file at `path`, then by `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see jobs/ for examples)")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}"
            )
        raw = loaded or {}
    for item in overrides:
        apply_override(raw, item)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, source=str(path) if path else "defaults")) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (0.0, null, [a, b], true)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. algorithm.beta=0.0)")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for suggesting valid keys)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            valid = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            lines.append(f"  unknown key '{dotted}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            lines.append(f"  {dotted}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _flow_yaml(value) -> str:
    """A value as one line of YAML; a bare scalar's document-end marker ("...") is dropped."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def config_reference() -> str:
    """Every key with its default and meaning, as a Markdown table (the README's config reference)."""
    defaults = Config()
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in Config.model_fields:
        sub = getattr(defaults, section)
        for name, field in type(sub).model_fields.items():
            value = sub.model_dump(mode="json")[name]
            shown = value if isinstance(value, str) else _flow_yaml(value)
            lines.append(f"| `{section}.{name}` | `{shown}` | {field.description or ''} |")
    return "\n".join(lines)
