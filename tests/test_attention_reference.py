"""The factored-attention reference against a brute-force mask over every (query, key) pair."""
from __future__ import annotations

import math

import pytest
import torch

import fastjukebox.attention as attention
from kernels.factored_attention.reference import PATTERNS, factored_attention_reference as ref_attn

SELF_PATTERNS = ("dense", "block", "transpose", "prev_block", "summary", "prime")


def allowed_mask(pattern: str, T: int, C: int | None, causal: bool, prime_len: int | None) -> torch.Tensor:
    """[T, T] bool: query i may read key j (the reference module's table, entry by entry).

    ``summary`` is not expressed here (its keys are not positions of the sequence)."""
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if pattern == "dense":
                ok = True
            elif pattern == "block":
                ok = j // C == i // C
            elif pattern == "transpose":
                ok = j % C == i % C
            elif pattern == "prev_block":
                ok = j // C == i // C - 1
            elif pattern == "prime":
                ok = j < prime_len
            else:
                raise AssertionError(pattern)
            if causal and pattern != "prev_block":
                ok = ok and j <= i
            m[i, j] = ok
    return m


def brute_force(q, k, v, pattern, block_len=None, causal=True, prime_len=None):
    """Attention from an explicit per-pair mask, in float64; [B, T, H, D] in and out."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]
    if pattern == "cross":
        s = qh @ kh.transpose(-1, -2) * scale
        return (s.softmax(-1) @ vh).permute(0, 2, 1, 3)
    if pattern == "summary":
        C = block_len
        nb = T // C
        ends = [b * C + C - 1 for b in range(nb - 1)]
        # key 0 is a zero key with a zero value; then the last position of every block but the last
        ks = torch.cat([torch.zeros_like(kh[:, :, :1]), kh[:, :, ends]], dim=2)
        vs = torch.cat([torch.zeros_like(vh[:, :, :1]), vh[:, :, ends]], dim=2)
        m = torch.ones(T, nb, dtype=torch.bool)
        if causal:
            for i in range(T):
                for e_idx, e in enumerate(ends):
                    m[i, e_idx + 1] = e <= i
        s = (qh @ ks.transpose(-1, -2) * scale).masked_fill(~m, float("-inf"))
        return (s.softmax(-1) @ vs).permute(0, 2, 1, 3)
    m = allowed_mask(pattern, T, block_len, causal, prime_len)
    s = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~m, float("-inf"))
    empty = ~m.any(-1)  # rows that see nothing: prev_block in block 0 reads zero keys/values
    p = s.masked_fill(empty[:, None], 0.0).softmax(-1).masked_fill(empty[:, None], 0.0)
    return (p @ vh).permute(0, 2, 1, 3)


def rand_qkv(gen, B, T, H, D, dtype, S=None):
    S = T if S is None else S
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _kwargs(pattern, C, T):
    return dict(block_len=C, prime_len=(13 if T > 13 else T - 1) if pattern == "prime" else None)


TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
CASES = [(p, T) for p in SELF_PATTERNS for T in ((40,) if p == "summary" else (37, 40, 5))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("pattern, T", CASES, ids=[f"{p}-T{T}" for p, T in CASES])
def test_matches_brute_force(gen, pattern, T, causal, dtype):
    C = 8
    q, k, v = rand_qkv(gen, 2, T, 3, 16, dtype)
    kw = _kwargs(pattern, C, T)
    out = ref_attn(q, k, v, pattern, causal=causal, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    expect = brute_force(q, k, v, pattern, causal=causal, **kw)
    assert (out.double() - expect).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("S", [1, 11, 16])
def test_cross_matches_brute_force(gen, S, dtype):
    q, k, v = rand_qkv(gen, 2, 37, 2, 16, dtype, S=S)
    for causal in (True, False):  # never masked
        out = ref_attn(q, k, v, "cross", causal=causal)
        assert out.shape == q.shape
        assert (out.double() - brute_force(q, k, v, "cross")).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("D", [64, 150, 256, 480])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_head_dims(gen, pattern, D, dtype):
    T = 24 if pattern == "summary" else 21
    C = 6 if pattern == "summary" else 4
    q, k, v = rand_qkv(gen, 1, T, 2, D, dtype, S=9 if pattern == "cross" else None)
    kw = _kwargs(pattern, C, T)
    out = ref_attn(q, k, v, pattern, **kw)
    expect = brute_force(q, k, v, pattern, **kw)
    assert (out.double() - expect).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("T", [37, 40])
def test_prev_block_first_block_is_exactly_zero(gen, T, causal):
    C = 8
    q, k, v = rand_qkv(gen, 2, T, 2, 16, torch.float32)
    out = ref_attn(q, k, v, "prev_block", block_len=C, causal=causal)
    assert torch.equal(out[:, :C], torch.zeros_like(out[:, :C]))
    assert out[:, C:].abs().min().item() > 0  # later blocks read the previous block


def test_summary_first_row_reads_only_the_zero_key(gen):
    q, k, v = rand_qkv(gen, 1, 16, 1, 8, torch.float64)
    out = ref_attn(q, k, v, "summary", block_len=4)
    # before the first block ends only the zero key is visible: output 0
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert out[:, 3:].abs().max().item() > 0


@pytest.mark.parametrize("pattern", ["dense", "block", "transpose", "summary", "prime"])
def test_causal_outputs_ignore_the_future(gen, pattern):
    """Changing keys/values from position t on changes no output before t."""
    T = 40 if pattern == "summary" else 37
    t = 9 if pattern == "prime" else 21  # prime: keys past prime_len=13 are never read
    q, k, v = rand_qkv(gen, 1, T, 2, 16, torch.float64)
    k2, v2 = k.clone(), v.clone()
    k2[:, t:] += 1.0
    v2[:, t:] -= 2.0
    kw = _kwargs(pattern, 8, T)
    a = ref_attn(q, k, v, pattern, **kw)
    b = ref_attn(q, k2, v2, pattern, **kw)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.equal(a[:, t:], b[:, t:])


GRAD_CASES = [("block", 37, True), ("transpose", 37, True), ("prev_block", 37, True), ("summary", 40, True),
              ("transpose", 37, False), ("prime", 37, True), ("dense", 37, True)]


@pytest.mark.parametrize("pattern, T, causal", GRAD_CASES, ids=[f"{p}-{c}" for p, _, c in GRAD_CASES])
@torch.enable_grad()  # another test module may switch autograd off at import
def test_gradients_match_brute_force(gen, pattern, T, causal):
    q, k, v = (x.requires_grad_() for x in rand_qkv(gen, 2, T, 2, 16, torch.float64))
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    kw = _kwargs(pattern, 8, T)
    g_ref = torch.autograd.grad(ref_attn(q, k, v, pattern, causal=causal, **kw), (q, k, v), grad_out)
    g_bf = torch.autograd.grad(brute_force(q, k, v, pattern, causal=causal, **kw), (q, k, v), grad_out)
    for name, a, b in zip("qkv", g_ref, g_bf):
        assert b.abs().max().item() > 0, name
        assert (a - b).abs().max().item() <= 1e-12, name


@torch.enable_grad()
def test_cross_gradients(gen):
    q, k, v = (x.requires_grad_() for x in rand_qkv(gen, 2, 13, 2, 16, torch.float64, S=7))
    grad_out = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    g_ref = torch.autograd.grad(ref_attn(q, k, v, "cross"), (q, k, v), grad_out)
    g_bf = torch.autograd.grad(brute_force(q, k, v, "cross"), (q, k, v), grad_out)
    for a, b in zip(g_ref, g_bf):
        assert (a - b).abs().max().item() <= 1e-12


def test_explicit_scale(gen):
    q, k, v = rand_qkv(gen, 1, 16, 1, 8, torch.float64)
    a = ref_attn(q, k, v, "dense", scale=0.5)
    b = ref_attn(q * (0.5 * math.sqrt(8)), k, v, "dense")
    assert (a - b).abs().max().item() <= 1e-12


# --- bad arguments --------------------------------------------------------------------------

def test_unknown_pattern(gen):
    q, k, v = rand_qkv(gen, 1, 8, 1, 4, torch.float32)
    with pytest.raises(ValueError, match=r"unknown attention pattern 'strided'"):
        ref_attn(q, k, v, "strided", block_len=4)


@pytest.mark.parametrize("pattern", ["block", "transpose", "prev_block", "summary"])
def test_block_patterns_need_block_len(gen, pattern):
    q, k, v = rand_qkv(gen, 1, 8, 1, 4, torch.float32)
    with pytest.raises(ValueError, match=rf"{pattern} attention needs block_len"):
        ref_attn(q, k, v, pattern)


def test_prime_needs_prime_len(gen):
    q, k, v = rand_qkv(gen, 1, 8, 1, 4, torch.float32)
    with pytest.raises(ValueError, match=r"prime attention needs prime_len"):
        ref_attn(q, k, v, "prime")


def test_summary_needs_whole_blocks(gen):
    q, k, v = rand_qkv(gen, 1, 37, 1, 4, torch.float32)
    with pytest.raises(ValueError, match=r"summary attention needs a whole number of blocks"):
        ref_attn(q, k, v, "summary", block_len=8)


# --- dispatch -------------------------------------------------------------------------------

def test_attend_uses_reference_on_cpu(gen, monkeypatch):
    monkeypatch.delenv("FASTJUKEBOX_ATTENTION", raising=False)
    q, k, v = rand_qkv(gen, 2, 37, 2, 16, torch.float32)
    assert attention._choose(q) is ref_attn
    for pattern in ("dense", "block", "transpose", "prev_block", "prime"):
        kw = _kwargs(pattern, 8, 37)
        assert torch.equal(attention.attend(q, k, v, pattern, **kw), ref_attn(q, k, v, pattern, **kw))


def test_attend_forced_reference(gen, monkeypatch):
    monkeypatch.setenv("FASTJUKEBOX_ATTENTION", "reference")
    q, k, v = rand_qkv(gen, 1, 16, 1, 8, torch.float64)
    assert attention._choose(q) is ref_attn
    assert torch.equal(attention.attend(q, k, v, "block", block_len=4), ref_attn(q, k, v, "block", block_len=4))


def test_attend_unknown_backend(gen, monkeypatch):
    monkeypatch.setenv("FASTJUKEBOX_ATTENTION", "no_such_backend")
    q, k, v = rand_qkv(gen, 1, 16, 1, 8, torch.float64)
    with pytest.raises(ValueError, match=r"unknown attention backend 'no_such_backend'"):
        attention.attend(q, k, v, "dense")
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'"):
        attention.set_backend("nope")
