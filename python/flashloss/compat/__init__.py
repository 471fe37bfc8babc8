"""Drop-in classes that mirror the libraries users already have (names, signatures, numbers)."""
from .open_clip import ClipLoss, DistillClipLoss, SigLipLoss
from .pml import NTXentLoss, SupConLoss

__all__ = ["ClipLoss", "DistillClipLoss", "SigLipLoss", "NTXentLoss", "SupConLoss"]
