"""headstart: train image models on frozen pretrained backbones with PyTorch Lightning and Hydra."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("headstart")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    # `from headstart import Predictor` without importing torch and onnxruntime for every `import headstart`.
    if name == "Predictor":
        from headstart.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")
