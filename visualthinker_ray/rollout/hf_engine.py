"""Generation with transformers `generate`: the fallback engine and the reference for log-prob checks."""

from __future__ import annotations

import torch

from visualthinker_ray.data.prompts import build_prompt, load_images
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.models import banned_token_ids, load_model, load_processor, resolve_dtype
from visualthinker_ray.rollout.engine import Completion, SamplingSpec, prompt_seed
from visualthinker_ray.sequences import build_batch, completion_logprobs, encode_prompt
from visualthinker_ray.weight_sync import check_update, params_digest


class HFEngine:
    def __init__(
        self,
        model_path: str,
        min_pixels: int,
        max_pixels: int,
        prompt_style: str = "base",
        dtype: str = "auto",
        device: str | None = None,
        **_ignored,  # engine options that only vLLM has (tensor parallel size, memory fraction)
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.min_pixels, self.max_pixels, self.prompt_style = min_pixels, max_pixels, prompt_style
        self.processor = load_processor(model_path, min_pixels, max_pixels)
        self.model = load_model(model_path, resolve_dtype(dtype, self.device), self.device).eval()
        self.tokenizer = self.processor.tokenizer
        self.banned = banned_token_ids(self.tokenizer)
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id))
        self.policy_version = 0

    def sync_info(self) -> dict:
        """One sync rank (this actor's process), floating-point weights received in the model's dtype."""
        return {
            "ranks": 1,
            "wire_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "params": params_digest({n: tuple(p.shape) for n, p in self.model.named_parameters()}),
            "backend": "nccl" if str(self.device).startswith("cuda") else "gloo",
        }

    @torch.no_grad()
    def update_weights(self, named_tensors, version: int, skipped=()) -> None:
        """Copy a set of weights (in-memory transformers names) into the model; strict on names and
        shapes: every parameter, bar the frozen ones a later sync may leave out (`skipped`)."""
        items = list(named_tensors)
        params = dict(self.model.named_parameters())
        # Tied aliases (lm_head.weight -> the embeddings) are state_dict-only names; accept them too.
        state = self.model.state_dict(keep_vars=True)
        check_update(
            [(n, tuple(t.shape)) for n, t in items],
            {n: tuple(p.shape) for n, p in params.items()},
            optional={n: tuple(t.shape) for n, t in state.items() if n not in params},
            who="HF engine",
            may_skip=skipped,
        )
        for name, t in items:
            (params[name] if name in params else state[name]).copy_(t)
        self.policy_version = version

    @torch.no_grad()
    def generate(self, records: list[PromptRecord], sampling: SamplingSpec) -> list[Completion]:
        if sampling.seed is None or sampling.greedy:
            return self._generate(records, sampling, None)
        # Its own random stream per prompt (prompt_seed): one prompt per generate call.
        return [c for r in records for c in self._generate([r], sampling, prompt_seed(sampling.seed, r.id))]

    def _generate(
        self, records: list[PromptRecord], sampling: SamplingSpec, seed: int | None
    ) -> list[Completion]:
        prompts = [build_prompt(r, self.prompt_style, self.processor) for r in records]
        images = [img for r in records for img in load_images(r, self.min_pixels, self.max_pixels)]
        inputs = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            suppress_tokens=self.banned,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**inputs, **kwargs)

        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:]
        logprobs = self._sampled_logprobs(out.logits, new_tokens, sampling)
        completions = []
        for row in range(new_tokens.shape[0]):
            rec_idx, sample = divmod(row, sampling.n)
            mask = inputs["attention_mask"][rec_idx].bool()
            prompt_ids = inputs["input_ids"][rec_idx][mask].tolist()
            ids, finish = self._trim(new_tokens[row].tolist(), sampling)
            completions.append(
                Completion(
                    prompt_id=records[rec_idx].id,
                    sample_index=sample,
                    prompt_token_ids=prompt_ids,
                    token_ids=ids,
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    logprobs=logprobs[row, : len(ids)].tolist(),
                    finish_reason=finish,
                    policy_version=self.policy_version,
                )
            )
        return completions

    @torch.no_grad()
    def score(self, records: list[PromptRecord], completions: list[list[int]]) -> list[list[float]]:
        """log p(token) of each completion's tokens after its prompt under the weights held now (raw
        log_softmax, as vLLM's prompt log-probs): the sync alarm's probe. The learner's own batch
        and log-prob code (sequences.py), so both sides compute it one way."""
        prompts = [
            encode_prompt(self.processor, r, self.min_pixels, self.max_pixels, self.prompt_style)
            for r in records
        ]
        batch = build_batch(
            prompts,
            completions,
            pad_token_id=self.tokenizer.pad_token_id,
            image_token_id=self.model.config.image_token_id,
            video_token_id=self.model.config.video_token_id,
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        logp = completion_logprobs(self.model, batch, temperature=1.0, banned_ids=None).float()
        mask = batch["completion_mask"].bool()
        return [logp[row][mask[row]].cpu().tolist() for row in range(len(records))]

    def _sampled_logprobs(self, step_logits, tokens: torch.Tensor, sampling: SamplingSpec) -> torch.Tensor:
        """log_softmax(masked logits / T) at each sampled token: the learner's formula (engine.py)."""
        logits = torch.stack(step_logits, dim=1).float()  # [rows, steps, vocab]
        logits[..., self.banned] = float("-inf")
        temperature = 1.0 if sampling.greedy else sampling.temperature
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).cpu()

    def _trim(self, ids: list[int], sampling: SamplingSpec) -> tuple[list[int], str]:
        """Cut after the first EOS or completed stop string; generate pads finished rows after that."""
        text = ""
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[: i + 1], "stop"
            if sampling.stop:
                text += self.tokenizer.decode([t])
                if any(text.endswith(s) for s in sampling.stop):
                    return ids[: i + 1], "stop"
        return ids, "length"


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
