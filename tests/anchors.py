"""The public libraries whose numbers flashloss must reproduce, loaded for comparison."""
from flashloss.benchmark.anchors import open_clip_loss_module  # noqa: F401


def pml_losses():
    from pytorch_metric_learning import losses

    return losses


def require_anchor(module: str, why: str = ""):
    """Imports an anchor library for a comparison test. Where it is not installed the test is
    skipped with the reason, except under FLASHLOSS_REQUIRE_ANCHORS=1 (`make test` sets it after
    installing every anchor), where a missing anchor fails the test instead of hiding it."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg = f"anchor {module!r} is not installed{': ' + why if why else ''} ({e})"
        if os.environ.get("FLASHLOSS_REQUIRE_ANCHORS") == "1":
            pytest.fail(msg + "; FLASHLOSS_REQUIRE_ANCHORS=1 requires it (the Makefile's .deps installs it)")
        pytest.skip(msg)
