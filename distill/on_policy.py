"""On-policy distillation of a parallel student: it samples windows, the teacher scores them.

Masked-token training shows the student windows masked at random; the sampler shows it windows
whose visible codes are its own earlier draws, made final by confidence. On-policy steps train
on those: for every example of a batch

1. the student samples the window with its sampler (``passes`` passes, the confidence order):
   a hopped window (the first half known: the teacher's codes of a shard window) with
   probability ``prefix_prob``, a whole window otherwise, keeping the input of every pass;
2. the teacher scores the finished window teacher-forced, in one pass: at every new position
   ``t`` its distribution over the code at ``t`` given the sampled codes left of ``t``;
3. one pass is drawn per example, the student runs again (with gradients) on that pass's input,
   and at the positions that pass made final the loss is a divergence between the student's
   distribution ``s`` and the teacher's ``p``: ``"reverse"`` ``KL(s || p)`` (mode-seeking: the
   student is pushed towards codes the teacher finds likely in the context it ended up in) or
   ``"forward"`` ``KL(p || s)``.

Only the student's distribution carries gradients (no gradient flows through the draws or the
teacher's scores). ``distill.train --on-policy-steps N`` runs ``N`` such steps after the
masked-token steps.
"""
from __future__ import annotations

import torch

from .metrics import BITS
from .sampler import ParallelWindowSampler

__all__ = ["DIVERGENCES", "on_policy_batch", "token_divergence"]

DIVERGENCES = ("reverse", "forward")


def token_divergence(student_logits: torch.Tensor, teacher_logp: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-position divergence (nats) between the student's distribution (``student_logits``,
    (..., V)) and the teacher's (``teacher_logp``, log-probabilities (..., V)): ``"reverse"``
    ``KL(student || teacher)``, ``"forward"`` ``KL(teacher || student)``. Returns (...)."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    if divergence == "reverse":
        return (logq.exp() * (logq - teacher_logp)).sum(-1)
    if divergence == "forward":
        return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")


@torch.no_grad()
def on_policy_batch(student, prior, data: dict[str, torch.Tensor], batch_size: int, g: torch.Generator, *,
                    passes: int, prefix_prob: float, prefix_cache: bool, confidence_noise: float = 0.0,
                    temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Windows sampled by ``student`` and scored by the teacher ``prior`` (steps 1-2 above), on
    the model's device. ``g`` (CPU) draws the shard windows, which are hopped, the seeds of the
    student's draws and the pass kept per example.

    Returns ``inputs`` (B, n_ctx): each example's codes as the kept pass saw them (``mask_id``
    where unknown); ``decided`` (B, n_ctx) bool: the positions that pass made final;
    ``teacher_logp`` (B, n_ctx, V) fp32: the teacher's log-probabilities along the finished
    windows (``codes``, (B, n_ctx)); ``prefix`` (B,) bool (hopped examples); ``upper``, ``labels``
    (when the data has them); ``teacher_nll`` (B,) float64: the teacher's NLL (bits/token) of each
    window's new codes.
    """
    dev = student.device
    S, n = data["codes"].shape
    idx = torch.randint(S, (batch_size,), generator=g)
    prefix = torch.rand(batch_size, generator=g) < prefix_prob
    keep = torch.randint(passes, (batch_size,), generator=g)
    seed = int(torch.randint(2 ** 62, (1,), generator=g))
    codes, upper = data["codes"][idx].to(dev), data["upper"][idx].to(dev)
    labels = data["labels"][idx].to(dev) if "labels" in data else None
    sampler = ParallelWindowSampler(student, passes=passes, prefix_cache=prefix_cache, order="confidence",
                                    confidence_noise=confidence_noise, temperature_anneal=False,
                                    temperature_scale=1.0)
    inputs = torch.empty_like(codes)
    decided = torch.zeros_like(codes, dtype=torch.bool)
    final = torch.empty_like(codes)
    was_training = student.training
    student.eval()
    try:
        for part, (rows, known) in enumerate(((prefix, n // 2), (~prefix, 0))):
            if not bool(rows.any()):
                continue
            states = []
            out = sampler(codes[rows][:, :known], n - known, upper[rows], None if labels is None else labels[rows],
                          temperature=temperature, generator=torch.Generator(dev).manual_seed(seed + part),
                          on_pass=states.append)
            states.append(out)
            stack = torch.stack(states)                                         # (passes + 1, R, n)
            k = keep[rows].clamp(max=stack.shape[0] - 2).to(dev)
            r = torch.arange(stack.shape[1], device=dev)
            seen = stack[k, r]
            inputs[rows], final[rows] = seen, out
            decided[rows] = (seen == student.mask_id) & (stack[k + 1, r] != student.mask_id)
    finally:
        student.train(was_training)
    teacher_logp = torch.log_softmax(prior.logits(final, upper, labels).float(), dim=-1)
    nll = -teacher_logp.gather(-1, final[..., None])[..., 0].double() * BITS            # (B, n)
    new = torch.where(prefix[:, None].to(dev), torch.arange(n, device=dev) >= n // 2, True)
    out = dict(inputs=inputs, decided=decided, teacher_logp=teacher_logp, codes=final, prefix=prefix.to(dev),
               upper=upper, teacher_nll=(nll * new).sum(1) / new.sum(1))
    if labels is not None:
        out["labels"] = labels
    return out
