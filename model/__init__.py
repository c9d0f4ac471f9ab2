"""The DIN model: data preparation, training, offline scoring and ONNX export."""
