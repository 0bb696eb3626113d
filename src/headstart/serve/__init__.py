"""Serving: read and verify bundles (folder or URL), run them with ONNX Runtime, decode, `Predictor`."""

__all__ = ["Predictor"]


def __getattr__(name: str):
    if name == "Predictor":
        from headstart.serve.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'headstart.serve' has no attribute {name!r}")
