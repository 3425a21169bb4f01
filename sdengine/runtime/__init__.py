"""The lean runtime: ONNX Runtime and TensorRT execution over device buffers. Never imports torch."""
