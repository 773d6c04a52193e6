"""A parallel (non-autoregressive) upsampler student: the teacher's architecture, bidirectional.

The student sees a whole window at once. Known positions carry their code, unknown positions
the mask id ``l_bins``; it predicts every position from everything (MaskGIT-style masked-token
model). Its input at position ``t`` is

    x_emb(tokens[t]) + pos_emb[t] + x_cond[t] (+ the label start embedding, at every position)

(the teacher's input at ``t`` is the embedding of token ``t - 1``; students with the
``"shifted"`` input layout read ``tokens[t - 1]`` too, so the nearest left context needs no
attention, and still predict every masked position at once). The transformer is the
teacher's (same width, depth, heads, factored patterns) run with ``causal=False``: block and
column layers see their whole block / column, previous-block layers still read the previous
block. Conditioning on the level above and on labels is the teacher's, module for module, so
``from_teacher`` starts the student from every teacher weight.

Attention layout: with ``prefix_len`` > 0 (a window whose first ``prefix_len`` codes are known)
the known prefix attends only within itself and every other position sees everything
(``distill.prefix_layout``), so the sampler computes the prefix once per window
(``prefix_cache``) and each pass runs only the unknown positions, scoring only those still
masked (``positions``). ``prefix_len`` 0 is full bidirectional attention. Students trained with
the layout say so in ``sampling.prefix_cache``.

Submodule names follow ``fastjukebox.Prior`` (``prior.*``, ``conditioner_blocks.0``, ``y_emb``).

``sampling`` holds the student's own defaults for ``ParallelWindowSampler`` (saved beside the
weights as ``sampling.json``): its pass count, its layout, and how much choice noise its
unmasking wants (it depends on how sharp the teacher is, so ``distill.train`` measures it on
training-shard windows, ``distill.tune``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastjukebox.token_model import PositionEmbedding
from fastjukebox.checkpoint import (CONFIG_NAME, FORMAT_VERSION, CheckpointError, check_state_dict,
                                    read_config_and_extras, read_weights, write_component_dir)
from fastjukebox.config import PriorConfig
from fastjukebox.prior import Conditioning, Prior, label_conditioner, upsampler_conditioner
from fastjukebox.transformer import Transformer

from .prefix_layout import PrefixCache, check_prefix_len, encode_prefix, full_forward, suffix_forward

__all__ = ["ParallelStudent", "STUDENT_KIND", "StudentSampling", "SAMPLING_NAME", "ORDERS", "TEACHERS"]

TEACHERS = {"middle": 1, "bottom": 0}   # the upsamplers a student distils, by name: their levels
ORDERS = ("confidence", "spread", "random")    # ways a sampler pass picks the positions it makes final

SAMPLING_NAME = "sampling.json"
DEFAULT_PASSES = 4     # decoding passes per window of a student trained or sampled without a setting


@dataclass(frozen=True)
class StudentSampling:
    """A student's defaults for ``ParallelWindowSampler`` (see its arguments). The values here
    are the ones used before a student has its own (chosen on the demo's level-1 student).

    ``passes``: decoding passes per window. ``prefix_cache``: the student was trained with the
    prefix-cached attention layout (``distill.prefix_layout``), so the sampler runs a window's
    known prefix once and every pass over the unknown positions only; students trained with
    full bidirectional attention have False. ``temperature_scale``: the student draws at the
    caller's temperature times this (below 1 sharpens a student whose per-position marginals
    are flatter than the teacher's conditionals). ``order``: which positions a pass makes final,
    ``"confidence"`` (the most confident draws), ``"spread"`` (a fixed order that spreads every
    pass's positions evenly over the window, ``schedules.spread_order``) or ``"random"`` (a random
    order per window)."""

    confidence_noise: float = 16.0
    temperature_anneal: bool = False
    passes: int = DEFAULT_PASSES
    prefix_cache: bool = False
    temperature_scale: float = 1.0
    order: str = "confidence"

    def __post_init__(self):
        if not (isinstance(self.confidence_noise, (int, float)) and self.confidence_noise >= 0):
            raise ValueError(f"confidence_noise must be a number >= 0, got {self.confidence_noise!r}")
        if not isinstance(self.temperature_anneal, bool):
            raise ValueError(f"temperature_anneal must be true or false, got {self.temperature_anneal!r}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ValueError(f"passes must be an integer >= 1, got {self.passes!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be true or false, got {self.prefix_cache!r}")
        if isinstance(self.temperature_scale, bool) or not (isinstance(self.temperature_scale, (int, float))
                                                             and self.temperature_scale > 0):
            raise ValueError(f"temperature_scale must be a number > 0, got {self.temperature_scale!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "StudentSampling":
        known = tuple(f.name for f in fields(cls))
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown} (known: {', '.join(known)})")
        return cls(**d)

STUDENT_KIND = "student"
# what a position's input embedding holds: its own code (or the mask), or its left neighbour's
# (as the autoregressive teacher's input does), so that the nearest context needs no attention
INPUT_LAYOUTS = ("tokens", "shifted")


def check_input_layout(layout) -> str:
    if layout not in INPUT_LAYOUTS:
        raise ValueError(f"input_layout must be one of {', '.join(INPUT_LAYOUTS)}, got {layout!r}")
    return layout


class MaskedTokenModel(nn.Module):
    """Embeddings, bidirectional transformer and output head over ``l_bins`` codes + 1 mask id.

    The head is tied to the code rows of ``x_emb`` unless ``merged_decoder`` (then ``x_out``
    is a separate ``(l_bins, W)`` projection), and ``x_cond`` is added again before the head
    unless ``merged_decoder``: both as in the teacher.
    """

    def __init__(self, c: PriorConfig, input_layout: str = "tokens"):
        super().__init__()
        self.input_layout = check_input_layout(input_layout)
        self.l_bins, self.width = c.l_bins, c.width
        self.x_emb = nn.Embedding(c.l_bins + 1, c.width)
        nn.init.normal_(self.x_emb.weight, std=0.02 * c.init_scale)
        self.pos_emb = PositionEmbedding(c.n_ctx, c.width, c.init_scale)
        self.transformer = Transformer(c.width, c.n_ctx, c.heads, c.depth, c.attn_order, c.blocks, c.m_attn,
                                       c.m_mlp, c.res_scale, None, c.init_scale)
        self.cond_after = not c.merged_decoder
        if c.merged_decoder:
            self.x_out = nn.Linear(c.width, c.l_bins, bias=False)
            nn.init.normal_(self.x_out.weight, std=0.02 * c.init_scale)

    @property
    def tied(self) -> bool:
        return not hasattr(self, "x_out")

    def out_weight(self) -> torch.Tensor:
        """(l_bins, W): the output projection (the code rows of ``x_emb`` when tied)."""
        return self.x_emb.weight[: self.l_bins] if self.tied else self.x_out.weight

    def embed(self, tokens: torch.Tensor, start: torch.Tensor | None, x_cond: torch.Tensor | None,
              lo: int = 0, left: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (N, T, W) of ``tokens`` (N, T) at positions [lo, lo + T). The shifted
        layout needs ``left`` (N, 1), the code at ``lo - 1``, when ``lo`` > 0. ``inputs``: the
        positions' ``position_inputs`` (then ``start`` and ``x_cond`` are not read again)."""
        hi = lo + tokens.shape[1]
        if self.input_layout == "shifted":     # position t reads the code at t - 1 (mask: unknown)
            if lo == 0:
                left = torch.full_like(tokens[:, :1], self.l_bins)
            elif left is None:
                raise ValueError("the shifted input layout needs the code left of position "
                                 f"{lo} to embed positions [{lo}, {hi})")
            tokens = torch.cat([left, tokens[:, :-1]], dim=1)
        if inputs is not None:
            return self.x_emb(tokens).add_(inputs)
        x = self.x_emb(tokens) + self.pos_emb()[lo:hi]          # (N, T, W)
        if start is not None:
            x = x + start                                       # (N, 1, W) broadcast over positions
        if x_cond is not None:
            x = x + x_cond[:, lo:hi]
        return x

    def position_inputs(self, start: torch.Tensor | None, x_cond: torch.Tensor | None, lo: int,
                        hi: int) -> torch.Tensor:
        """What ``embed`` adds to the code embeddings of positions [lo, hi): position embeddings,
        the label start embedding and the conditioning, (N, hi - lo, W) (or (hi - lo, W) with
        neither). Summed once, it spares a window's passes two additions each (the same sum in
        another order: equal to rounding)."""
        x = self.pos_emb()[lo:hi]
        if start is not None:
            x = x + start
        if x_cond is not None:
            x = x + x_cond[:, lo:hi]
        return x

    def head(self, h: torch.Tensor, x_cond: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        """Logits (N, S, l_bins) from hidden states ``h`` (N, S, W) at window positions
        ``positions`` ((S,) or (N, S) long; they select the ``x_cond`` rows added back)."""
        if self.cond_after and x_cond is not None:
            if positions.dim() == 1:
                h = h + x_cond[:, positions]
            else:
                h = h + x_cond.gather(1, positions[..., None].expand(-1, -1, x_cond.shape[-1]))
        return F.linear(h, self.out_weight())

    def forward(self, tokens: torch.Tensor, start: torch.Tensor | None, x_cond: torch.Tensor | None,
                lo: int = 0, hi: int | None = None, prefix_len: int = 0, *, cache: PrefixCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """One pass: tokens (N, n_ctx) ids in [0, l_bins] -> logits (N, hi - lo, l_bins) of
        positions [lo, hi), or (N, S, l_bins) of ``positions`` ((N, S) long) when given.

        The attention layout has a known prefix of ``prefix_len`` positions
        (``distill.prefix_layout``; 0: every position sees every other). With ``cache`` (from
        ``encode_prefix`` of ``tokens[:, :P]``) only positions [P, n_ctx) are run, against it;
        the positions scored must then lie in [P, n_ctx)."""
        if cache is not None:
            P = cache.prefix_len
            if positions is not None:       # the last layer past attention and the head: those rows only
                h = self.suffix_hidden(tokens[:, P:], start, x_cond, cache, left=tokens[:, P - 1:P],
                                       rows=positions - P)
                return self.head(h, x_cond, positions)
            h = self.suffix_hidden(tokens[:, P:], start, x_cond, cache, left=tokens[:, P - 1:P])
        else:
            P = 0
            h = full_forward(self.transformer, self.embed(tokens, start, x_cond), prefix_len)
        if positions is None:
            hi = tokens.shape[1] if hi is None else hi
            return self.head(h[:, lo - P:hi - P], x_cond, torch.arange(lo, hi, device=tokens.device))
        rows = (positions - P)[..., None].expand(-1, -1, h.shape[-1])
        return self.head(h.gather(1, rows), x_cond, positions)

    def encode_prefix(self, prefix: torch.Tensor, start: torch.Tensor | None,
                      x_cond: torch.Tensor | None) -> PrefixCache:
        """The known prefix (N, P) codes, run once: its keys and values for every later pass, and
        the later positions' ``position_inputs`` (passes must use the same ``start``, ``x_cond``)."""
        cache = encode_prefix(self.transformer, self.embed(prefix, start, x_cond))
        cache.suffix_inputs = self.position_inputs(start, x_cond, prefix.shape[1], self.pos_emb().shape[0])
        return cache

    def suffix_hidden(self, suffix: torch.Tensor, start: torch.Tensor | None, x_cond: torch.Tensor | None,
                      cache: PrefixCache, left: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (N, n_ctx - P, W) of positions [P, n_ctx) (``suffix`` their ids) after
        the cached prefix; ``left`` (N, 1): the prefix's last code (read by the shifted layout);
        ``rows`` ((N, S) long, indices into the suffix): only those, (N, S, W)
        (``prefix_layout.suffix_forward``)."""
        x = self.embed(suffix, start, x_cond, cache.prefix_len, left, cache.suffix_inputs)
        return suffix_forward(self.transformer, x, cache, rows)


class ParallelStudent(nn.Module):
    """Masked-token upsampler with a teacher upsampler's conditioner, width, depth and patterns.

    ``mask_id == config.l_bins``. Only upsampler configs (not the top level, no lyrics).
    """

    def __init__(self, config: PriorConfig, input_layout: str = "tokens"):
        super().__init__()
        if not isinstance(config, PriorConfig):
            raise TypeError(f"config must be a PriorConfig, got {type(config).__name__}")
        if config.is_top:
            raise ValueError(f"a parallel student replaces an upsampler; level {config.level} is the top level "
                             f"of {config.levels} (it has no upper-level codes to condition on)")
        if config.lyrics is not None:
            raise ValueError(f"parallel students do not support lyric conditioning (config has lyrics={config.lyrics!r})")
        self.config = c = config
        self.conditioner_blocks = nn.ModuleList([upsampler_conditioner(c)])
        if c.labels:
            self.y_emb = label_conditioner(c)   # is_top is False here: no timing signal
        self.prior = MaskedTokenModel(c, input_layout)
        self.sampling = StudentSampling()

    @property
    def mask_id(self) -> int:
        return self.config.l_bins

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_teacher(cls, prior: Prior, input_layout: str = "tokens") -> "ParallelStudent":
        """A student on the teacher's device and dtype holding a copy of every teacher weight that
        has a counterpart: conditioners, position embedding, all transformer layers, the code rows
        of the token embedding and (untied heads) the output projection. Only the mask-id
        embedding row is new."""
        w = prior.prior.x_emb.weight
        with torch.device(w.device):
            student = cls(prior.config, input_layout).to(w.dtype)
        teacher = prior.state_dict()
        own = student.state_dict()
        with torch.no_grad():
            for name, dst in own.items():
                src = teacher.get(name)
                if src is None:
                    continue
                if name == "prior.x_emb.weight":
                    dst[: src.shape[0]].copy_(src)
                elif src.shape == dst.shape:
                    dst.copy_(src)
                else:
                    raise CheckpointError(f"teacher weight {name} has shape {tuple(src.shape)}, "
                                          f"the student's {tuple(dst.shape)}")
        return student.train(prior.training)

    # the teacher's: where the weights are and their dtype (read off ``prior.x_emb``, which this
    # module has under the same name)
    device, dtype = Prior.device, Prior.dtype

    # --- conditioning -----------------------------------------------------------------------
    def check_labels(self, labels) -> torch.Tensor | None:
        """Label rows (N, label_len) as a LongTensor, or None; errors as ``Prior.check_labels``."""
        return Prior.check_labels(self, labels)

    def condition(self, upper, labels=None) -> Conditioning:
        """Conditioning of one window, with the teacher's checks and errors.

        upper: (N, n_ctx // cond_downsample) codes of the level above.
        labels: (N, label_len) label rows of this window (when the config has labels).
        """
        # Prior.condition reads only ``config``, ``check_labels``, ``y_emb``, ``conditioner_blocks``,
        # ``device`` and ``dtype``, which this module has under the same names.
        return Prior.condition(self, upper, labels)

    # --- forward ----------------------------------------------------------------------------
    def check_tokens(self, tokens) -> torch.Tensor:
        """(N, n_ctx) integer ids in [0, l_bins] (``l_bins`` = mask) as a LongTensor on the
        model's device. Reads the values (a host sync): call it outside sampling loops."""
        c = self.config
        z = torch.as_tensor(tokens)
        if z.is_floating_point() or z.is_complex() or z.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got {z.dtype}")
        if z.dim() != 2 or z.shape[1] != c.n_ctx:
            raise ValueError(f"tokens must be (N, n_ctx={c.n_ctx}) with mask_id={self.mask_id} where unknown, "
                             f"got shape {tuple(z.shape)}")
        z = z.long().to(self.device)
        if z.numel() and (int(z.min()) < 0 or int(z.max()) > self.mask_id):
            raise ValueError(f"token ids must be in [0, {c.l_bins}) or mask_id={self.mask_id}; "
                             f"got values in [{int(z.min())}, {int(z.max())}]")
        return z

    def check_batch(self, n: int, cond: Conditioning) -> None:
        batch = next((t.shape[0] for t in (cond.start, cond.x_cond) if t is not None), n)
        if batch != n:
            raise ValueError(f"tokens have batch {n} but the conditioning has batch {batch}")

    def logits_unchecked(self, tokens: torch.Tensor, cond: Conditioning, lo: int = 0, hi: int | None = None,
                         prefix_len: int = 0, *, cache: PrefixCache | None = None,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` without reading token values (no host sync): tokens must already be a
        valid (N, n_ctx) LongTensor on the model's device. Returns fp32 logits (N, hi - lo, l_bins)
        of positions [lo, hi) only, or of ``positions`` (N, S); ``prefix_len``, ``cache`` as in
        ``MaskedTokenModel.forward``."""
        return self.prior(tokens, cond.start, cond.x_cond, lo, hi, prefix_len, cache=cache,
                          positions=positions).float()

    def prefix_cache(self, known: torch.Tensor, cond: Conditioning) -> PrefixCache:
        """Keys and values of a window's known prefix (N, P) codes under the prefix layout,
        computed once and passed to every pass (``logits_unchecked(..., cache=...)``)."""
        return self.prior.encode_prefix(known, cond.start, cond.x_cond)

    def forward(self, tokens, cond: Conditioning, prefix_len: int = 0) -> torch.Tensor:
        """tokens (N, n_ctx) codes, ``mask_id`` where unknown; cond from ``condition``;
        ``prefix_len``: known positions under the prefix-cached layout (``distill.prefix_layout``;
        0: full bidirectional attention). Returns logits (N, n_ctx, l_bins) in fp32; logits[:, t]
        scores position t."""
        z = self.check_tokens(tokens)
        self.check_batch(z.shape[0], cond)
        return self.logits_unchecked(z, cond, prefix_len=check_prefix_len(prefix_len, self.config.n_ctx))

    # --- checkpoints ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write a component directory (``config.json`` with ``kind: "student"``, and
        ``model.safetensors``), atomically: a finished directory replaces ``path`` at the end."""
        layout = {} if self.prior.input_layout == "tokens" else {"input_layout": self.prior.input_layout}
        return write_component_dir(path, self.state_dict(),
                                   {"kind": STUDENT_KIND, "format": FORMAT_VERSION, **layout, **self.config.to_dict()},
                                   {SAMPLING_NAME: asdict(self.sampling)}, dtype)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> "ParallelStudent":
        """Load a directory written by ``save`` (weights in ``dtype``, default float32), in eval mode."""
        directory = Path(path)
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory}: not a student directory (no {CONFIG_NAME})")
        try:
            config, extras = read_config_and_extras(directory, STUDENT_KIND, extra=("input_layout",))
            layout = check_input_layout(extras.get("input_layout", "tokens"))
        except (TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{directory / CONFIG_NAME}: not a valid student config ({e})") from None
        sd = read_weights(directory)
        with torch.device("meta"):
            model = cls(config, layout)
        check_state_dict(model.state_dict(), sd, str(directory), "this student architecture")
        dtype = dtype or torch.float32
        sd = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        model.sampling = _read_sampling(directory)
        return model.eval()


def _read_sampling(directory: Path) -> StudentSampling:
    """``sampling.json`` of a student directory; students saved without one get the defaults."""
    path = directory / SAMPLING_NAME
    if not path.is_file():
        return StudentSampling()
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        return StudentSampling.from_dict(d)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid sampling settings ({e})") from None
