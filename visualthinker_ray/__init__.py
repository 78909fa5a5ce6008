"""visualthinker-ray: GRPO post-training of Qwen2-VL as a Ray application."""

__version__ = "0.1.0"
