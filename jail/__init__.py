"""Running foreign models: every uploaded TorchScript or ONNX model runs in a jailed child.

`check_model` validates an upload (load + dry forward pass) in a fresh jail; `open_model`
gives the audit an `AuditableModel` whose forward passes run in one. What the jail guarantees
is in docs/security.md; how the child locks itself down is jail/lockdown.py.
"""

from jail.client import JailedModel, JailError, check_model, open_model
from jail.lockdown import Limits

__all__ = ["JailError", "JailedModel", "Limits", "check_model", "open_model"]
