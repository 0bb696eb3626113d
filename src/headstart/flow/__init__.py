"""TaskFlow: a tree of tasks asked of one image. Imports nothing from the rest of headstart."""

from headstart.flow.flow import TaskFlow
from headstart.flow.head import FlowHead
from headstart.flow.metrics import FlowMetrics
from headstart.flow.tasks import Task

__all__ = ["FlowHead", "FlowMetrics", "Task", "TaskFlow"]
