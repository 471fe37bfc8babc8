"""flashloss: kernels for training objectives that never materialise the big intermediate
(similarity matrices, vocabulary logits, dense permutation products)."""
from ._version import __version__
from . import _native

_native.load(warn=True)  # warns once if flashloss._C is missing; the torch backend still serves

from ._backend import BACKENDS, BackendUnavailableError, backend_available  # noqa: E402
from . import ops, ref  # noqa: E402
from .ops import row_logsumexp  # noqa: E402

__all__ = ["__version__", "BACKENDS", "BackendUnavailableError", "backend_available", "ops", "ref",
           "row_logsumexp"]
