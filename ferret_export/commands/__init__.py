"""Subcommands of ``ferret`` that need the export extra (and PyTorch, to read checkpoints)."""

REQUIRES = ("torch", "onnx", "onnxruntime")  # the 'train' and 'export' extras, checked by ferret_runtime.cli
