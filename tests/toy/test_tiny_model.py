import io
import json
import random

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import MAX_PIXELS, MIN_PIXELS
from visualthinker_ray.models import VISION_SPECIAL_TOKENS, banned_token_ids, load_model, load_processor
from visualthinker_ray.toy.tiny_model import make_tiny_model


def test_tiny_model_is_small_and_complete(tiny_model_dir):
    from pathlib import Path

    files = {p.name: p.stat().st_size for p in Path(tiny_model_dir).iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "generation_config.json",
    ):
        assert name in files, f"{name} missing from the tiny model"
    assert sum(files.values()) < 5 * 2**20
    proc_cfg = json.loads((Path(tiny_model_dir) / "processor_config.json").read_text())
    assert "image_processor" in proc_cfg and "video_processor" in proc_cfg  # vLLM's loader wants both


def test_tiny_model_is_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    a = load_file(f"{tiny_model_dir}/model.safetensors")
    b = load_file(again / "model.safetensors")
    c = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (again / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()


def test_loads_through_auto_classes_and_runs_a_forward_with_an_image(tiny_model_dir):
    proc = load_processor(tiny_model_dir, MIN_PIXELS, MAX_PIXELS)
    model = load_model(tiny_model_dir)
    assert proc.tokenizer.padding_side == "left"
    assert proc.image_processor.size["longest_edge"] == MAX_PIXELS
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), "red").save(buf, "PNG")
    img = Image.open(buf)
    text = "<|vision_start|><|image_pad|><|vision_end|>What colour?"
    inputs = proc(text=[text], images=[img], return_tensors="pt")
    n_pad = int((inputs["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    # one placeholder per merged 2x2 patch group
    assert n_pad == int(inputs["image_grid_thw"].prod()) // 4 == 16
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_vision_special_tokens_are_single_tokens_and_banned(tiny_model_dir):
    proc = load_processor(tiny_model_dir, MIN_PIXELS, MAX_PIXELS)
    ids = banned_token_ids(proc.tokenizer)
    assert len(set(ids)) == len(VISION_SPECIAL_TOKENS)
    assert proc.tokenizer.unk_token_id not in ids
    for tok, i in zip(VISION_SPECIAL_TOKENS, ids, strict=True):
        assert proc.tokenizer.convert_ids_to_tokens(i) == tok


def test_missing_local_model_path_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-tiny-model"):
        load_model(str(tmp_path / "missing"))


def test_tiny_model_size_options_reach_the_config(tmp_path):
    from transformers import AutoConfig

    out = make_tiny_model(tmp_path / "m", hidden_size=192, num_layers=3, vision_depth=1, vision_embed_dim=48)
    cfg = AutoConfig.from_pretrained(out)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (192, 3, 3)
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.hidden_size) == (1, 48, 3, 192)
    with pytest.raises(ValueError, match="multiple of 64"):
        make_tiny_model(tmp_path / "bad", hidden_size=100)


def test_rope_theta_sets_the_text_rotary_frequencies(tmp_path):
    """theta^(-2k/64) per rotary pair k; the width axis of the vision tokens gets pairs 20..31."""
    out = make_tiny_model(tmp_path / "t10", rope_theta=10.0)
    inv_freq = load_model(str(out)).model.language_model.rotary_emb.inv_freq
    expected = torch.tensor([10.0 ** (-2 * k / 64) for k in range(32)])
    torch.testing.assert_close(inv_freq.float(), expected)
    assert inv_freq[20].item() == pytest.approx(0.237, abs=1e-3)  # the README's 0.24 rad per column
    with pytest.raises(ValueError, match="rope_theta"):
        make_tiny_model(tmp_path / "bad", rope_theta=1.0)


def test_fan_in_init_draws_each_weight_with_std_one_over_sqrt_fan_in():
    from visualthinker_ray.toy.tiny_model import fan_in_init_

    torch.manual_seed(0)
    net = torch.nn.ModuleDict(
        {
            "linear": torch.nn.Linear(256, 64),
            "conv": torch.nn.Conv3d(3, 32, kernel_size=(2, 4, 4)),
            "embed": torch.nn.Embedding(500, 64),
            "norm": torch.nn.LayerNorm(64),
        }
    )
    with torch.no_grad():
        net["norm"].weight.fill_(2.0)
    fan_in_init_(net)
    expected = {"linear": 256, "conv": 3 * 2 * 4 * 4, "embed": 64}
    for name, fan_in in expected.items():
        std = net[name].weight.std().item()
        assert abs(std * fan_in**0.5 - 1.0) < 0.05, (name, std)
    assert torch.count_nonzero(net["linear"].bias) == 0 and torch.count_nonzero(net["conv"].bias) == 0
    assert torch.all(net["norm"].weight == 2.0)  # norms are left alone


def _image_sensitivity(model_dir):
    """Mean total-variation distance between next-token distributions for different images."""
    from visualthinker_ray.toy.synthetic import make_one_object_color_question, render_scene

    proc = load_processor(model_dir, MIN_PIXELS, MAX_PIXELS)
    images = [render_scene(make_one_object_color_question(random.Random(i)).scenes[0]) for i in range(8)]
    text = "<|vision_start|><|image_pad|><|vision_end|>What color is the object?"
    inputs = proc(text=[text] * len(images), images=images, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(load_model(model_dir)(**inputs).logits[:, -1], -1)
    tv = 0.5 * (probs[:, None] - probs[None]).abs().sum(-1)
    n = len(images)
    return tv.sum().item() / (n * (n - 1))


def test_fan_in_tiny_model_lets_the_image_move_its_predictions(tmp_path, tiny_model_dir):
    out = make_tiny_model(tmp_path / "fan-in", seed=0, init="fan_in")
    assert json.loads((out / "visualthinker_tiny.json").read_text())["init"] == "fan_in"
    model = load_model(str(out))
    assert torch.equal(
        model.get_input_embeddings().weight, model.get_output_embeddings().weight
    )  # still tied
    # Measured 0.049 vs 0.008: at HF init the image barely changes what the model predicts.
    assert _image_sensitivity(str(out)) > 3 * _image_sensitivity(tiny_model_dir)
    with pytest.raises(ValueError, match="init must be one of"):
        make_tiny_model(tmp_path / "bad", init="xavier")


def test_merge_size_sets_how_many_patches_one_vision_token_concatenates():
    from transformers import Qwen2VLForConditionalGeneration

    from visualthinker_ray.toy.tiny_model import build_processor, build_tiny_tokenizer, tiny_model_config

    tok = build_tiny_tokenizer()
    image = Image.new("RGB", (112, 112), (200, 30, 30))  # 8 x 8 patches of 14 px
    text = "<|vision_start|><|image_pad|><|vision_end|>What color?"
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for merge, tokens in ((2, 16), (8, 1)):
        proc = build_processor(tok, 112 * 112, 112 * 112, merge_size=merge)
        inputs = proc(text=[text], images=[image], return_tensors="pt")
        assert int((inputs["input_ids"] == pad).sum()) == tokens
        model = Qwen2VLForConditionalGeneration(tiny_model_config(tok, spatial_merge_size=merge))
        assert model.config.vision_config.spatial_merge_size == merge
        with torch.no_grad():  # the model's merger agrees with the processor's token count
            assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
