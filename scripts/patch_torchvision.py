"""Make the CUDA build of torchvision importable against CPU torch (see shared ENVIRONMENT.md).

torchvision's meta registrations for its compiled `nms` / `qnms` ops fail when those ops were not
loaded ("operator torchvision::nms does not exist"). Registering them only when the compiled ops are
present leaves every transform the stack uses working. Idempotent.
"""

import importlib.util
import pathlib
import sys

MARK = "# visualthinker-ray: conditional fake registration"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("[setup] torchvision not installed; nothing to patch")
        return 0
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        return 0
    helper = (
        f"\n{MARK}\n"
        "def _vtr_register_fake(name):\n"
        "    import torchvision.extension as _ext\n"
        "    if _ext._has_ops():\n"
        "        return torch.library.register_fake(name)\n"
        "    return lambda fn: fn\n\n"
    )
    count = 0
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")'
        if old in text:
            text = text.replace(old, f'@_vtr_register_fake("torchvision::{op}")')
            count += 1
    if count == 0:
        print(
            f"[setup] {path}: no nms/qnms registrations found; torchvision layout changed?", file=sys.stderr
        )
        return 1
    # the helper must stand after `import torch` and before first use: put it after the imports
    lines = text.splitlines(keepends=True)
    last_import = max(i for i, line in enumerate(lines) if line.startswith(("import ", "from ")))
    lines.insert(last_import + 1, helper)
    path.write_text("".join(lines))
    print(f"[setup] patched {path} ({count} registrations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
