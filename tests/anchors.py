"""The public libraries whose numbers flashloss must reproduce, loaded for comparison.
open_clip's package import pulls torchvision and more; its loss module needs only torch, so it is
loaded by path from the installed open_clip_torch (installed with --no-deps by the Makefile)."""
import importlib.util
import os


def open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed (make install puts it in .venv)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss_anchor", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def pml_losses():
    from pytorch_metric_learning import losses

    return losses
