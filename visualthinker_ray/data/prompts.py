"""Prompt text and vision inputs for a PromptRecord: one builder for training and evaluation.

The base-model prompt is rendered directly, not through the checkpoint's chat template: the
reference code broke on the base Qwen2-VL template and users had to copy template files by hand.
"""

from __future__ import annotations

import contextlib
import io

from PIL import Image, ImageOps

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.errors import InputError

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"

# The reference prompt, verbatim: note the space after {question} and that the prompt ENDS with "<think>",
# so the completion starts inside the thinking block.
BASE_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question about the image, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer.\nUser: {question} \nAssistant: Let me solve this step by step.\n<think>"
)
INSTRUCT_SUFFIX = (
    "  Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."
)


def base_prompt(question: str, num_images: int = 1) -> str:
    """Image placeholders first (a role-less content list: image, then text), then the template."""
    return VISION_BLOCK * num_images + BASE_TEMPLATE.format(question=question)


def instruct_prompt(processor, question: str, num_images: int = 1) -> str:
    """One user turn through the checkpoint's chat template, for instruct models."""
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question + INSTRUCT_SUFFIX})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(record: PromptRecord, style: str = "base", processor=None) -> str:
    if style == "base":
        return base_prompt(record.question, len(record.images))
    if style == "instruct":
        if processor is None:
            raise InputError("the instruct prompt style needs the checkpoint's processor (its chat template)")
        return instruct_prompt(processor, record.question, len(record.images))
    raise InputError(f"unknown prompt style {style!r}; use 'base' or 'instruct'")


# What a transparent pixel becomes. White, because it is what the picture looks like on a page
# and what qwen_vl_utils (RGBA) and vLLM (any transparency, from 0.33 on) composite onto; the colour
# stored under a fully transparent pixel (a palette's key colour, an RGBA pixel's RGB) is not meant
# to be seen and is often arbitrary.
BACKGROUND = (255, 255, 255)


def plain_rgb(img: Image.Image) -> Image.Image:
    """One decoded image as plain RGB pixels, the same whatever reads it next.

    Every kind of transparency (an alpha channel: RGBA, LA, PA; a transparent palette index or key
    colour: `info["transparency"]` of P, L, RGB) is composited onto BACKGROUND here, once. Without
    this, qwen_vl_utils turns a palette PNG with a transparent index into an RGB image that still
    carries the key colour in `info["transparency"]`: vLLM 0.32 and transformers keep those pixels,
    vLLM 0.33 whitens them, and engine and learner would score different pictures. The EXIF
    orientation is applied for the same reason (vLLM applies it to the images it gets, transformers
    does not). The result has an empty `info`: nothing is left for anyone to convert.
    """
    # a corrupt EXIF block: keep the stored orientation (the block is dropped below)
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # PIL turns a transparent index or key colour into alpha 0
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
    else:
        out = img.convert("RGB")
    out.info = {}
    return out


def load_images(record: PromptRecord, min_pixels: int, max_pixels: int) -> list[Image.Image]:
    """Decode a record's images, make them plain RGB (`plain_rgb`) and resize them as Qwen2-VL expects.

    Both the engine and the learner call this with the same limits, so both get the same pixels and
    expand each image to the same number of <|image_pad|> tokens.
    """
    from qwen_vl_utils import fetch_image

    images = []
    for i, data in enumerate(record.images):
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            img = plain_rgb(img)
        except Exception as e:
            raise InputError(f"record {record.id}: image {i} cannot be decoded ({e})") from e
        images.append(fetch_image({"image": img, "min_pixels": min_pixels, "max_pixels": max_pixels}))
    return images
