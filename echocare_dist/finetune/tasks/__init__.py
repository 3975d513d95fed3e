"""Task specs of the fine-tuning runner beyond classification / segmentation / regression
(base.py says what a spec provides; each task module documents its annotations, head, loss and
metrics). The runner, report and `echocare evaluate` look a task up here instead of branching."""
from __future__ import annotations

from .base import TaskSpec
from .detection import DetectionTask
from .enhancement import EnhancementTask
from .landmarks import LandmarkTask

TASK_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in (LandmarkTask(), DetectionTask(), EnhancementTask())}
__all__ = ["TASK_SPECS", "DetectionTask", "EnhancementTask", "LandmarkTask", "TaskSpec"]
