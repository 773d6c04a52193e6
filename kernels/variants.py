"""Every Triton kernel variant the launchers would compile for the released presets.

A variant is one compiled binary: a kernel, the dtype of its tensor arguments, its ``tl.constexpr``
values and its launch options (``num_warps``, ``num_stages``). The values come from the launchers'
own tile-choosing functions (``factored_attention.ops._tiles``, ``decode_attention.ops.plan_launch``,
the sampling launcher's block size), evaluated at the shapes each released model runs:

- factored attention (training and full-window passes): the transformer's sequence, its head dim,
  block length and layer patterns, causal and not; forward, backward preprocess, dq, dk/dv;
- cached decoding: one-query steps (eager with a host position, and the CUDA-graph step with the
  position in device memory) and priming chunks, at batch 1 and 16, early and late in the window,
  with key splits planned for the target's multiprocessor count; the split-combine kernel;
- fp32 only where ``auto`` sends fp32 to the kernels (head dims up to 128: the lyric encoder);
- sampling: the models' vocabulary with temperature only, top-k, top-p and both.

Runtime-only arguments (lengths, strides, positions) do not change the binary; ahead-of-time
compilation sees them without Triton's divisibility hints, the conservative case.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decode_attention import kernel as decode_kernels
from .decode_attention.ops import _visible_keys, combine_tiles, num_warps_for, plan_launch
from .decode_attention.ops import takes as decode_takes
from .factored_attention import kernel as attn_kernels
from .factored_attention.ops import _PATTERN_IDS, _precision, _tiles, preprocess_tile, takes
from .sampling import kernel as sampling_kernels
from .sampling.ops import MAX_VOCAB, block_v
from .sampling.ops import num_warps_for as sampling_warps

__all__ = ["Variant", "released_variants", "representative_subset", "MODELS", "DTYPES", "SM_COUNTS"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SM_COUNTS = {90: 132, 80: 108}          # H100 SXM and A100: the key-split planner's input
PRIMING_CHUNK = 32                      # the default chunk size (fastjukebox.settings.DEFAULT_CHUNK_SIZE)
BATCHES = (1, 16)
BACKWARD_KERNELS = ("attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel")


@dataclass(frozen=True)
class Model:
    """The attention shapes of one released transformer."""
    name: str
    seq_len: int
    head_dim: int
    heads: int
    block_len: int
    patterns: tuple[str, ...]
    prime_len: int | None
    encoder_len: int
    vocab: int
    decoded: bool                       # sampled token by token (the lyric encoder runs once)


# The released transformers' attention shapes (``fastjukebox.config.PRESETS``, patterns from
# ``fastjukebox.attention.layer_patterns``), written out so that the kernels stand alone;
# ``tests/test_compile_check.py`` checks the table against the presets.
MODELS = (
    Model("upsampler_level_0", 8192, 480, 1, 64, ("block", "prev_block", "transpose"), None, 0, 2048, True),
    Model("prior_1b_lyrics", 6528, 256, 2, 102, ("block", "dense", "prev_block", "prime", "transpose"), 448, 0,
          2127, True),
    Model("prior_5b", 8192, 150, 8, 64, ("block", "prev_block", "transpose"), None, 0, 2048, True),
    Model("prior_5b_lyrics", 8192, 150, 8, 64, ("block", "cross", "prev_block", "transpose"), None, 512, 2048, True),
    # 5b_lyrics: the separate lyric encoder feeding the cross layers, run once per sample
    Model("prior_5b_lyrics.lyric_encoder", 512, 80, 4, 16, ("block", "prev_block", "transpose"), None, 0, 2048,
          False),
)


@dataclass
class Variant:
    kernel: str
    dtype: str                          # dtype of the tensor arguments that are not fp32 statistics
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    uses: list[str] = field(default_factory=list, compare=False)

    @property
    def key(self) -> tuple:
        return (self.kernel, self.dtype, tuple(sorted(self.constexprs.items())), self.num_warps, self.num_stages)

    @property
    def is_backward(self) -> bool:
        return self.kernel in BACKWARD_KERNELS

    def describe(self) -> str:
        c = self.constexprs
        parts = [f"{k}={v}" for k, v in c.items() if k not in ("H",)]
        return f"{self.kernel}[{self.dtype}; {', '.join(parts)}; w{self.num_warps} s{self.num_stages}]"

    def signature(self) -> dict:
        """Triton's ahead-of-time signature: one type per argument, ``constexpr`` for the constants."""
        fn = KERNELS[self.kernel]
        types = _ARG_TYPES[self.kernel](self)
        return {a: ("constexpr" if a in self.constexprs else types[a]) for a in fn.arg_names}


KERNELS = {
    "attn_fwd_kernel": attn_kernels.attn_fwd_kernel,
    "attn_bwd_preprocess_kernel": attn_kernels.attn_bwd_preprocess_kernel,
    "attn_bwd_dq_kernel": attn_kernels.attn_bwd_dq_kernel,
    "attn_bwd_dkdv_kernel": attn_kernels.attn_bwd_dkdv_kernel,
    "decode_attention_kernel": decode_kernels.decode_attention_kernel,
    "combine_splits_kernel": decode_kernels.combine_splits_kernel,
    "sample_logits_kernel": sampling_kernels.sample_logits_kernel,
}


def _types(names_ptr: dict, v: Variant, floats: tuple = ()) -> dict:
    """Pointers as listed (``None``: the variant's dtype), floats as fp32, everything else i32."""
    fn = KERNELS[v.kernel]
    out = {}
    for a in fn.arg_names:
        if a in names_ptr:
            out[a] = "*" + (names_ptr[a] or v.dtype)
        elif a in floats:
            out[a] = "fp32"
        else:
            out[a] = "i32"
    return out


def _attn_types(v: Variant) -> dict:
    ptrs = {n: None for n in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}
    ptrs.update(lse="fp32", delta="fp32")
    return _types(ptrs, v, floats=("qk_scale", "scale"))


def _decode_types(v: Variant) -> dict:
    part = "fp32" if v.constexprs.get("SPLIT") else None
    ptrs = dict(q=None, k=None, v=None, o=None, m_part=part, l_part=part, acc_part=part,
                pos_ptr="i64" if v.constexprs.get("POS_FROM_PTR") else None)
    return _types(ptrs, v, floats=("scale_log2",))


def _combine_types(v: Variant) -> dict:
    return _types(dict(o=None, m_part="fp32", l_part="fp32", acc_part="fp32"), v)


def _sampling_types(v: Variant) -> dict:
    return _types(dict(logits=None, noise="fp32", out="i64"), v, floats=("temperature", "top_p"))


_ARG_TYPES = {
    "attn_fwd_kernel": _attn_types, "attn_bwd_preprocess_kernel": _attn_types,
    "attn_bwd_dq_kernel": _attn_types, "attn_bwd_dkdv_kernel": _attn_types,
    "decode_attention_kernel": _decode_types, "combine_splits_kernel": _combine_types,
    "sample_logits_kernel": _sampling_types,
}


def _n_keys(m: Model, pattern: str) -> int:
    return {"prime": m.prime_len or 0, "cross": m.encoder_len}.get(pattern, m.seq_len)


def _factored(m: Model, dtype: str):
    """(variant, use) pairs of the forward and backward passes of every pattern of ``m``."""
    torch_dtype = DTYPES[dtype]
    if not takes(torch_dtype, m.head_dim):
        return
    item = torch_dtype.itemsize
    for pattern in m.patterns:
        pid = _PATTERN_IDS[pattern]
        n_keys = _n_keys(m, pattern)
        fixed_causal = pattern in ("prev_block", "cross")
        for causal in ((False,) if fixed_causal else (True, False)):
            use = f"{m.name} {pattern}{' causal' if causal else ''}"
            common = dict(H=m.heads, D=m.head_dim, CAUSAL=causal, PATTERN=pid,
                          INPUT_PRECISION=_precision(torch_dtype))
            for kernel, backward in (("attn_fwd_kernel", False), ("attn_bwd_dq_kernel", True),
                                     ("attn_bwd_dkdv_kernel", True)):
                cfg = _tiles(pid, m.head_dim, item, m.seq_len, n_keys, m.block_len, backward=backward)
                opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                yield Variant(kernel, dtype, {**common, **cfg}, **opts), use
            cfg = _tiles(pid, m.head_dim, item, m.seq_len, n_keys, m.block_len, backward=True)
            pre = dict(H=m.heads, D=m.head_dim, BT=preprocess_tile(m.seq_len, cfg["BLOCK_D"]), BLOCK_D=cfg["BLOCK_D"])
            yield Variant("attn_bwd_preprocess_kernel", dtype, pre), use


def _decode_capacity(m: Model, pattern: str) -> int:
    return {"block": m.block_len, "prev_block": m.block_len, "transpose": m.seq_len // m.block_len,
            "dense": m.seq_len, "prime": m.prime_len or 0, "cross": m.encoder_len}[pattern]


def _decode(m: Model, dtype: str, sm_count: int):
    """(variant, use) pairs of cached decoding: steps and priming chunks, batch 1 and 16."""
    if not decode_takes(DTYPES[dtype], m.head_dim):
        return
    for pattern in m.patterns:
        cap = _decode_capacity(m, pattern)
        for batch in BATCHES:
            for T in (1, min(PRIMING_CHUNK, m.block_len)):
                first, late = m.block_len // 2, m.seq_len - m.block_len
                reads = [(False, _visible_keys(pattern, pos, T, m.block_len, cap)) for pos in (first, late)]
                if T == 1:
                    reads.append((True, cap))          # CUDA-graph step: position in device memory
                for from_ptr, n_keys in reads:
                    plan = plan_launch(batch, T, m.heads, m.head_dim, pattern, n_keys, torch.device("cpu"),
                                       sm_count=sm_count)
                    kind = "graph step" if from_ptr else ("step" if T == 1 else f"priming {T}")
                    use = f"{m.name} {pattern} {kind} batch {batch}"
                    yield Variant("decode_attention_kernel", dtype, dict(
                        LAYOUT=decode_kernels.LAYOUTS[pattern], POS_FROM_PTR=from_ptr, SPLIT=plan.splits > 1,
                        IEEE=dtype == "fp32", BLOCK_T=plan.block_t, BLOCK_N=plan.block_n,
                        BLOCK_D=plan.block_d), num_warps=num_warps_for(plan)), use
                    if plan.splits > 1:
                        block_s, block_dc = combine_tiles(plan.splits, plan.block_d)
                        yield Variant("combine_splits_kernel", dtype, dict(BLOCK_S=block_s, BLOCK_D=block_dc)), use


def _sampling(m: Model, dtype: str):
    tile = block_v(min(m.vocab, MAX_VOCAB))
    for top_k in (False, True):
        for top_p in (False, True):
            use = f"{m.name} sampling{' top-k' if top_k else ''}{' top-p' if top_p else ''}"
            yield Variant("sample_logits_kernel", dtype, dict(
                RECIPROCAL=True, USE_TOP_K=top_k, USE_TOP_P=top_p, BLOCK_V=tile),
                num_warps=sampling_warps(tile)), use


def released_variants(arch: int = 90, models: tuple[Model, ...] = MODELS) -> list[Variant]:
    """The distinct variants for ``arch`` (the split planner sees its multiprocessor count), each
    with the uses (model, pattern, path) that launch it, in a stable order."""
    if arch not in SM_COUNTS:
        raise ValueError(f"no multiprocessor count known for sm_{arch}; expected one of {sorted(SM_COUNTS)}")
    found: dict[tuple, Variant] = {}
    for dtype in DTYPES:
        for m in models:
            pairs = list(_factored(m, dtype))
            if m.decoded:
                pairs += list(_decode(m, dtype, SM_COUNTS[arch])) + list(_sampling(m, dtype))
            for v, use in pairs:
                kept = found.setdefault(v.key, v)
                if use not in kept.uses:
                    kept.uses.append(use)
    return list(found.values())


def _features(v: Variant) -> set:
    """What a representative subset must cover: per kernel, each dtype, pattern (or layout) and
    head dim (``BLOCK_D``), plus the boolean switches of the decode and sampling kernels."""
    c = v.constexprs
    feats = {(v.kernel, "dtype", v.dtype)}
    for name in ("PATTERN", "LAYOUT", "BLOCK_D", "CAUSAL", "SPLIT", "POS_FROM_PTR", "BLOCK_T", "USE_TOP_K",
                 "USE_TOP_P", "D"):
        if name in c:
            feats.add((v.kernel, name, c[name]))
    return feats


def representative_subset(variants: list[Variant]) -> list[Variant]:
    """A small subset covering every feature of ``_features`` (greedy set cover, ties broken by the
    largest tiles first: they are the likeliest to exceed a limit)."""
    def size(v: Variant) -> int:
        c = v.constexprs
        return c.get("BT", c.get("BLOCK_T", 1)) * c.get("BS", c.get("BLOCK_N", 1)) * c.get("BLOCK_D", 1) \
            * (1 if v.dtype != "fp32" else 2) * v.num_stages

    todo = set().union(*(_features(v) for v in variants)) if variants else set()
    pool = sorted(variants, key=size, reverse=True)
    chosen = []
    while todo:
        best = max(pool, key=lambda v: len(_features(v) & todo))
        chosen.append(best)
        todo -= _features(best)
    return chosen
