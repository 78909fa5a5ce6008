"""The learner's log-probs run the output layer only from the batch's first completion target on:
the values and gradients must equal a full-width forward's, position by position."""

import torch

from tests.conftest import MAX_PIXELS, MIN_PIXELS
from visualthinker_ray.data.sat import load_sat
from visualthinker_ray.models import banned_token_ids, load_model, load_processor
from visualthinker_ray.sequences import build_batch, completion_logprobs, encode_prompt, first_target


def _full_width(model, batch, temperature, banned):
    """The independent computation: logits at every position, log_softmax, the next token's entry."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    logits[..., banned] = float("-inf")
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)


def test_windowed_logprobs_and_gradients_equal_the_full_width_forward(tiny_model_dir, synthetic_dir):
    processor = load_processor(tiny_model_dir, MIN_PIXELS, MAX_PIXELS)
    model = load_model(tiny_model_dir).eval()
    banned = banned_token_ids(processor.tokenizer)
    records = load_sat(str(synthetic_dir / "SAT"), split="train", seed=0).records[:2]
    prompts = [encode_prompt(processor, r, MIN_PIXELS, MAX_PIXELS) for r in records]
    # A text-only row with a shorter prompt moves the window's start ahead of the image rows'.
    text_only = type(prompts[0])(input_ids=prompts[0].input_ids[-5:], pixel_values=None, image_grid_thw=None)
    rows = [prompts[0], text_only, prompts[1]]
    completions = [[40, 41, 42, 43], [50, 51], [60, 61, 62, 63, 64, 65]]
    tok = processor.tokenizer
    batch = build_batch(rows, completions, tok.pad_token_id, model.config.image_token_id)
    start = first_target(batch["completion_mask"])
    assert start == len(text_only.input_ids) - 1 and start > 0

    mask = batch["completion_mask"].bool()
    windowed = completion_logprobs(model, batch, 0.9, banned)
    full = _full_width(model, batch, 0.9, banned)
    assert windowed.shape == full.shape
    torch.testing.assert_close(windowed[mask], full[mask], rtol=0, atol=1e-6)
    assert (windowed[:, :start] == 0).all()

    # gradients through the window equal those through the full-width logits
    grads = []
    for fn in (
        lambda: completion_logprobs(model, batch, 0.9, banned),
        lambda: _full_width(model, batch, 0.9, banned),
    ):
        model.zero_grad()
        (fn()[mask]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)

    # with entropy: the window's entropies are those of the full distribution
    _, entropy = completion_logprobs(model, batch, 0.9, banned, with_entropy=True)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    logits[..., banned] = float("-inf")
    p = torch.softmax(logits / 0.9, -1)
    reference = -(p * torch.log_softmax(logits / 0.9, -1).nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(entropy[mask], reference[mask], rtol=0, atol=1e-5)
