"""Training objectives: stage 1 TM-MeanFlow (:mod:`.tm_meanflow`)."""
from .tm_meanflow import TMMeanFlowConfig, exact_total_derivative, fd_head_pass, fd_times, tm_meanflow

__all__ = ["TMMeanFlowConfig", "exact_total_derivative", "fd_head_pass", "fd_times", "tm_meanflow"]
