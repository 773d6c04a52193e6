"""Classifier two-sample test: can a small network tell two generators' windows apart?

Given windows ``a`` and ``b`` (S, n_ctx) drawn by two generators under the same conditioning
(row ``i`` of both shares its upper-level codes), a small convolutional classifier learns to
say which generator a window came from. Rows are split by window: the classifier trains on
both generators' windows of one part and is scored on the windows of the other part, which it
never saw. Held-out accuracy 0.5 means it cannot tell them apart; its standard error is the
binomial ``sqrt(acc (1 - acc) / n_test)``.

The network sees the codes of the window and, when given, the upper-level codes under it
(each repeated over the positions it conditions), so it can also detect windows that do not
follow their conditioning.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CodeClassifier", "classifier_two_sample_test"]


class CodeClassifier(nn.Module):
    """Codes (N, T) [+ upper codes (N, T_up)] -> one logit per window (N,)."""

    def __init__(self, l_bins: int, upper_bins: int | None = None, channels: int = 48, layers: int = 4):
        super().__init__()
        self.emb = nn.Embedding(l_bins, channels)
        self.upper_emb = nn.Embedding(upper_bins, channels) if upper_bins else None
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 5, stride=2, padding=2) for _ in range(layers))
        self.out = nn.Linear(2 * channels, 1)

    def forward(self, codes: torch.Tensor, upper: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(codes)                                              # (N, T, C)
        if self.upper_emb is not None and upper is not None:
            x = x + self.upper_emb(upper).repeat_interleave(codes.shape[1] // upper.shape[1], dim=1)
        x = x.transpose(1, 2)
        for conv in self.convs:
            x = F.gelu(conv(x))
        return self.out(torch.cat([x.mean(-1), x.amax(-1)], dim=-1)).squeeze(-1)


def _check(a: torch.Tensor, b: torch.Tensor, upper: torch.Tensor | None, l_bins: int) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"the two sets of windows must both be (S, n_ctx); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 4:
        raise ValueError(f"the two-sample test needs at least 4 windows per generator, got {a.shape[0]}")
    for name, z in (("a", a), ("b", b)):
        if z.is_floating_point() or int(z.min()) < 0 or int(z.max()) >= l_bins:
            raise ValueError(f"windows {name} must be integer codes in [0, {l_bins})")
    if upper is not None and (upper.shape[0] != a.shape[0] or a.shape[1] % upper.shape[1]):
        raise ValueError(f"upper codes {tuple(upper.shape)} do not condition windows {tuple(a.shape)}")


@torch.enable_grad()
def classifier_two_sample_test(a: torch.Tensor, b: torch.Tensor, *, l_bins: int, upper: torch.Tensor | None = None,
                               upper_bins: int | None = None, steps: int = 300, batch_size: int = 32,
                               lr: float = 2e-3, test_fraction: float = 0.5, seed: int = 0) -> dict:
    """Train on part of the windows, score on the rest.

    a, b: (S, n_ctx) codes of the two generators (row ``i`` of both: the same conditioning);
    upper: (S, T_up) upper-level codes of each row (optional; ``upper_bins`` their vocabulary).
    Returns ``accuracy`` (held-out, both generators' windows), ``stderr``, ``n_test``,
    ``n_train`` (windows, both generators), ``train_accuracy`` (last steps' batches).
    """
    _check(a, b, upper, l_bins)
    if not 0.0 < test_fraction < 1.0 or steps < 1 or batch_size < 2:
        raise ValueError("test_fraction must be in (0, 1), steps >= 1 and batch_size >= 2")
    g = torch.Generator().manual_seed(seed)
    S = a.shape[0]
    order = torch.randperm(S, generator=g)
    n_test = max(2, min(S - 2, round(S * test_fraction)))
    test_rows, train_rows = order[:n_test], order[n_test:]
    a, b = a.long().cpu(), b.long().cpu()
    up = None if upper is None else upper.long().cpu()
    if up is not None and upper_bins is None:
        upper_bins = int(up.max()) + 1

    def stack(rows):
        codes = torch.cat([a[rows], b[rows]])
        label = torch.cat([torch.zeros(len(rows)), torch.ones(len(rows))])
        u = None if up is None else torch.cat([up[rows], up[rows]])
        return codes, label, u

    x_tr, y_tr, u_tr = stack(train_rows)
    x_te, y_te, u_te = stack(test_rows)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = CodeClassifier(l_bins, upper_bins if up is not None else None)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    correct = seen = 0
    net.train()
    for step in range(steps):
        idx = torch.randint(x_tr.shape[0], (min(batch_size, x_tr.shape[0]),), generator=g)
        logit = net(x_tr[idx], None if u_tr is None else u_tr[idx])
        loss = F.binary_cross_entropy_with_logits(logit, y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= steps - max(1, steps // 10):
            correct += int(((logit > 0).float() == y_tr[idx]).sum())
            seen += idx.numel()
    net.eval()
    with torch.no_grad():
        logit = torch.cat([net(x_te[i:i + 64], None if u_te is None else u_te[i:i + 64])
                           for i in range(0, x_te.shape[0], 64)])
    acc = float(((logit > 0).float() == y_te).float().mean())
    n = int(y_te.numel())
    return dict(accuracy=acc, stderr=math.sqrt(acc * (1 - acc) / n), n_test=n,
                n_train=int(y_tr.numel()), train_accuracy=correct / max(seen, 1), steps=steps)
