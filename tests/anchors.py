"""The public libraries whose numbers flashloss must reproduce, loaded for comparison."""
from flashloss.benchmark.anchors import open_clip_loss_module  # noqa: F401


def pml_losses():
    from pytorch_metric_learning import losses

    return losses
