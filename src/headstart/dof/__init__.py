"""The DoF feature-set format: writer, reader, verification. Imports from headstart only serve.checksums (sha256).

A DoF set stores a frozen backbone's outputs over a dataset (``features``, ``index``, ``view`` and
``target.<task>`` arrays in ``.npy`` shards) with a ``manifest.json`` written last; see ``format`` for the layout.
"""

from headstart.dof.format import FORMAT_NAME, FORMAT_VERSION, DofError, fingerprint
from headstart.dof.reader import DofSet, DofSplit, open_dof
from headstart.dof.writer import DofWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DofError",
    "DofSet",
    "DofSplit",
    "DofWriter",
    "fingerprint",
    "open_dof",
]
