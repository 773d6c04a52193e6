"""Triton cached decoding attention == the PyTorch reference, for every cache layout.

On a machine without CUDA the kernels run in Triton's interpreter (numpy on the CPU; bf16 is left
out there because the interpreter's bf16 ``tl.dot`` is wrong); with CUDA they run natively.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from fastjukebox.config import PriorConfig
from fastjukebox.kv_cache import KVCache
from kernels.decode_attention.ops import (MAX_SPLITS, MIN_SPLIT_KEYS, choose_num_splits, decode_attention,
                                          plan_for, supports, takes)
from kernels.decode_attention.reference import decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

N, H, C, NB = 2, 3, 12, 5          # awkward sizes: 3 heads, blocks of 12, 5 blocks (60 positions)
L, P, S = C * NB, 29, 41           # dense length, prime_len, encoder length
HEAD_DIM = {"block": 64, "prev_block": 150, "transpose": 480, "dense": 256, "prime": 150, "cross": 64}


def cache_shape(pattern: str, D: int, h: int = H) -> tuple[int, ...]:
    return {"block": (N, C, h, D), "prev_block": (N, 2, C, h, D), "transpose": (N, C, NB, h, D),
            "dense": (N, L, h, D), "prime": (N, P + 4, h, D), "cross": (N, S, h, D)}[pattern]


def rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def check(q, k, v, pattern, pos, **kw):
    ref = decode_attention_reference(q, k, v, pattern, int(pos), C, prime_len=P)
    tri = decode_attention(q, k, v, pattern, pos, C, prime_len=P, **kw)
    assert tri.shape == ref.shape and tri.dtype == ref.dtype
    assert torch.isfinite(tri).all()
    torch.testing.assert_close(tri.float(), ref.float(), **TOL[q.dtype])
    return tri


# (pos, T): block starts / ends / middles, single queries and three inside a block, and query
# tile (T >= 4: the tl.dot path, 16 queries per program, 12 of them real)
CASES = [(0, 1), (2 * C, 1), (3 * C - 1, 1), (C + 5, 3), (4 * C - 3, 3), (4 * C, 12)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(HEAD_DIM))
def test_layouts_match_reference(pattern, dtype, gen):
    D = HEAD_DIM[pattern]
    k, v = rand(gen, *cache_shape(pattern, D), dtype=dtype), rand(gen, *cache_shape(pattern, D), dtype=dtype)
    for i, (pos, T) in enumerate(CASES):
        q = rand(gen, N, T, H, D, dtype=dtype)
        check(q, k, v, pattern, pos)
        if i % 2:   # also cut the keys into several splits and combine them
            plan = plan_for(q, k, v, pattern, pos, C, P, num_splits=3)
            visible = {"dense": pos + T, "prime": min(pos + T, P), "cross": S}.get(pattern, 0)
            assert plan.splits > 1 or visible <= plan.block_n
            check(q, k, v, pattern, pos, num_splits=3)


@pytest.mark.parametrize("D", [64, 150, 256, 480])
def test_head_dims_with_splits(D, gen):
    L_ = 150                      # more keys than one tile of any head dim
    k, v = rand(gen, N, L_, 1, D), rand(gen, N, L_, 1, D)
    for pos, T in ((L_ - 1, 1), (11 * C + 2, 3), (9 * C + 4, 5)):
        q = rand(gen, N, T, 1, D)
        ref = decode_attention_reference(q, k, v, "dense", pos, C)
        for splits in (None, 3):
            assert splits is None or plan_for(q, k, v, "dense", pos, C, num_splits=splits).splits > 1
            tri = decode_attention(q, k, v, "dense", pos, C, num_splits=splits)
            torch.testing.assert_close(tri, ref, **TOL[torch.float32])


def test_transpose_long_columns(gen):
    """Columns of many blocks (short blocks), read in splits: every row of the column's block."""
    C_, nb, D = 3, 70, 480
    k, v = rand(gen, N, C_, nb, 1, D), rand(gen, N, C_, nb, 1, D)
    for pos, T in ((nb * C_ - 1, 1), (40 * C_, 3), (21 * C_ + 1, 2)):
        q = rand(gen, N, T, 1, D)
        ref = decode_attention_reference(q, k, v, "transpose", pos, C_)
        assert plan_for(q, k, v, "transpose", pos, C_, num_splits=3).splits > 1
        for splits in (None, 3):
            tri = decode_attention(q, k, v, "transpose", pos, C_, num_splits=splits)
            torch.testing.assert_close(tri, ref, **TOL[torch.float32])


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("pattern", ["transpose", "dense", "prime", "prev_block"])
def test_tensor_pos_read_on_device(pattern, pos_dtype, gen):
    """A position held in a tensor: splits sized by the cache capacity (most come back empty at
    early positions), and one tensor updated in place serves successive steps."""
    D = 200
    k, v = rand(gen, *cache_shape(pattern, D)), rand(gen, *cache_shape(pattern, D))
    pos_t = torch.zeros(1, dtype=pos_dtype, device=DEVICE)
    for pos, T in ((0, 1), (C + 2, 1), (3 * C + 11, 1), (4 * C + 1, 3)):
        pos_t.fill_(pos)
        q = rand(gen, N, T, H, D)
        check(q, k, v, pattern, pos_t.view(()) if T == 1 else pos_t, num_splits=4)
    if pattern == "dense":                 # longer than one tile of keys: really split
        assert plan_for(q, k, v, pattern, pos_t, C, P, num_splits=4).splits > 1


def test_kv_cache_layouts_end_to_end(gen):
    """Keys written by ``KVCache.write`` chunk by chunk, read back by the kernel for every layer
    pattern of a merged-lyric (1b-style) prior, like the sampler does."""
    cfg = PriorConfig(level=2, n_ctx=50, width=192, depth=48, heads=2, attn_order=12, blocks=6,
                      lyrics="merged", n_tokens=10, labels=False)
    C_, D = cfg.block_len, cfg.head_dim
    cache = KVCache(cfg, 3, torch.float32, DEVICE)
    layers = {p: cache.patterns.index(p) for p in ("block", "transpose", "prev_block", "prime", "dense")}
    chunks = [(0, 10), (10, 3), (13, 7), (20, 1), (21, 9), (30, 1), (31, 1), (32, 5), (37, 3), (40, 7), (47, 1), (48, 1)]
    for pos, T in chunks:
        for i in layers.values():
            cache.write(i, rand(gen, 3, T, 2, D), rand(gen, 3, T, 2, D), pos)
        if pos not in (21, 31, 40, 48):
            continue
        q = rand(gen, 3, T, 2, D)
        for p, i in layers.items():
            ref = decode_attention_reference(q, cache.k[i], cache.v[i], p, pos, C_, cfg.prime_len)
            tri = decode_attention(q, cache.k[i], cache.v[i], p, pos, C_, cfg.prime_len, num_splits=2)
            torch.testing.assert_close(tri, ref, **TOL[torch.float32])


def test_strided_queries_and_first_prev_block(gen):
    """Queries sliced out of a fused projection (non-contiguous), and a previous-block layer in
    block 0, which attends to nothing and gives exact zeros."""
    D = 40
    qkv = rand(gen, N, 2, H, 3 * D)
    q = qkv[..., D:2 * D]
    assert not q.is_contiguous()
    k, v = rand(gen, *cache_shape("dense", D)), rand(gen, *cache_shape("dense", D))
    check(q, k, v, "dense", 2 * C + 3, num_splits=2)
    k, v = rand(gen, *cache_shape("prev_block", D)), rand(gen, *cache_shape("prev_block", D))
    for pos in (0, C - 2):
        out = decode_attention(q, k, v, "prev_block", pos, C)
        assert torch.equal(out, torch.zeros_like(out))
    check(q, k, v, "prev_block", C)


def test_split_heuristic():
    # a long read by few programs is split; never below MIN_SPLIT_KEYS keys per split
    splits, split_len = choose_num_splits(8192, programs=16, sm_count=132, block_n=16)
    assert 1 < splits <= MAX_SPLITS and split_len % 16 == 0 and splits * split_len >= 8192
    assert split_len >= MIN_SPLIT_KEYS
    # short reads and already-parallel launches stay whole
    assert choose_num_splits(64, programs=16, sm_count=132, block_n=16)[0] == 1
    assert choose_num_splits(8192, programs=4096, sm_count=132, block_n=16)[0] == 1
    assert choose_num_splits(0, programs=1, sm_count=132, block_n=16)[0] == 1


def test_bad_inputs_are_named(gen):
    D = 16
    q = rand(gen, N, 1, H, D)
    k, v = rand(gen, *cache_shape("dense", D)), rand(gen, *cache_shape("dense", D))
    with pytest.raises(ValueError, match="summary"):
        decode_attention(q, k, v, "summary", 0, C)
    with pytest.raises(ValueError, match="cross a block boundary"):
        decode_attention(rand(gen, N, 3, H, D), k, v, "dense", C - 1, C)
    with pytest.raises(ValueError, match="past the dense cache"):
        decode_attention(q, k, v, "dense", L, C)
    with pytest.raises(ValueError, match="prime_len"):
        decode_attention(q, k, v, "prime", 0, C)
    with pytest.raises(ValueError, match="must have 5 dims"):
        decode_attention(q, k, v, "transpose", 0, C)
    with pytest.raises(ValueError, match="does not match"):
        decode_attention(rand(gen, N, 1, H, 2 * D), k, v, "dense", 0, C)
    with pytest.raises(ValueError, match="head dim 600"):
        decode_attention(rand(gen, N, 1, 1, 600), k, v, "dense", 0, C)
    with pytest.raises(ValueError, match="float64"):
        decode_attention(q.double(), k.double(), v.double(), "dense", 0, C)
    with pytest.raises(ValueError, match="int32/int64"):
        decode_attention(q, k, v, "dense", torch.tensor([1.0], device=DEVICE), C)
    with pytest.raises(ValueError, match="v_cache is torch.float16"):
        decode_attention(q, k, v.half(), "dense", 0, C)


def test_supports():
    q = torch.randn(1, 1, 2, 64)
    assert not supports(q)                       # CPU tensors go to the reference under auto
    assert takes(torch.float32, 128) and not takes(torch.float32, 256)     # wider fp32 tiles spill
    assert takes(torch.bfloat16, 480) and not takes(torch.float16, 600) and not takes(torch.float64, 64)
    if DEVICE == "cuda":
        assert supports(q.cuda().half()) and not supports(torch.randn(1, 1, 1, 600, device="cuda"))
