"""The toy stand-ins for what a cluster run downloads: the tiny Qwen2-VL (tiny_model.py), synthetic
data in the SAT / CV-Bench formats (synthetic.py) and the supervised warm-up that makes a start
model (warmup.py). Commands and tests use them; nothing on the training path imports them."""
