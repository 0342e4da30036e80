"""Distributed training checkpoints, resume, promotion between stages and official-weight conversion."""

from bagel.platform.checkpoint.config import CheckpointConfig
from bagel.platform.checkpoint.goodput import GoodputTracker
from bagel.platform.checkpoint.manager import CheckpointManager, ResumeInfo

__all__ = ["CheckpointConfig", "CheckpointManager", "GoodputTracker", "ResumeInfo"]
