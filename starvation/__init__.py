"""The science of gradient starvation: datasets, networks, losses, training and audit probes.

Pure PyTorch/NumPy. Nothing here imports the web framework, the queue or the database: the
worker, a notebook and a benchmark all call the same functions with plain specs and callbacks.
"""

from starvation.errors import SpecError

__all__ = ["SpecError"]
