"""Peer libraries the benchmarks (and tests) compare with, loaded without their heavy imports."""
from __future__ import annotations

import importlib.util
import os


def open_clip_loss_module():
    """open_clip's `loss` module. `import open_clip` pulls torchvision, timm and more; the loss
    module needs only torch, so it is loaded by path from the installed open_clip_torch (the
    Makefile installs it with --no-deps)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed (`pip install --no-deps open_clip_torch`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    mod_spec = importlib.util.spec_from_file_location("flashloss_anchor_open_clip_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module
