"""headstart: train image models on frozen pretrained backbones with PyTorch Lightning and Hydra."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("headstart")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
