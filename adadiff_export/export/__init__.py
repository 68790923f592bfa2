"""The exporter: checkpoint -> segments -> ONNX (+ TensorRT plans) + manifest, and the checks on an engines folder."""
