"""Optimizers and LR schedules for the BitNet conversion stages (AdamW, Muon, MuonClip, APOLLO)."""

from .factory import build_optimizer
from .muon_adamw import MuonAdamW
from .muonclip import MuonClip
from .param_split import split_muon_params
from .qk_clip import head_max_logits, qk_clip_
from .schedule import build_scheduler, lr_factor
from .spec import ADAMW_LR_RATIO, MUON_ADJUST_LR_FN, OPTIMIZER_NAMES, SCHEDULE_NAMES, OptimizerSpec

__all__ = [
    "ADAMW_LR_RATIO",
    "MUON_ADJUST_LR_FN",
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "MuonAdamW",
    "MuonClip",
    "OptimizerSpec",
    "build_optimizer",
    "build_scheduler",
    "head_max_logits",
    "lr_factor",
    "qk_clip_",
    "split_muon_params",
]
