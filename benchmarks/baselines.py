"""Slower ways to sample a window, to measure ``fastjukebox.decoding.WindowDecoder`` against.

They sample ``n_new`` tokens of one prior's window from a given ``Conditioning`` with the same
token draw as fastjukebox (``fastjukebox.sampling.sample_logits`` with one generator), so for one
seed the methods produce the same tokens up to floating-point rounding, and exactly the same for
greedy runs (``top_k=1``) whenever no two logits are within rounding of each other.
(``benchmarks.original_style`` has the original's own step, module structure and draw.)

``sample_full_recompute`` (no cache)
    Every new token re-runs the teacher-forced token model on the whole prefix,
    ``prior.prior(tokens[:, :t + 1], x_cond, start)``, and keeps the last position's logits.
    Step ``t`` costs ``O(t)`` model evaluations, the window ``O(n_new**2)``.

``GrowingCacheSampler`` (the original Jukebox sampler's cache discipline)
    One position per step, with per-layer key/value caches held in a dict and grown by
    ``torch.cat``; after each append the cache is cut back to what the layer's pattern still
    needs, as the original does: ``block`` keeps the current block, ``prev_block`` the previous
    block plus the current one (or the current one while in block 0), ``transpose`` and
    ``dense`` everything. The step's keys are then picked from the cache: all of it for
    ``block``/``dense``, the first ``block_len`` slots for ``prev_block`` (zeros in block 0) and,
    for ``transpose``, one key per block by the strided slice ``k[:, (l - 1) % C :: C]``.
    Keys/values stay in the ``(N, L, n_state)`` layout, heads are split by view/permute per step,
    and every linear layer re-casts its weight and bias to the activation dtype on each call
    (a no-op ``.to`` when the dtypes already agree), as the original's ``Conv1D`` does with
    ``.type_as(x)``. The arithmetic is the same as the static-cache decoder's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastjukebox.layers import quick_gelu
from fastjukebox.prior import Prior
from fastjukebox.sampling import sample_logits

__all__ = ["sample_full_recompute", "GrowingCacheSampler", "prefill_kv", "needed_cache_len"]


def needed_cache_len(pattern: str, t: int, block_len: int) -> int:
    """Keys a growing cache keeps for ``pattern`` once position ``t`` (1-indexed) is in it, as the
    original cuts it: the current block, the previous plus the current one, or everything."""
    C = block_len
    if pattern in ("dense", "transpose"):
        return t
    if pattern == "block":
        return (t - 1) % C + 1
    if pattern == "prev_block":
        return t if t <= C else (t - 1) % C + 1 + C
    raise NotImplementedError(f"{pattern!r} layers are not supported")


@torch.no_grad()
def prefill_kv(prior: Prior, known: torch.Tensor, cond) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values ``(N, L, n_state)`` of every layer after the known codes ``(N, K)`` were fed,
    each cut to what a growing cache keeps at position ``K``: the state the original's chunked
    priming leaves behind, computed in one teacher-forced pass (priming is not timed)."""
    tm = prior.prior
    K = known.shape[1]
    if K == 0:
        return []
    x = tm.inputs(known, cond.start, cond.x_cond)
    out = []
    for layer in tm.transformer._attn_mods:
        attn = layer.attn
        _, k, v = attn.c_attn(layer.ln_0(x)).chunk(3, dim=-1)
        keep = needed_cache_len(attn.pattern, K, attn.block_len)
        out.append((k[:, K - keep:].contiguous(), v[:, K - keep:].contiguous()))
        x = layer(x)
    return out


@torch.no_grad()
def sample_full_recompute(prior: Prior, n_new: int, cond, *, temperature: float = 1.0,
                          top_k: int = 0, top_p: float = 0.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample ``n_new`` codes (N, n_new) from an empty window, re-running the teacher-forced
    model on the prefix per token. Priors without lyrics only."""
    c = prior.config
    if c.lyrics is not None:
        raise NotImplementedError("the full-recompute baseline covers priors without lyrics")
    n = next(t.shape[0] for t in (cond.start, cond.x_cond) if t is not None)
    tm = prior.prior
    tokens = torch.zeros(n, n_new, dtype=torch.long, device=tm.x_emb.weight.device)
    for t in range(n_new):
        # Position t's input is token t - 1; the value at t is never read (causal model).
        logits = tm(tokens[:, : t + 1], cond.x_cond, cond.start)[:, -1]
        tokens[:, t] = sample_logits(logits, temperature, top_k, top_p, generator)
    return tokens


def _linear(x: torch.Tensor, conv) -> torch.Tensor:
    """The original's ``Conv1D``: weights re-cast to the activation dtype on every call."""
    out = torch.addmm(conv.b.to(x.dtype), x.reshape(-1, x.shape[-1]), conv.w.to(x.dtype))
    return out.view(*x.shape[:-1], conv.w.shape[1])


def _layer_norm(x: torch.Tensor, ln) -> torch.Tensor:
    """The original's LayerNorm: normalise in fp32, cast back to the input's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(),
                            ln.eps).to(x.dtype)
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


class GrowingCacheSampler:
    """Step-by-step sampling with growing, re-sliced per-layer caches (see the module docstring).

    One instance can sample many windows: ``start`` sets up a window (empty, or primed with known
    codes), ``sample`` continues it."""

    SUPPORTED = ("dense", "block", "transpose", "prev_block")

    def __init__(self, prior: Prior):
        c = prior.config
        if c.lyrics is not None:
            raise NotImplementedError("the growing-cache baseline covers priors without lyrics")
        self.prior, self.config = prior, c
        self.layers = list(prior.prior.transformer._attn_mods)
        for layer in self.layers:
            if layer.attn.pattern not in self.SUPPORTED:
                raise NotImplementedError(f"{layer.attn.pattern!r} layers are not supported")
        self.block_len = c.block_len
        self.reset()

    def reset(self) -> None:
        self.cache: list[dict[str, torch.Tensor]] = [{} for _ in self.layers]
        self.sample_t = 0   # positions fed so far (1-indexed position of the last one)
        self.cond, self.prev = None, None

    def start(self, cond, known: torch.Tensor) -> None:
        """Begin a window with conditioning ``cond`` and known codes ``(N, K)`` already fed."""
        self.reset()
        self.cond, self.n = cond, known.shape[0]
        for cache, (k, v) in zip(self.cache, prefill_kv(self.prior, known, cond)):
            cache["key"], cache["value"] = k, v
        self.sample_t = known.shape[1]
        self.prev = known[:, -1:] if known.shape[1] else None

    # --- cache discipline -----------------------------------------------------------------
    def _needed(self, pattern: str) -> int:
        """Cache length a layer still needs once position ``sample_t`` has been appended."""
        return needed_cache_len(pattern, self.sample_t, self.block_len)

    def _append(self, i: int, key: torch.Tensor, value: torch.Tensor, pattern: str):
        cache = self.cache[i]
        if "key" in cache:
            key = torch.cat([cache["key"], key], dim=1)
            value = torch.cat([cache["value"], value], dim=1)
        need = self._needed(pattern)
        if key.shape[1] > need:
            key, value = key[:, -need:], value[:, -need:]
        cache["key"], cache["value"] = key, value
        return key, value

    def _keys_for_step(self, key: torch.Tensor, value: torch.Tensor, pattern: str):
        C = self.block_len
        N, L, S = key.shape
        if pattern == "transpose":
            col = (L - 1) % C
            return key[:, col::C], value[:, col::C]
        if pattern == "prev_block":
            if (L - 1) // C > 0:
                return key[:, :C], value[:, :C]
            zeros = torch.zeros(N, C, S, dtype=key.dtype, device=key.device)
            return zeros, zeros
        return key, value

    # --- one position -----------------------------------------------------------------------
    def _attend(self, q, k, v, heads: int):
        """q: (N, 1, S), k/v: (N, L, S) -> (N, 1, S), heads split by view/permute."""
        N, L, S = k.shape
        D = S // heads
        qh = q.view(N, 1, heads, D).permute(0, 2, 1, 3)
        kh = k.view(N, L, heads, D).permute(0, 2, 3, 1)
        vh = v.view(N, L, heads, D).permute(0, 2, 1, 3)
        w = torch.matmul(qh, kh) * (1.0 / math.sqrt(D))
        compute = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        w = torch.softmax(w.to(compute), dim=-1)
        a = torch.matmul(w, vh.to(compute)).to(q.dtype)
        return a.permute(0, 2, 1, 3).reshape(N, 1, S)

    def _layer(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        attn = layer.attn
        q, k, v = _linear(_layer_norm(x, layer.ln_0), attn.c_attn).chunk(3, dim=-1)
        k, v = self._append(i, k, v, attn.pattern)
        k, v = self._keys_for_step(k, v, attn.pattern)
        a = _linear(self._attend(q, k, v, attn.heads), attn.c_proj)
        h = _layer_norm(x + a, layer.ln_1)
        m = _linear(quick_gelu(_linear(h, layer.mlp.c_fc)), layer.mlp.c_proj)
        if layer.res_scale == 1.0:
            return x + a + m
        return x + layer.res_scale * (a + m)

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Input (N, 1, W) of the next position -> its final activations (N, 1, W)."""
        self.sample_t += 1
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x)
        return x

    @torch.no_grad()
    def sample(self, n_new: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the next ``n_new`` codes (N, n_new) of the window ``start`` began."""
        tm, cond, n = self.prior.prior, self.cond, self.n
        dtype = tm.x_emb.weight.dtype
        pos_emb = tm.pos_emb()
        out, prev = [], self.prev
        for _ in range(n_new):
            t = self.sample_t
            x = tm.start_embedding(n, cond.start).to(dtype) if t == 0 else tm.x_emb(prev).view(n, 1, -1)
            xc = None if cond.x_cond is None else cond.x_cond[:, t:t + 1]
            x = x + pos_emb[t:t + 1]
            if xc is not None:
                x = x + xc
            h = self.step(x)
            logits = tm.head(h, xc)[:, 0]
            prev = sample_logits(logits, temperature, top_k, top_p, generator)[:, None]
            out.append(prev)
        self.prev = prev
        return torch.cat(out, dim=1)
