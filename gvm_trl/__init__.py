"""GVM for TRL: gradient-variance-minimising rollout allocation (Yao et al. 2025, arXiv:2505.02391)."""

__version__ = "0.1.0"
