"""Shipping a trained model: ONNX export checked against PyTorch, bundles and head updates written for a run."""
