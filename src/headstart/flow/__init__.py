"""TaskFlow: a tree of tasks asked of one image. Imports from headstart only its spec (`headstart.serve.flowspec`)."""

from headstart.flow.flow import Group, TaskFlow
from headstart.flow.head import FlowHead
from headstart.flow.metrics import FlowMetrics
from headstart.flow.tasks import FlowSpecError, NonFiniteError, Task, decision_scores
from headstart.flow.weighting import UncertaintyWeighting

__all__ = [
    "FlowHead",
    "FlowMetrics",
    "FlowSpecError",
    "Group",
    "NonFiniteError",
    "Task",
    "TaskFlow",
    "UncertaintyWeighting",
    "decision_scores",
]
