"""TensorRT: engines built from the ONNX graph (strongly typed: precision lives in the graph), the
ferret::lpd plugin with its embedded PTX, optimisation profiles, and verification before writing.
TensorRT itself is imported on first use (the 'trt' extra)."""
