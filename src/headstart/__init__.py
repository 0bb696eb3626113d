"""headstart: train image models on frozen pretrained backbones with PyTorch Lightning and Hydra.

The package is a stack of layers (docs/development.md draws them): `serve` (bundles and `Predictor`), the `flow` and
`dof` formats, `core` (backbones, transforms, the model), `data`, then the stages `ship`, `train`, `evaluate` and
`prune`, and `tools` over finished runs.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("headstart")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["Predictor", "__version__"]

# Where the modules of headstart 0.1 (one flat package) live now. Configs recorded by runs made before the layers
# name them in `_target_` (`headstart.callbacks.DivergenceGuard`, `headstart.finetune.Full`, ...); Hydra resolves
# such a path attribute by attribute from `headstart`, which lands here.
MOVED_MODULES = {
    "backbones": "headstart.core.backbones",
    "catalog": "headstart.core.backbones.catalog",
    "transforms": "headstart.core.transforms",
    "model": "headstart.core.model",
    "bundle": "headstart.serve.bundle",
    "predictor": "headstart.serve.predictor",
    "runtime": "headstart.serve.runtime",
    "export": "headstart.ship.export",
    "shipping": "headstart.ship.shipping",
    "training": "headstart.train.recipe",
    "callbacks": "headstart.train.callbacks",
    "finetune": "headstart.train.finetune",
    "tuning": "headstart.train.lr_finder",
    "thresholds": "headstart.train.thresholds",
    "reattach": "headstart.train.reattach",
    "cost": "headstart.train.cost",
    "benefit": "headstart.train.benefit",
    "config": "headstart.train.config",
    "sweeps": "headstart.train.sweeps",
    "crossval": "headstart.train.crossval",
    "reproduce": "headstart.train.reproduce",
    "extraction": "headstart.train.extract",
    "reports": "headstart.train.reports",
    "evaluation": "headstart.evaluate.evaluation",
    "prediction": "headstart.evaluate.prediction",
    "gradcam": "headstart.evaluate.gradcam",
    "loading": "headstart.evaluate.loading",
    "pruning": "headstart.prune",
    "zoo": "headstart.tools.zoo",
    "compare": "headstart.tools.compare",
    "notebook": "headstart.tools.notebook",
    "remeasure": "headstart.tools.remeasure",
}


def __getattr__(name: str):
    # `from headstart import Predictor` without importing torch and onnxruntime for every `import headstart`.
    if name == "Predictor":
        from headstart.serve import Predictor

        return Predictor
    if name in MOVED_MODULES:
        return import_module(MOVED_MODULES[name])
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")
