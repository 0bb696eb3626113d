"""Errors a user can cause. Each message names the problem and the fix; entry scripts print it without a traceback."""


class HeadstartError(Exception):
    """Base class: a problem with the user's input, not a bug in headstart."""


class ConfigError(HeadstartError):
    """The composed configuration is invalid (unknown key, wrong type, impossible value)."""


class DataError(HeadstartError):
    """The data on disk is missing, malformed or does not match the configuration."""


class WeightsError(HeadstartError):
    """Backbone weights cannot be found, downloaded or matched onto the architecture."""


class ExportError(HeadstartError):
    """A model cannot be exported to ONNX, or its export does not answer like the PyTorch model."""


class BundleError(HeadstartError):
    """A bundle is missing, incomplete, tampered with, or does not fit the base it is applied to."""


class DivergedError(HeadstartError):
    """Training produced a non-finite loss, weight or metric (NaN or inf): nothing of it is kept as a result."""


class PruningError(HeadstartError):
    """torch-pruning cannot prune this backbone (tracing, a pruning step, or the pruned model's forward fails)."""
