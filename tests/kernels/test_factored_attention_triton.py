"""Triton factored attention (kernels/factored_attention/ops.py) against the PyTorch reference.

Runs on CUDA when available, else under Triton's CPU interpreter (``TRITON_INTERPRET=1`` is set
here before the kernels are imported). bf16 is checked on CUDA only: the interpreter's bf16
``tl.dot`` is wrong.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels.factored_attention.kernel as kernel_mod  # noqa: E402
import kernels.factored_attention.ops as ops  # noqa: E402
from kernels.factored_attention.reference import factored_attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and type(kernel_mod.attn_fwd_kernel).__name__ != "InterpretedFunction":
    # Triton decides at import time (its own jit helpers included); nothing can switch it afterwards.
    pytest.skip("no CUDA, and Triton was imported before TRITON_INTERPRET=1 was set (or with it set to 0): "
                "the kernels cannot run here", allow_module_level=True)

factored_attention = ops.factored_attention

# pattern -> (block_len needed, prime_len as a function of T)
PATTERN_ARGS = {
    "dense": (False, None),
    "block": (True, None),
    "transpose": (True, None),
    "prev_block": (True, None),
    "prime": (False, lambda T: T // 3 + 1),
    "cross": (False, None),
}


def rel_rms(ref: torch.Tensor, tri: torch.Tensor) -> float:
    ref, tri = ref.double(), tri.double()
    return ((ref - tri).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float) -> None:
    assert tri.shape == ref.shape, f"{name}: shape {tuple(tri.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(tri).all(), f"{name}: non-finite values"
    err = rel_rms(ref, tri)
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e}"


def make_inputs(B, T, H, D, dtype=torch.float32, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, S, H, D, generator=g)
    v = torch.randn(B, S, H, D, generator=g)
    do = torch.randn(B, T, H, D, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def call_args(pattern, T, C, causal):
    needs_c, prime = PATTERN_ARGS[pattern]
    return dict(block_len=C if needs_c else None, causal=causal, prime_len=prime(T) if prime else None)


def check_fwd_bwd(pattern, B, T, H, D, C, causal, dtype=torch.float32, ratio=1e-4, grad_ratio=1e-4, S=None):
    q, k, v, do = make_inputs(B, T, H, D, dtype, S=S if pattern == "cross" else None)
    kw = call_args(pattern, T, C, causal)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = factored_attention_reference(*leaves, pattern, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, do)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    tri = factored_attention(*leaves, pattern, **kw)
    assert tri.dtype == q.dtype
    assert_close("o", ref, tri, ratio)
    if grad_ratio is None:
        return
    tri_grads = torch.autograd.grad(tri, leaves, do)
    for name, r, t in zip(("dq", "dk", "dv"), ref_grads, tri_grads):
        assert t.dtype == q.dtype
        assert_close(name, r, t, grad_ratio)


@pytest.mark.parametrize("T,C", [(37, 8), (64, 16)], ids=["T37-C8", "T64-C16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("pattern", list(PATTERN_ARGS))
def test_fwd_bwd_fp32(pattern, causal, T, C):
    check_fwd_bwd(pattern, B=2, T=T, H=1, D=64, C=C, causal=causal, S=29)


@pytest.mark.parametrize("pattern,causal", [("dense", True), ("block", True), ("transpose", False),
                                            ("prev_block", True), ("prime", False)],
                         ids=["dense-causal", "block-causal", "transpose-bidir", "prev_block", "prime-bidir"])
@pytest.mark.parametrize("D", [150, 256, 480], ids=lambda d: f"D{d}")
def test_head_dims(pattern, causal, D):
    check_fwd_bwd(pattern, B=1, T=21, H=2, D=D, C=8, causal=causal)


@pytest.mark.parametrize("BT,BS", [(16, 32), (32, 16)], ids=["BT16-BS32", "BT32-BS16"])
@pytest.mark.parametrize("pattern,C,causal", [
    ("dense", None, True), ("dense", None, False), ("block", 32, True), ("block", 12, False),
    ("transpose", 4, True), ("transpose", 4, False), ("prev_block", 32, True), ("prime", None, True),
], ids=["dense-causal", "dense-bidir", "block-C32-causal", "block-C12-bidir", "transpose-C4-causal",
        "transpose-C4-bidir", "prev_block-C32", "prime-causal"])
def test_many_tiles(monkeypatch, pattern, C, causal, BT, BS):
    """Small forced tiles so every pattern runs several query and key tiles (online softmax across
    tiles, tiles straddling blocks, several row tiles per transpose column)."""
    tiles = ops._tiles

    def small_tiles(*args, **kwargs):
        return {**tiles(*args, **kwargs), "BT": BT, "BS": BS}

    monkeypatch.setattr(ops, "_tiles", small_tiles)
    check_fwd_bwd(pattern, B=1, T=70, H=1, D=32, C=C, causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("pattern", list(PATTERN_ARGS))
def test_fp16_forward(pattern, causal):
    check_fwd_bwd(pattern, B=2, T=37, H=2, D=64, C=8, causal=causal, dtype=torch.float16, ratio=2e-3,
                  grad_ratio=None, S=23)


@pytest.mark.parametrize("pattern", ["block", "transpose"])
def test_fp16_backward(pattern):
    check_fwd_bwd(pattern, B=1, T=37, H=2, D=64, C=8, causal=True, dtype=torch.float16, ratio=2e-3,
                  grad_ratio=1e-2)


@pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong in the Triton interpreter")
@pytest.mark.parametrize("pattern", list(PATTERN_ARGS))
def test_bf16(pattern):
    check_fwd_bwd(pattern, B=2, T=77, H=2, D=64, C=16, causal=True, dtype=torch.bfloat16, ratio=1e-2,
                  grad_ratio=3e-2, S=41)


@pytest.mark.parametrize("pattern", ["block", "transpose", "cross"])
def test_strided_views(pattern):
    """Inputs in three different layouts are read in place: q a view of a fused projection (time
    stride 2 * H * D), k contiguous, v a [B, H, S, D] tensor seen as [B, S, H, D]."""
    B, T, H, D, C = 2, 37, 2, 40, 8
    g = torch.Generator().manual_seed(1)
    qx = torch.randn(B, T, H, 2 * D, generator=g).to(DEVICE)
    k = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    vt = torch.randn(B, H, T, D, generator=g).to(DEVICE)
    do = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    results = []
    for fn in (factored_attention_reference, factored_attention):
        leaves = [x.clone().requires_grad_() for x in (qx, k, vt)]
        q, v = leaves[0][..., :D], leaves[2].transpose(1, 2)
        assert not q.is_contiguous() and not v.is_contiguous() and q.stride() != v.stride()
        o = fn(q, leaves[1], v, pattern, block_len=C)
        results.append((o, *torch.autograd.grad(o, leaves, do)))
    for name, r, t in zip(("o", "dq", "dk", "dv"), *results):
        assert_close(name, r, t, 1e-4)


@pytest.mark.parametrize("pattern,C", [("dense", 1), ("prev_block", 8), ("transpose", 8)])
def test_lse(pattern, C):
    """The stored log-sum-exp equals logsumexp of the visible scaled scores; -inf where none is visible."""
    B, T, H, D = 1, 29, 2, 24
    q, k, v, _ = make_inputs(B, T, H, D)
    pid = ops._PATTERN_IDS[pattern]
    o, lse = ops.attn_fwd(q, k, v, pid, C, pattern != "prev_block", T, 0.3)
    i = torch.arange(T, device=DEVICE)[:, None]
    j = torch.arange(T, device=DEVICE)[None, :]
    allowed = {"dense": j <= i, "prev_block": j // C == i // C - 1, "transpose": (j % C == i % C) & (j <= i)}[pattern]
    s = torch.einsum("bihd,bjhd->bhij", q, k) * 0.3
    ref = s.masked_fill(~allowed, float("-inf")).logsumexp(-1)        # [B, H, T]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(lse[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_unseen_keys_never_read():
    """Keys no query may see (past prime_len; prev_block's last block) are NaN: the outputs stay finite,
    their gradients are exactly zero and prev_block's first block outputs exactly zero."""
    B, T, H, D, C, P = 1, 45, 2, 32, 16, 11
    q, k, v, do = make_inputs(B, T, H, D)
    for pattern, unseen in (("prime", slice(P, T)), ("prev_block", slice((T - 1) // C * C, T))):
        kp, vp = k.clone(), v.clone()
        kp[:, unseen] = float("nan")
        vp[:, unseen] = float("nan")
        leaves = [x.requires_grad_() for x in (q.clone(), kp, vp)]
        tri = factored_attention(*leaves, pattern, block_len=C, prime_len=P)
        ref = factored_attention_reference(q, k, v, pattern, block_len=C, prime_len=P)
        assert_close(f"{pattern} o", ref, tri, 1e-4)
        dq, dk, dv = torch.autograd.grad(tri, leaves, do)
        assert torch.isfinite(dq).all()
        assert (dk[:, unseen] == 0).all() and (dv[:, unseen] == 0).all()
        if pattern == "prev_block":
            assert (tri[:, :C] == 0).all() and (dq[:, :C] == 0).all()


@pytest.mark.parametrize("case", ["prime0", "prime-past-end", "T1-dense", "T-lt-C-block", "T-lt-C-transpose",
                                  "T-lt-C-prev_block", "S-gt-T-dense-causal"])
def test_edges(case):
    pattern, T, C, prime, S = {
        "prime0": ("prime", 19, None, 0, None),
        "prime-past-end": ("prime", 19, None, 50, None),
        "T1-dense": ("dense", 1, None, None, None),
        "T-lt-C-block": ("block", 5, 16, None, None),
        "T-lt-C-transpose": ("transpose", 5, 16, None, None),
        "T-lt-C-prev_block": ("prev_block", 5, 16, None, None),
        "S-gt-T-dense-causal": ("dense", 13, None, None, 31),
    }[case]
    q, k, v, do = make_inputs(2, T, 2, 24, S=S)
    kw = dict(block_len=C, prime_len=prime)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = factored_attention_reference(*leaves, pattern, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, do)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    tri = factored_attention(*leaves, pattern, **kw)
    tri_grads = torch.autograd.grad(tri, leaves, do)
    for name, r, t in zip(("o", "dq", "dk", "dv"), (ref, *ref_grads), (tri, *tri_grads)):
        if case in ("prime0", "T-lt-C-prev_block"):  # no key is visible: structural zeros
            assert (r == 0).all() and (t == 0).all(), f"{name}: expected exact zeros"
        elif r.abs().max() == 0:  # e.g. dq with a single key: zero up to rounding
            assert t.abs().max() < 1e-5, f"{name}: expected zeros"
        else:
            assert_close(name, r, t, 1e-4)


@pytest.mark.parametrize("case", ["summary", "float64"])
def test_reference_fallbacks(case):
    dtype = torch.float64 if case == "float64" else torch.float32
    pattern = "summary" if case == "summary" else "block"
    q, k, v, do = make_inputs(1, 32, 2, 16, dtype)
    ref = factored_attention_reference(q, k, v, pattern, block_len=8)
    tri = factored_attention(q, k, v, pattern, block_len=8)
    assert torch.equal(ref, tri)


def test_scale_argument():
    q, k, v, _ = make_inputs(1, 33, 2, 48)
    ref = factored_attention_reference(q, k, v, "block", block_len=8, scale=0.05)
    tri = factored_attention(q, k, v, "block", block_len=8, scale=0.05)
    assert_close("o", ref, tri, 1e-4)


@pytest.mark.parametrize("case,match", [
    ("pattern", "unknown attention pattern 'diagonal'"),
    ("block_len", "block attention needs a positive block_len"),
    ("prime_len", "prime attention needs prime_len"),
    ("head_dim", "head dim 520 exceeds"),
    ("rank", r"q must be \[B, T, H, D\]"),
    ("kv_shape", "k and v shapes differ"),
    ("heads", "do not match q"),
    ("dtype", "dtypes differ"),
    ("int", "unsupported dtype torch.int32"),
    ("length", "transpose attention needs as many keys as queries"),
])
def test_bad_input(case, match):
    q, k, v, _ = make_inputs(1, 12, 2, 16)
    args, kw = [q, k, v, "block"], dict(block_len=4)
    if case == "pattern":
        args[3] = "diagonal"
    elif case == "block_len":
        kw = {}
    elif case == "prime_len":
        args[3], kw = "prime", {}
    elif case == "head_dim":
        args[:3] = make_inputs(1, 12, 2, 520)[:3]
    elif case == "rank":
        args[0] = q[0]
    elif case == "kv_shape":
        args[2] = v[:, :6]
    elif case == "heads":
        args[1], args[2] = k[:, :, :1], v[:, :, :1]
    elif case == "dtype":
        args[1] = k.half()
    elif case == "int":
        args[:3] = [x.to(torch.int32) for x in (q, k, v)]
    elif case == "length":
        args[1], args[2], args[3] = k[:, :6], v[:, :6], "transpose"
    with pytest.raises(ValueError, match=match):
        factored_attention(*args, **kw)


def test_supports():
    x = torch.randn(1, 4, 2, 16)
    assert not ops.supports(x)
    # fp32 goes to the kernels up to head dim 128 (wider fp32 tiles spill), 16-bit up to 512
    assert ops.takes(torch.float32, 128) and not ops.takes(torch.float32, 150)
    assert ops.takes(torch.bfloat16, 480) and ops.takes(torch.float16, 512) and not ops.takes(torch.bfloat16, 513)
    assert not ops.takes(torch.float64, 64)
    if CUDA:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert ops.supports(x.to("cuda", dtype))
        assert not ops.supports(x.to("cuda", torch.float64))
        assert not ops.supports(torch.randn(1, 4, 2, 520, device="cuda"))
