"""`TaskFlow.explain` and `TaskFlow.tree`: the text trees live in `headstart.serve.decode` (numpy), so that a
bundle explains its decisions without torch; these take torch logits.

    camera_blocked: no (p=0.269, logit=-1.000)
      door_open: yes (p=0.731, logit=1.000)
        person_present: yes (p=0.881, logit=2.000)
          person.face_x1: 32.000 (p=0.500, logit=0.000)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from headstart.serve import decode

if TYPE_CHECKING:
    from headstart.flow.flow import TaskFlow


def explain(flow: TaskFlow, logits: Mapping[str, torch.Tensor], i: int) -> str:
    return decode.explain(flow, {p: v.detach().float().cpu().numpy() for p, v in logits.items()}, i)


def tree(flow: TaskFlow) -> str:
    return decode.tree(flow)
