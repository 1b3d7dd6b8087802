"""The shared distillation core: softening operators, losses, teacher access, multi-stage compression."""

from .cache import TeacherCache
from .diagnostics import brier_bias_variance, fit_inverse_n, log_loss_bias_variance
from .losses import HintLoss, attention_kl, ensemble_scores, forward_kl, js_divergence, logit_mse, normalize_scores, reverse_kl
from .multistage import Sparsifier, multistage_distill, stage_levels
from .softening import OPERATORS, ExpTiltOperator, OddsPowerOperator, PowerOperator, SofteningOperator, check_axioms, get_operator, temperature_for_entropy
from .teachers import SparseTargets, distill_loss, hard_targets, sampled_targets, sparse_kl, topk_targets
from .trainer import TrainConfig, predict, train

__all__ = [
    "TeacherCache", "brier_bias_variance", "fit_inverse_n", "log_loss_bias_variance",
    "HintLoss", "attention_kl", "ensemble_scores", "forward_kl", "js_divergence", "logit_mse", "normalize_scores", "reverse_kl",
    "Sparsifier", "multistage_distill", "stage_levels",
    "OPERATORS", "ExpTiltOperator", "OddsPowerOperator", "PowerOperator", "SofteningOperator", "check_axioms", "get_operator", "temperature_for_entropy",
    "SparseTargets", "distill_loss", "hard_targets", "sampled_targets", "sparse_kl", "topk_targets",
    "TrainConfig", "predict", "train",
]
