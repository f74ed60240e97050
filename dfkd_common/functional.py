"""Divergences between logits that both sides use (synthesis terms and student losses): written once, here."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float = 1.0, reduce: bool = True) -> torch.Tensor:
    """KL(p || q) between softmax(p/tau) and softmax(q/tau), per sample (or batch mean)."""
    p_log = F.log_softmax(p_logits.float() / tau, dim=1)
    q_log = F.log_softmax(q_logits.float() / tau, dim=1)
    kl = (p_log.exp() * (p_log - q_log)).sum(dim=1)
    return kl.mean() if reduce else kl


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton KD: KL(p_T^tau || p_S^tau) * tau^2, batch mean (tau^2 keeps gradients scale-free in tau)."""
    return kl_div(t_logits, s_logits, tau) * tau * tau


def l1_discrepancy(s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute logit difference (DFAD's discrepancy: F.l1_loss, mean over batch and classes)."""
    return (s_logits.float() - t_logits.float()).abs().mean()
