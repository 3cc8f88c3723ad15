"""ONNX: the graph written from the module (LPD in standard operators, BatchNorm folded), the export
that verifies it against PyTorch before writing, and what an ONNX file says about itself."""
