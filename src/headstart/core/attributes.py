"""Plain attributes of LightningModules set at the cost of a plain object's.

Lightning sets a few plain attributes on the module around every hook it calls (the current hook's name), a dozen
times per training step. `nn.Module.__setattr__` checks each value against the module's parameters, buffers and
submodules (isinstance checks through torch's metaclasses), about 5 microseconds a call: on a head trained on
features, where a whole step takes a millisecond, that was a fifth of Lightning's per-step overhead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


class PlainAttributes(nn.Module):
    """Mix in before LightningModule: a str, number, bool or None assigned to a name that is no parameter, buffer or
    submodule is set directly, as nn.Module itself would end up setting it; everything else goes through nn.Module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if type(value) in _PLAIN_TYPES:
            d = self.__dict__
            if (
                name not in d.get("_parameters", ())
                and name not in d.get("_buffers", ())
                and name not in d.get("_modules", ())
            ):
                object.__setattr__(self, name, value)
                return
        super().__setattr__(name, value)
