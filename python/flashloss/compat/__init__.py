"""Drop-in classes that mirror the libraries users already have (names, signatures, numbers)."""
from .open_clip import ClipLoss, SigLipLoss
from .pml import NTXentLoss, SupConLoss

__all__ = ["ClipLoss", "SigLipLoss", "NTXentLoss", "SupConLoss"]
