import io

import pytest
from PIL import Image

from tests.conftest import MAX_PIXELS, MIN_PIXELS
from visualthinker_ray.data.prompts import build_prompt, load_images
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.models import load_processor

# The reference base prompt, written out literally (not built from the module's template).
EXPECTED_BASE = (
    "<|vision_start|><|image_pad|><|vision_end|>"
    "A conversation between User and Assistant. The user asks a question about the image, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer.\n"
    "User: Is the red circle left or right of the blue square? \n"
    "Assistant: Let me solve this step by step.\n"
    "<think>"
)


def png(color="red", size=(112, 112)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def record(images=None, question="Is the red circle left or right of the blue square?"):
    return PromptRecord(
        id="r0", images=tuple(images or [png()]), question=question, gold="left", choices=("left", "right")
    )


def test_base_prompt_is_the_recipe_template_exactly():
    assert build_prompt(record(), "base") == EXPECTED_BASE


def test_base_prompt_repeats_the_vision_block_per_image():
    text = build_prompt(record(images=[png(), png("blue")]), "base")
    assert text.startswith("<|vision_start|><|image_pad|><|vision_end|>" * 2 + "A conversation")
    assert text.count("<|image_pad|>") == 2


def test_instruct_prompt_uses_the_chat_template(tiny_model_dir):
    proc = load_processor(tiny_model_dir, MIN_PIXELS, MAX_PIXELS)
    text = build_prompt(record(), "instruct", proc)
    assert text.startswith("<|im_start|>system\n")
    assert (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Is the red circle left or right of the blue "
        "square?  Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> "
        "tags.<|im_end|>\n<|im_start|>assistant\n"
    ) in text
    with pytest.raises(ValueError, match="processor"):
        build_prompt(record(), "instruct")
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_prompt(record(), "chat")


def test_load_images_resizes_within_the_pixel_limits():
    big = load_images(record(images=[png(size=(640, 480))]), MIN_PIXELS, MAX_PIXELS)[0]
    small = load_images(record(images=[png(size=(20, 20))]), MIN_PIXELS, MAX_PIXELS)[0]
    for img in (big, small):
        w, h = img.size
        assert w % 28 == 0 and h % 28 == 0
        assert MIN_PIXELS <= w * h <= MAX_PIXELS
    assert big.size[0] > big.size[1]  # aspect ratio kept


def test_corrupt_image_names_the_record():
    with pytest.raises(ValueError, match="record r0: image 0 cannot be decoded"):
        load_images(record(images=[b"not an image"]), MIN_PIXELS, MAX_PIXELS)
