"""Models that users upload, loaded without ever unpickling anything, and wrapped for the audit.

Three formats are accepted: TorchScript archives, ONNX models and safetensors weights of a
built-in architecture. A file is identified from its bytes before any loader sees it: a raw
pickle, a `torch.save` checkpoint (a pickle inside a zip) or anything unknown is refused with
`CheckpointError`, and is never handed to `pickle`, `torch.load` or `torch.jit.load`. Nothing
here calls `pickle` or `torch.load`; TorchScript archives go to `torch.jit.load`, whose reader
rebuilds TorchScript modules and tensors only.

Error codes (`CheckpointError.code`):
- `empty_file`, `too_large`: the size check, done first.
- `bad_format`: not a format we accept (pickle, torch.save checkpoint, unknown bytes).
- `format_mismatch`: a format we accept, but not the one declared.
- `load_failed`: the declared format, but damaged or refused by its loader.
- `bad_input_shape`: the model cannot take a batch of the dataset's `input_shape`.
- `bad_output_shape`: the output is not [N, 1] (binary) or [N, num_classes].
- `unknown_layer`: the caller named a feature layer the model does not have.
- `missing_arch`: safetensors weights without the built-in architecture they belong to.
"""

from starvation.checkpoints.detect import FORMATS
from starvation.checkpoints.errors import CheckpointError, out_of_memory
from starvation.checkpoints.load import DRY_RUN_BATCH, Source, check_script_ops, load_checkpoint, validate_checkpoint
from starvation.checkpoints.save import CheckpointFile, load_builtin, load_torchscript, save_checkpoint
from starvation.checkpoints.wrap import (
    DEFAULT_FEATURE_LAYER,
    AuditableModel,
    FeatureFn,
    OnnxModel,
    TorchModel,
    wrap_module,
)

__all__ = [
    "DEFAULT_FEATURE_LAYER",
    "DRY_RUN_BATCH",
    "FORMATS",
    "AuditableModel",
    "CheckpointError",
    "CheckpointFile",
    "FeatureFn",
    "OnnxModel",
    "Source",
    "TorchModel",
    "check_script_ops",
    "load_builtin",
    "load_checkpoint",
    "load_torchscript",
    "out_of_memory",
    "save_checkpoint",
    "validate_checkpoint",
    "wrap_module",
]
