"""The original Jukebox sampling loop, step for step, on a fastjukebox prior's weights.

``OriginalStyleSampler`` re-creates how the original implementation executes one sampling step,
so that the benchmark compares against what its users run rather than against a tidied version:

* the module tree of the original (transformer -> residual block -> attention / MLP, each linear
  layer a module that re-casts its weight and bias to the activation dtype on every call, a
  dropout module (p=0, eval) after the attention softmax, after the attention projection and
  after the MLP);
* one position per step; per-layer key/value caches in a dict, grown with ``torch.cat`` and cut
  back to what the layer's pattern needs; the step's keys picked from the cache by slicing
  (strided for transpose layers, zeros for block 0 of previous-block layers);
* heads split with ``view`` + ``permute`` and merged with ``permute`` + ``contiguous``; scores
  scaled in place, cast to fp32 for the softmax and back;
* the per-step input checks (token ids in range, which reads the ids on the host), the output
  projection, ``logits / temperature``, the top-k / top-p filter and a
  ``torch.distributions.Categorical`` draw.

The arithmetic per position is the same as fastjukebox's static-cache decoder, so greedy decoding
(``top_k=1``) gives the same tokens. Ancestral draws come from the global generator (seeded per
call) as in the original, so they differ from ``fastjukebox.sampling.sample_logits``'s draws.
Priors without lyrics only. A window starts empty or with known codes whose keys are filled in
by ``benchmarks.baselines.prefill_kv`` (priming is not timed).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fastjukebox.layers import quick_gelu
from fastjukebox.prior import Prior
from fastjukebox.sampling import filter_logits

from .baselines import needed_cache_len, prefill_kv

__all__ = ["OriginalStyleSampler"]


class _Linear(nn.Module):
    """Weights ``(n_in, n_out)``, re-cast to the input's dtype on every call."""

    def __init__(self, conv):
        super().__init__()
        self.w, self.b = conv.w, conv.b
        self.n_out = conv.w.shape[1]

    def forward(self, x):
        size_out = (*x.size()[:-1], self.n_out)
        x = torch.addmm(self.b.type_as(x), x.view(-1, x.size(-1)), self.w.type_as(x))
        return x.view(*size_out)


class _LayerNorm(nn.Module):
    def __init__(self, ln):
        super().__init__()
        self.ln = ln

    def forward(self, x):
        ln = self.ln
        if x.dtype in (torch.float16, torch.bfloat16):
            return nn.functional.layer_norm(x.float(), ln.normalized_shape, ln.weight, ln.bias,
                                            ln.eps).type_as(x)
        return nn.functional.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class _Attention(nn.Module):
    SUPPORTED = ("dense", "block", "transpose", "prev_block")

    def __init__(self, attn, block_len: int):
        super().__init__()
        if attn.pattern not in self.SUPPORTED:
            raise NotImplementedError(f"{attn.pattern!r} layers are not supported")
        self.c_attn, self.c_proj = _Linear(attn.c_attn), _Linear(attn.c_proj)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)
        self.pattern, self.n_head, self.n_state = attn.pattern, attn.heads, attn.n_state
        self.block_ctx = block_len
        self.reset()

    def reset(self):
        self.cache, self.sample_t = {}, 0

    # --- cache ---------------------------------------------------------------------------
    def _suff_cache_len(self) -> int:
        return needed_cache_len(self.pattern, self.sample_t, self.block_ctx)

    def _append_cache(self, key, value):
        if "key" not in self.cache:
            self.cache["key"], self.cache["value"] = key, value
        else:
            self.cache["key"] = torch.cat([self.cache["key"], key], dim=1)
            self.cache["value"] = torch.cat([self.cache["value"], value], dim=1)
        return self.cache["key"], self.cache["value"]

    def _slice_cache(self, start):
        self.cache["key"] = self.cache["key"][:, start:]
        self.cache["value"] = self.cache["value"][:, start:]

    # --- attention -----------------------------------------------------------------------
    def _split_heads(self, x, k=False):
        x = x.view(*x.size()[:-1], self.n_head, x.size(-1) // self.n_head)
        return x.permute(0, 2, 3, 1) if k else x.permute(0, 2, 1, 3)

    def _merge_heads(self, x):
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.view(*x.size()[:-2], x.size(-2) * x.size(-1))

    def _dense_attn(self, q, k, v):
        q, k, v = self._split_heads(q), self._split_heads(k, k=True), self._split_heads(v)
        scale = 1.0 / math.sqrt(math.sqrt(self.n_state // self.n_head))
        w = torch.matmul(q, k)
        w.mul_(scale * scale)
        wtype = w.dtype
        w = torch.softmax(w.float(), dim=-1).type(wtype)
        w = self.attn_dropout(w)
        return self._merge_heads(torch.matmul(w, v))

    def _pattern_attn(self, q, k, v):
        bs, length, d = v.shape
        C = self.block_ctx
        if self.pattern == "transpose":
            col = (length - 1) % C
            k, v = k[:, col::C, :], v[:, col::C, :]
        elif self.pattern == "prev_block":
            if (length - 1) // C > 0:
                k, v = k[:, :C, :], v[:, :C, :]
            else:
                k = torch.zeros(bs, C, d, device=q.device, dtype=q.dtype)
                v = torch.zeros(bs, C, d, device=q.device, dtype=q.dtype)
        elif self.pattern == "block":
            assert length == self._suff_cache_len()
        return self._dense_attn(q, k, v).view(bs, 1, d)

    def forward(self, x):
        x = self.c_attn(x)
        q, k, v = x.chunk(3, dim=2)
        self.sample_t += 1
        k, v = self._append_cache(k, v)
        need = self._suff_cache_len()
        if self.cache["key"].shape[1] > need:
            self._slice_cache(-need)
            k, v = self.cache["key"], self.cache["value"]
        a = self.c_proj(self._pattern_attn(q, k, v))
        return self.resid_dropout(a)


class _MLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.c_fc, self.c_proj = _Linear(mlp.c_fc), _Linear(mlp.c_proj)
        self.resid_dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.resid_dropout(self.c_proj(quick_gelu(self.c_fc(x))))


class _Block(nn.Module):
    def __init__(self, layer, block_len: int):
        super().__init__()
        self.attn = _Attention(layer.attn, block_len)
        self.ln_0, self.ln_1 = _LayerNorm(layer.ln_0), _LayerNorm(layer.ln_1)
        self.mlp = _MLP(layer.mlp)
        self.res_scale = layer.res_scale

    def forward(self, x):
        a = self.attn(self.ln_0(x))
        m = self.mlp(self.ln_1(x + a))
        if self.res_scale == 1.0:
            return x + a + m
        return x + self.res_scale * (a + m)


class OriginalStyleSampler(nn.Module):
    """Samples a window the way the original does (module docstring): ``start`` then ``sample``."""

    def __init__(self, prior: Prior):
        super().__init__()
        c = prior.config
        if c.lyrics is not None:
            raise NotImplementedError("the original-style baseline covers priors without lyrics")
        self.prior, self.config = prior, c
        self.blocks = nn.ModuleList(_Block(layer, c.block_len) for layer in prior.prior.transformer._attn_mods)
        self.eval()

    def _check_cache(self, sample_t: int) -> None:
        for block in self.blocks:
            assert block.attn.sample_t == sample_t, "cache out of step"

    def _embed(self, t: int, n: int, prev, x_cond, start):
        tm = self.prior.prior
        if t == 0:
            x = torch.empty(n, 1, tm.width, dtype=tm.x_emb.weight.dtype, device=tm.x_emb.weight.device)
            x[:, 0] = tm.start_embedding(n, start).view(n, tm.width)
        else:
            assert bool((0 <= prev).all()) and bool((prev < tm.bins).all())
            x = tm.x_emb(prev)
        cond = x_cond[:, t:t + 1, :] if x_cond is not None else 0.0
        return x + tm.pos_emb()[t:t + 1] + cond, cond

    def start(self, cond, known: torch.Tensor) -> None:
        """Begin a window with conditioning ``cond`` and known codes ``(N, K)`` already fed."""
        for block in self.blocks:
            block.attn.reset()
        for block, (k, v) in zip(self.blocks, prefill_kv(self.prior, known, cond)):
            block.attn.cache["key"], block.attn.cache["value"] = k, v
        for block in self.blocks:
            block.attn.sample_t = known.shape[1]
        self.cond, self.n, self.t = cond, known.shape[0], known.shape[1]
        self.prev = known[:, -1:] if known.shape[1] else None

    @torch.no_grad()
    def sample(self, n_new: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
               seed: int = 0) -> torch.Tensor:
        """The next ``n_new`` codes (N, n_new); draws from the global generator seeded with ``seed``."""
        torch.manual_seed(seed)
        tm, cond = self.prior.prior, self.cond
        xs, x = [], self.prev
        for t in range(self.t, self.t + n_new):
            x, xc = self._embed(t, self.n, x, cond.x_cond, cond.start)
            self._check_cache(t)
            for block in self.blocks:
                x = block(x)
            if tm.cond_after:
                x = x + xc
            x = tm.x_out(x)
            x = x / temperature
            x = filter_logits(x, top_k=top_k, top_p=top_p)
            x = torch.distributions.Categorical(logits=x).sample()
            xs.append(x.clone())
        self.t += n_new
        self.prev = x
        return torch.cat(xs, dim=1)
