"""Trained models to files and back: moved to `starvation.checkpoints.save`; this name stays for its importers."""

from starvation.checkpoints.save import CheckpointFile, load_builtin, load_torchscript, save_checkpoint

__all__ = ["CheckpointFile", "load_builtin", "load_torchscript", "save_checkpoint"]
