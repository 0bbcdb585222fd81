"""GVM for TRL: gradient-variance-minimising rollout allocation (Yao et al. 2025, arXiv:2505.02391)."""

from .versions import check_trl_version

check_trl_version()  # before any module that mirrors TRL code is imported

from .allocation import allocate_budget, uniform_allocation, variance_bound
from .config import GVMArguments, GVMGRPOConfig, GVMRAFTConfig
from .grad_norms import per_sample_grad_norms
from .rewards import grade_answer, math_reward
from .trainer import GVMGRPOTrainer, GVMRAFTTrainer

__version__ = "0.1.0"

__all__ = [
    "GVMArguments",
    "GVMGRPOConfig",
    "GVMGRPOTrainer",
    "GVMRAFTConfig",
    "GVMRAFTTrainer",
    "allocate_budget",
    "grade_answer",
    "math_reward",
    "per_sample_grad_norms",
    "uniform_allocation",
    "variance_bound",
]
