"""A drafter that reads the teacher's own features: the proposal model of speculative sampling.

An upsampler's final activation ``h[t]`` at position ``t`` (its input is the code at ``t - 1``)
gives the teacher's distribution of the code at ``t``. The drafter continues that chain cheaply:
from a feature ``f`` of position ``t - 1`` and the code ``x[t - 1]`` drawn there it predicts the
feature of position ``t``,

    f[t] = mlp(fuse([norm(f[t - 1]), x_emb(x[t - 1]) + pos_emb[t] + x_cond[t]]))
    q[t] = softmax(x_out(norm(f[t])))

(``x_cond`` the teacher's conditioning on the level above, the same tensor the teacher adds to its
input). The first drafted position after a verification reads the teacher's feature of the last
decided position (the verify chunk computed it: no extra teacher work); each later one reads the
drafter's own. Drafts are sequential, so every drafted token's ``q`` given everything to its left
is exact, as speculative sampling needs.

Per drafted token the work is one fused projection, ``depth`` residual MLP blocks and the output
head (``begin`` folds the embedding tables and the window's conditioning into the projection
once per window), against the teacher's whole transformer per position. A block normalises its
input unless ``block_norm`` is off; without the norm ``chain`` moves the block's output bias into
its input and adds the residual inside the second matrix product: two tensor operations fewer per
drafted position.

Trained by ``distill.train_drafter`` on teacher samples against the teacher's distributions,
unrolled over several drafted positions so that it learns to read its own features. Stored as
``drafter_level_{L}/`` beside the priors (``config.json`` with ``kind: "drafter"`` and
``model.safetensors``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastjukebox.checkpoint import (CONFIG_NAME, FORMAT_VERSION, CheckpointError, check_state_dict, read_weights,
                                    write_component_dir)
from fastjukebox.prior import Prior
from kernels.sampling.reference import race_winner, sampling_probs

__all__ = ["DrafterConfig", "FeatureDrafter", "DRAFTER_KIND", "check_drafter_for"]

DRAFTER_KIND = "drafter"


@dataclass(frozen=True)
class DrafterConfig:
    """level, l_bins, n_ctx, width: the teacher's (its level, codebook, window, activation width);
    hidden: the MLP blocks' inner width; depth: how many blocks; block_norm: whether each block
    normalises its input (checkpoints written before the option have it on)."""

    level: int
    l_bins: int
    n_ctx: int
    width: int
    hidden: int = 512
    depth: int = 1
    block_norm: bool = True

    def __post_init__(self):
        if not isinstance(self.block_norm, bool):
            raise ValueError(f"drafter config block_norm must be true or false, got {self.block_norm!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "block_norm":
                continue
            least = 0 if f.name in ("level", "depth") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"drafter config {f.name} must be an integer >= {least}, got {v!r}")

    @classmethod
    def for_teacher(cls, prior: Prior, hidden: int = 512, depth: int = 1, block_norm: bool = True) -> "DrafterConfig":
        c = prior.config
        return cls(level=c.level, l_bins=c.l_bins, n_ctx=c.n_ctx, width=c.width, hidden=hidden, depth=depth,
                   block_norm=block_norm)


def check_drafter_for(drafter: "FeatureDrafter", prior: Prior) -> None:
    """A named error unless ``drafter`` was made for ``prior``: same level, codebook, window, width."""
    d, c = drafter.config, prior.config
    for name, mine, theirs in (("level", d.level, c.level), ("codebook size", d.l_bins, c.l_bins),
                               ("window (n_ctx)", d.n_ctx, c.n_ctx), ("width", d.width, c.width)):
        if mine != theirs:
            raise ValueError(f"this drafter is for another prior: its {name} is {mine}, the prior's {theirs}")


class _Block(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))), or x + fc2(gelu(fc1(x))) without ``norm`` (the tanh form of GELU: a
    third of the exact one's time per drafted token)."""

    def __init__(self, width: int, hidden: int, norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else None
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x if self.norm is None else self.norm(x)), approximate="tanh"))


class _ChainScratch:
    """``FeatureDrafter.chain``'s per-window buffers for ``n`` rows and up to ``capacity`` drafts, with
    their per-row views made once (making a view is an operation per position and call):
    ``out`` (capacity + 1, n, V + W) the products, row j ``[race of position j - 1 | input of
    position j]``; ``bias`` the same shape, what each product row adds."""

    def __init__(self, n: int, capacity: int, bins: int, width: int, dtype: torch.dtype, device: torch.device):
        V = bins
        self.n, self.capacity = n, capacity
        self.out = torch.empty(capacity + 1, n, V + width, dtype=dtype, device=device)
        self.bias = torch.empty_like(self.out)
        self.rows_out, self.heads, self.inputs = (self.out.unbind(0), self.out[..., :V].unbind(0),
                                                  self.out[..., V:].unbind(0))
        self.bias_rows, self.bias_heads = self.bias.unbind(0), self.bias[..., :V].unbind(0)
        self.first_bias = self.bias[0, :, V:]
        self.rows = torch.arange(n, device=device)[:, None]
        self.maxima = torch.empty(n, dtype=dtype, device=device)     # the race's maxima (``race_winner``)
        self.steps = torch.arange(capacity, device=device)


class FeatureDrafter(nn.Module):
    """The drafter (module docstring). ``forward`` is one drafted position for any leading shape;
    ``begin`` / ``step`` are the sampler's per-window and per-position path."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        if not isinstance(config, DrafterConfig):
            raise TypeError(f"config must be a DrafterConfig, got {type(config).__name__}")
        self.config = c = config
        W = c.width
        self.x_emb = nn.Embedding(c.l_bins, W)
        self.pos_emb = nn.Parameter(torch.zeros(c.n_ctx, W))
        self.feature_norm = nn.LayerNorm(W)
        self.fuse = nn.Linear(2 * W, W)
        self.blocks = nn.ModuleList([_Block(W, c.hidden, c.block_norm) for _ in range(c.depth)])
        self.out_norm = nn.LayerNorm(W)
        self.x_out = nn.Linear(W, c.l_bins, bias=False)
        self._window = None           # (input table, conditioning projection) of the current window
        self._heads = {}
        self._chains = {}
        self._chain_scratch = None

    @classmethod
    def from_teacher(cls, prior: Prior, hidden: int = 512, depth: int = 1, block_norm: bool = True) -> "FeatureDrafter":
        """A drafter whose code embedding, position embedding and output head start as the teacher's."""
        tm = prior.prior
        w = tm.x_emb.weight
        with torch.device(w.device):
            d = cls(DrafterConfig.for_teacher(prior, hidden, depth, block_norm)).to(w.dtype)
        with torch.no_grad():
            d.x_emb.weight.copy_(w[: d.config.l_bins])
            d.pos_emb.copy_(tm.pos_emb()[: d.config.n_ctx])
            d.x_out.weight.copy_(tm.x_out.weight[: d.config.l_bins])
        return d

    @property
    def device(self) -> torch.device:
        return self.x_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_emb.weight.dtype

    # --- the drafted position, any leading shape (training) ---------------------------------
    def inputs(self, prev_codes: torch.Tensor, positions: torch.Tensor, x_cond: torch.Tensor | None) -> torch.Tensor:
        """What the teacher adds at its input for these positions: the embedding of the code
        before each, its position embedding and the conditioning there (``x_cond`` at the same
        positions, shaped like the result, or None)."""
        u = self.x_emb(prev_codes) + self.pos_emb[positions]
        return u if x_cond is None else u + x_cond

    def forward(self, feature: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """The feature of a position from the feature of the one before and its ``inputs``."""
        x = self.fuse(torch.cat([self.feature_norm(feature), inputs], dim=-1))
        for block in self.blocks:
            x = block(x)
        return x

    def logits(self, feature: torch.Tensor) -> torch.Tensor:
        return self.x_out(self.out_norm(feature))

    # --- sampling: one window, one position at a time ---------------------------------------
    @torch.no_grad()
    def begin(self, x_cond: torch.Tensor | None, n: int) -> None:
        """Fold the input embeddings into the projection for a window of ``n`` rows with the
        teacher's conditioning ``x_cond`` (N, >= n_ctx, W) or None, and lay the weights out for
        ``step`` (transposed, contiguous: one ``addmm`` per projection)."""
        W = self.config.width
        w_feature, w_input = self.fuse.weight[:, :W], self.fuse.weight[:, W:]
        table = self.x_emb.weight @ w_input.t()                                   # (l_bins, W)
        where = self.pos_emb if x_cond is None else self.pos_emb + x_cond[:n, : self.config.n_ctx].to(self.dtype)
        # (n, n_ctx, W), with the feature norm's shift projected: ``step`` and ``chain`` apply its scale only
        cond = (where @ w_input.t() + self.fuse.bias + w_feature @ self.feature_norm.bias).expand(n, -1, -1)
        blocks = [(b.norm, b.fc1.weight.t().contiguous(), b.fc1.bias, b.fc2.weight.t().contiguous(), b.fc2.bias)
                  for b in self.blocks]
        self._window = (w_feature.t().contiguous(), table, cond, blocks, self.x_out.weight.t().contiguous())
        self._heads = {}             # temperature -> output head divided by it (``step_probs``)
        self._chains = {}            # temperature -> ``chain``'s folded weights
        self._chain_scratch = None   # ``chain``'s buffers (``_scratch``)

    @torch.no_grad()
    def step(self, feature: torch.Tensor, prev_codes: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """``forward`` at ``position`` (one for every row, or (N,) long: each row's own) for rows
        (N, W) whose previous codes are ``prev_codes`` (N,), after ``begin``: the feature (N, W)."""
        if self._window is None:
            raise RuntimeError("FeatureDrafter.step before begin")
        w_feature, table, cond, blocks, _ = self._window
        W, norm = self.config.width, self.feature_norm
        at = cond[:, position] if isinstance(position, int) else cond[torch.arange(cond.shape[0]), position]
        x = torch.addmm(at, F.layer_norm(feature, (W,), norm.weight, None, norm.eps), w_feature)
        x.add_(table[prev_codes])
        for block_norm, w1, b1, w2, b2 in blocks:
            y = x if block_norm is None else F.layer_norm(x, (W,), block_norm.weight, block_norm.bias, block_norm.eps)
            h = F.gelu(torch.addmm(b1, y, w1), approximate="tanh")
            x = torch.addmm(b2, h, w2).add_(x)
        return x

    @torch.no_grad()
    def step_logits(self, feature: torch.Tensor) -> torch.Tensor:
        """``logits`` with ``begin``'s weight layout."""
        norm = self.out_norm
        return torch.mm(F.layer_norm(feature, (self.config.width,), norm.weight, norm.bias, norm.eps), self._window[4])

    @torch.no_grad()
    def step_probs(self, feature: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 0.0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The proposal distribution (N, V) fp32 of the drafted position whose feature is ``feature``:
        ``sampling_probs(step_logits(feature), temperature, top_k, top_p)``, written into ``out``
        when given. Without top-k / top-p the temperature is folded into the head (one matrix
        product and a softmax; the same distribution up to rounding)."""
        if temperature > 0 and not top_k and not top_p and self.dtype == torch.float32:
            head = self._heads.get(temperature)
            if head is None:
                head = self._heads[temperature] = self._window[4] / temperature
            norm = self.out_norm
            logits = torch.mm(F.layer_norm(feature, (self.config.width,), norm.weight, norm.bias, norm.eps), head)
            return torch.softmax(logits, -1) if out is None else torch.softmax(logits, -1, out=out)
        probs = sampling_probs(self.step_logits(feature), temperature, top_k, top_p)
        return probs if out is None else out.copy_(probs)

    # --- sampling: a run of drafted positions, the norms' scales folded into the weights ------
    def chains(self, temperature: float, top_k: int = 0, top_p: float = 0.0) -> bool:
        """Whether ``chain`` drafts with these settings: a positive temperature, no top-k / top-p
        (the filters need each position's sorted logits: ``step_probs`` covers them), float weights."""
        return temperature > 0 and not top_k and not top_p and self.dtype in (torch.float32, torch.float64)

    def _chain_weights(self, temperature: float):
        """``chain``'s weights at ``temperature``, once per window and temperature. A drafted feature is
        normalised once for two uses (the output head and the next position's projection: both
        norms have the same statistics), so their scales go into one (W, V + W) matrix and the output
        norm's shift into a head bias (V,), with 1 / T (the feature norm's shift is in ``begin``'s
        conditioning projection; both norms are built with the same eps). Each block's norm is folded
        into ``fc1``.

        Blocks without a norm are affine up to their GELU, so their output biases ``b2`` go into the
        drafted position's input (``input_bias``, their sum) and each ``fc1`` bias takes off what
        ``fc1`` then reads of the ``b2`` still ahead of it: a block is ``addmm``, GELU and an ``addmm``
        whose input is the residual (its ``eps`` entry is None)."""
        got = self._chains.get(temperature)
        if got is None:
            fn, on, w_feature = self.feature_norm, self.out_norm, self.fuse.weight[:, :self.config.width]
            weights = torch.cat([self.x_out.weight.t() * (on.weight[:, None] / temperature),
                                 w_feature.t() * fn.weight[:, None]], 1).contiguous()
            input_bias, blocks = None, []
            if self.config.block_norm:
                blocks = [((b.fc1.weight * b.norm.weight).t().contiguous(), b.fc1.bias + b.fc1.weight @ b.norm.bias,
                           b.fc2.weight.t().contiguous(), b.fc2.bias, b.norm.eps) for b in self.blocks]
            elif self.blocks:
                ahead = input_bias = sum(b.fc2.bias for b in self.blocks)   # the b2 not yet added, per block
                for b in self.blocks:
                    blocks.append((b.fc1.weight.t().contiguous(), b.fc1.bias - b.fc1.weight @ ahead,
                                   b.fc2.weight.t().contiguous(), None, None))
                    ahead = ahead - b.fc2.bias
            got = self._chains[temperature] = (weights, self.x_out.weight @ on.bias / temperature, blocks, fn.eps,
                                               input_bias)
        return got

    def _scratch(self, n: int, count: int) -> "_ChainScratch":
        """``chain``'s buffers for ``n`` rows and up to ``count`` drafts, kept for the window (a call
        with more drafts or other rows replaces them)."""
        got = self._chain_scratch
        if got is None or got.n != n or got.capacity < count:
            got = self._chain_scratch = _ChainScratch(n, count, self.config.l_bins, self.config.width,
                                                      self.dtype, self.device)
        return got

    @torch.no_grad()
    def chain(self, feature: torch.Tensor, prev: torch.Tensor, lo: int | torch.Tensor, count: int,
              log_noise: torch.Tensor, temperature: float, ids: torch.Tensor) -> torch.Tensor:
        """Draft ``count`` positions in sequence from ``lo`` (an int for every row, or (N,) long: each
        row's own), after ``begin``, with ``chains(temperature)``: each drafted code is drawn from
        ``softmax(logits / T)`` of its position by the exponential race (``race_winner`` of
        ``logits / T - log E``) and is the next position's input.

        feature: (N, W) the teacher's final activation at ``lo - 1``; prev: (N,) the code there.
        log_noise: (count, N, V) ``log E`` of each drafted position's Exp(1) draw noise.
        ids: (count, N) long, receives the drafted codes (a view of a token buffer works).
        Returns the drafted positions' logits / T, (count, N, V): ``step_logits(step(...)) / T``
        up to rounding; their softmax is the proposal ``q``. The result lives in the drafter's
        scratch: read it before the next call."""
        W, V = self.config.width, self.config.l_bins
        weights, head_bias, blocks, eps, input_bias = self._chain_weights(temperature)
        _, table, cond, _, _ = self._window
        N = feature.shape[0]
        s = self._scratch(N, count)
        if isinstance(lo, int):
            cond = cond[:, lo:lo + count]                                           # (N, count, W)
        else:
            # a row's positions past the window are padding (the caller keeps none of their drafts)
            at = (lo[:, None] + s.steps[:count]).clamp_(max=self.config.n_ctx - 1)
            cond = cond[s.rows, at]
        # bias row j: [the head's for position lo + j - 1, less its draw's log-noise | position lo + j's
        # input], so each product row holds that position's race (the logits come back after the loop)
        torch.sub(head_bias, log_noise, out=s.bias[1:count + 1, :, :V])
        if input_bias is None:
            s.bias[:count, :, V:].copy_(cond.transpose(0, 1))
        else:
            torch.add(cond.transpose(0, 1), input_bias, out=s.bias[:count, :, V:])
        rows, heads, inputs, biases, ids_at = s.rows_out, s.heads, s.inputs, s.bias_rows, ids.unbind(0)
        f = feature
        for j in range(count + 1):
            # row j: the race of position lo + j - 1 and the feature's part of position lo + j's
            # input; the first row needs only the input, the last only the race
            y = F.layer_norm(f, (W,), None, None, eps)
            if j == 0:
                torch.addmm(s.first_bias, y, weights[:, V:], out=inputs[0])
            elif j < count:
                torch.addmm(biases[j], y, weights, out=rows[j])
            else:
                torch.addmm(s.bias_heads[j], y, weights[:, :V], out=heads[j])
            if j:
                prev = race_winner(heads[j], out=ids_at[j - 1], values=s.maxima)
            if j == count:
                break
            x = inputs[j].add_(table.index_select(0, prev))
            for w1, b1, w2, b2, block_eps in blocks:
                if block_eps is None:           # no norm: the output bias is in x already
                    h = torch.ops.aten.gelu_(torch.addmm(b1, x, w1), approximate="tanh")
                    x = x.addmm_(h, w2)         # in the scratch row: no allocation per position
                    continue
                h = torch.ops.aten.gelu_(torch.addmm(b1, F.layer_norm(x, (W,), None, None, block_eps), w1),
                                         approximate="tanh")
                x = torch.addmm(b2, h, w2).add_(x)
            f = x
        return s.out[1:count + 1, :, :V].add_(log_noise)

    # --- checkpoints ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write a component directory (``config.json`` with ``kind: "drafter"``, ``model.safetensors``),
        atomically: a finished directory replaces ``path`` at the end."""
        return write_component_dir(path, self.state_dict(),
                                   {"kind": DRAFTER_KIND, "format": FORMAT_VERSION, **asdict(self.config)}, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> "FeatureDrafter":
        """Load a directory written by ``save`` (weights in ``dtype``, default float32), in eval mode."""
        directory = Path(path)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise CheckpointError(f"{directory}: not a drafter directory (no {CONFIG_NAME})")
        try:
            d = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or d.get("kind") != DRAFTER_KIND:
                raise ValueError(f"kind is {d.get('kind') if isinstance(d, dict) else None!r}, not {DRAFTER_KIND!r}")
            if d.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {d.get('format')!r}, this version reads {FORMAT_VERSION}")
            config = DrafterConfig(**{f.name: d[f.name] for f in fields(DrafterConfig) if f.name in d})
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{cfg_path}: not a valid drafter config ({e})") from None
        sd = read_weights(directory)
        with torch.device("meta"):
            model = cls(config)
        check_state_dict(model.state_dict(), sd, str(directory), "this drafter architecture")
        dtype = dtype or torch.float32
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        return model.eval()
