"""The device-position decode step equals the WindowDecoder step; masked decode attention equals
the reference; the "ar-graph" sampler draws the ARWindowSampler's tokens; no host sync in a step."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastjukebox import Prior, PriorConfig, load_prior
from fastjukebox import fast_decode
from fastjukebox.decoding import WindowDecoder
from fastjukebox.fast_decode import (GRAPHS_ENV, GraphWindowSampler, StaticStepDecoder, cuda_graphs_enabled,
                                     resolve_backend)
from fastjukebox.samplers import SAMPLERS
from fastjukebox.sampling import ARWindowSampler, sample_logits
from kernels.decode_attention.masked import decode_attention_masked
from kernels.decode_attention.reference import decode_attention_reference

from conftest import DATA

CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA device (graph capture and replay); not run, not passed, on this machine"


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --- masked decode attention ---------------------------------------------------------------

def _layer_caches(pattern, N, H, D, C, nb, P, S, dtype, g):
    shape = {"block": (C,), "prev_block": (2, C), "transpose": (C, nb), "dense": (C * nb,), "prime": (P,),
             "cross": (S,)}[pattern]
    k = torch.randn(N, *shape, H, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(N, *shape, H, D, generator=g, dtype=torch.float64).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("pattern", ["block", "prev_block", "transpose", "dense", "prime", "cross"])
def test_masked_equals_reference_at_every_position(pattern, dtype, tol):
    g = torch.Generator().manual_seed(7)
    N, H, D, C, nb, P, S = 3, 3, 5, 7, 5, 11, 9
    k, v = _layer_caches(pattern, N, H, D, C, nb, P, S, dtype, g)
    for pos in range(C * nb):
        q = torch.randn(N, 1, H, D, generator=g, dtype=torch.float64).to(dtype)
        ref = decode_attention_reference(q, k, v, pattern, pos, C, P)
        got = decode_attention_masked(q, k, v, pattern, torch.tensor(pos), C, P)
        assert got.shape == ref.shape and got.dtype == dtype
        if pattern == "prev_block" and pos < C:
            assert torch.equal(got, torch.zeros_like(got)), pos      # block 0: exactly zero
        else:
            assert _rel(got, ref) < tol, (pattern, pos)


def test_masked_bfloat16_close_to_reference():
    g = torch.Generator().manual_seed(3)
    k, v = _layer_caches("transpose", 2, 2, 6, 5, 4, 0, 0, torch.bfloat16, g)
    for pos in (0, 7, 19):
        q = torch.randn(2, 1, 2, 6, generator=g).bfloat16()
        ref = decode_attention_reference(q, k, v, "transpose", pos, 5)
        got = decode_attention_masked(q, k, v, "transpose", torch.tensor(pos), 5)
        assert got.dtype == torch.bfloat16 and _rel(got, ref) < 1e-2


def test_masked_rejects_bad_input():
    q, k = torch.randn(2, 1, 2, 4), torch.randn(2, 6, 2, 4)
    with pytest.raises(ValueError, match="one query"):
        decode_attention_masked(torch.randn(2, 3, 2, 4), k, k, "block", torch.tensor(0), 6)
    with pytest.raises(ValueError, match="tensor"):
        decode_attention_masked(q, k, k, "block", 3, 6)
    with pytest.raises(ValueError, match="summary"):
        decode_attention_masked(q, k, k, "summary", torch.tensor(0), 6)
    with pytest.raises(ValueError, match="prime_len"):
        decode_attention_masked(q, k, k, "prime", torch.tensor(0), 6)
    with pytest.raises(ValueError, match="does not match"):
        decode_attention_masked(q, torch.randn(3, 6, 2, 4), torch.randn(3, 6, 2, 4), "dense", torch.tensor(0), 6)


# --- the static step against WindowDecoder.step --------------------------------------------

def _random_prior(attn_order, depth, seed, dtype=torch.float64, blocks=6, n_ctx=48):
    torch.manual_seed(seed)
    cfg = PriorConfig(level=2, n_ctx=n_ctx, width=24, depth=depth, heads=2, attn_order=attn_order, blocks=blocks,
                      l_bins=37, labels=False)
    prior = Prior(cfg).double().eval()
    for p in prior.parameters():
        p.normal_(0, 0.3)
    return prior.to(dtype), None, None


def _fixture_prior(name):
    prior = load_prior(DATA / f"{name}.pth.tar", dtype=torch.float64)
    io = np.load(DATA / f"{name}_io.npz")
    upper = torch.from_numpy(io["z_cond"]) if "z_cond" in io else None
    return prior, upper, torch.from_numpy(io["y"])


CASES = {
    "order2": lambda: _random_prior(2, 6, 0),                        # block / transpose / prev_block
    "dense": lambda: _random_prior(0, 2, 1),
    "order9": lambda: _random_prior(9, 4, 2),
    "upsampler": lambda: _fixture_prior("tiny_upsampler_level_0"),   # x_cond, labels
    "prior_1b": lambda: _fixture_prior("tiny_prior_1b_lyrics"),      # prime layers, merged lyrics
    "prior_5b_lyrics": lambda: _fixture_prior("tiny_prior_5b_lyrics"),   # cross layers
}
KNOBS = {"order2": (0.9, 0, 0.0), "dense": (1.1, 5, 0.0), "order9": (0.8, 0, 0.85), "upsampler": (0.95, 0, 0.0),
         "prior_1b": (0.9, 7, 0.9), "prior_5b_lyrics": (1.0, 0, 0.0)}


@pytest.mark.parametrize("name,known", [(name, 13) for name in CASES] + [("prior_1b", 2)])
def test_static_step_equals_window_decoder(name, known):
    """Primed mid-block, the steps cross block boundaries (and, for prior_1b from 2 known codes,
    write prime-layer keys below prime_len)."""
    prior, upper, y = CASES[name]()
    c = prior.config
    temperature, top_k, top_p = KNOBS[name]
    n = 2
    if upper is not None:
        upper = upper[:n]
    y = None if y is None else y[:n]
    z = torch.randint(0, c.l_bins, (n, known), generator=torch.Generator().manual_seed(5))
    ref, dec = WindowDecoder(prior, n + 1), WindowDecoder(prior, n + 1)   # a window narrower than the batch
    for d in (ref, dec):
        d.begin(upper, y, n=n)
        d.prime(z, chunk_size=5)
    fast = StaticStepDecoder(dec)
    assert fast.backend == "reference" and not fast.use_graphs
    g_fast, g_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    fast.bind(temperature=temperature, top_k=top_k, top_p=top_p, generator=g_fast)
    steps = c.n_ctx - known
    worst = 0.0
    for _ in range(steps):
        fast.step_and_sample()
        logits = ref.step()
        worst = max(worst, _rel(fast.logits, logits))
        ids = sample_logits(logits, temperature, top_k, top_p, g_ref)   # same noise stream
        assert torch.equal(fast.ids, ids)
        ref.push(fast.ids)
    assert worst < 1e-10
    assert int(fast.pos) == c.seq_len
    dec.advance(steps)
    assert torch.equal(dec.codes(), ref.codes())
    assert torch.equal(dec.tokens(), ref.tokens())


def test_step_decoder_rejects_misuse():
    prior, _, _ = _random_prior(2, 3, 4)
    dec = WindowDecoder(prior, 2)
    fast = StaticStepDecoder(dec)
    with pytest.raises(ValueError, match="begin"):
        fast.bind()
    dec.begin(None, None)
    with pytest.raises(ValueError, match="start embedding"):
        fast.bind()
    dec.prime(torch.randint(0, 37, (2, 4)))
    with pytest.raises(ValueError, match="temperature"):
        fast.bind(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        fast.bind(top_p=1.5)
    fast.bind()
    with pytest.raises(RuntimeError, match="CUDA"):
        fast.capture()
    with pytest.raises(ValueError, match="do not fit"):
        fast.run(prior.config.n_ctx)
    with pytest.raises(ValueError, match="dtype"):
        StaticStepDecoder(WindowDecoder(prior, 1, dtype=torch.float32))


# --- the window sampler ---------------------------------------------------------------------

@pytest.mark.parametrize("name,known", [("upsampler", 0), ("upsampler", 21), ("prior_1b", 0), ("order2", 9)])
def test_graph_window_sampler_draws_the_ar_tokens(name, known):
    prior, upper, y = CASES[name]()
    c = prior.config
    n = 3 if y is None else y.shape[0]
    z = torch.randint(0, c.l_bins, (n, known), generator=torch.Generator().manual_seed(8))
    knobs = dict(temperature=0.9, top_k=0 if name != "order2" else 6, top_p=0.0, chunk_size=4)
    results, progress = [], []
    for sampler in (ARWindowSampler(prior, n), GraphWindowSampler(prior)):
        g = torch.Generator().manual_seed(21)
        ticks = []
        full = sampler(z, c.n_ctx - known, upper, y, generator=g, on_progress=ticks.append, **knobs)
        narrow = sampler(z[:1], 5, None if upper is None else upper[:1], None if y is None else y[:1],
                         generator=g, **knobs)                      # a narrower batch through the same decoder
        results.append((full, narrow))
        progress.append(ticks)
    (ref_full, ref_narrow), (full, narrow) = results
    assert full.shape == (n, c.n_ctx) and torch.equal(full, ref_full)
    assert narrow.shape == (1, known + 5) and torch.equal(narrow, ref_narrow)
    assert progress[1] == progress[0] and sum(progress[1]) == c.n_ctx - known   # every new token reported


def test_graph_window_sampler_checks_sizes():
    prior, _, _ = _random_prior(2, 3, 4)
    sampler = GraphWindowSampler(prior)
    with pytest.raises(ValueError, match="exceed the window"):
        sampler(torch.zeros(2, 10, dtype=torch.long), prior.config.n_ctx)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        sampler(torch.zeros(10, dtype=torch.long), 3)


def test_ar_graph_is_a_registered_sampler():
    import fastjukebox as fj
    assert "ar-graph" in SAMPLERS
    jb = fj.load("tiny", dtype=torch.float64)
    kw = dict(artist=3, genre=[1, 4], seconds=0.4, n_samples=2, seed=5, progress=False)
    ref = jb.sample(sampler="ar", **kw)
    got = jb.sample(sampler="ar-graph", **kw)
    for a, b in zip(got.codes, ref.codes):
        assert (a is None and b is None) or torch.equal(a, b)


# --- no host sync, no weight casts ------------------------------------------------------------

class _Watch(TorchDispatchMode):
    """Fails on host syncs / data-dependent shapes; records casts that read a weight's storage."""

    SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
             "aten::_unique2", "aten::item"}

    def __init__(self, weight_ptrs):
        super().__init__()
        self.weight_ptrs, self.casts, self.ops = weight_ptrs, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops += 1
        if name in self.SYNCS:
            raise AssertionError(f"host sync in the step: {name}")
        if name in ("aten::_to_copy", "aten::to", "aten::copy_", "aten::type_as"):
            src = args[1] if name == "aten::copy_" else args[0]
            if isinstance(src, torch.Tensor) and src.untyped_storage().data_ptr() in self.weight_ptrs:
                self.casts.append((name, tuple(src.shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_step_has_no_host_sync_and_no_weight_cast(dtype, monkeypatch):
    prior, upper, y = _fixture_prior("tiny_prior_1b_lyrics")
    prior = prior.to(dtype)
    dec = WindowDecoder(prior, 2)
    dec.begin(upper, y)
    dec.prime(torch.randint(0, prior.config.l_bins, (2, 3)))
    fast = StaticStepDecoder(dec)
    fast.bind(temperature=0.9, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0))
    ptrs = {p.untyped_storage().data_ptr() for p in prior.parameters()}

    def boom(*a, **k):
        raise AssertionError("host read in the step")

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, method, boom)
    watch = _Watch(ptrs)
    with watch:
        for _ in range(3):
            fast.step_and_sample()
    monkeypatch.undo()
    assert watch.ops > 50                  # the mode saw the step's ops
    assert watch.casts == []
    assert int(fast.pos) == dec.seq_position + 3


# --- flags -------------------------------------------------------------------------------------

def test_cuda_graph_flag_branches(monkeypatch):
    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    assert cuda_graphs_enabled("cpu") is False
    assert cuda_graphs_enabled("cuda") is True             # default: on for CUDA
    monkeypatch.setenv(GRAPHS_ENV, "0")
    assert cuda_graphs_enabled("cuda") is False
    monkeypatch.setenv(GRAPHS_ENV, "1")
    assert cuda_graphs_enabled("cuda") is True and cuda_graphs_enabled("cpu") is False
    monkeypatch.setenv(GRAPHS_ENV, "yes")
    with pytest.raises(ValueError, match=GRAPHS_ENV):
        cuda_graphs_enabled("cuda")
    assert cuda_graphs_enabled("cuda", False) is False
    with pytest.raises(ValueError, match="CUDA device"):
        cuda_graphs_enabled("cpu", True)
    prior, _, _ = _random_prior(2, 3, 4)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphWindowSampler(prior, cuda_graphs=True)


def test_backend_flag_branches(monkeypatch):
    monkeypatch.delenv("FASTJUKEBOX_ATTENTION", raising=False)
    assert resolve_backend("cpu") == "reference"
    assert resolve_backend("cpu", "auto") == "reference"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("cpu", "triton")
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("cpu", "fast")
    monkeypatch.setenv("FASTJUKEBOX_ATTENTION", "reference")
    assert resolve_backend("cuda") == "reference"
    monkeypatch.setattr(fast_decode, "_triton_ops", lambda: None)
    monkeypatch.setenv("FASTJUKEBOX_ATTENTION", "auto")
    assert resolve_backend("cuda") == "reference"          # no triton: the references serve CUDA


# --- CUDA only ------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_graph_replay_equals_eager_and_window_decoder_on_cuda(dtype, tol):
    prior, upper, y = _fixture_prior("tiny_upsampler_level_0")
    prior = prior.to("cuda", dtype)
    known = 11
    z = torch.randint(0, prior.config.l_bins, (2, known), generator=torch.Generator().manual_seed(1))
    runs = []
    for graphs in (False, True):
        dec = WindowDecoder(prior, 2)
        dec.begin(upper.cuda(), y.cuda())
        dec.prime(z)
        fast = StaticStepDecoder(dec, cuda_graphs=graphs)
        assert fast.use_graphs == graphs
        fast.bind(temperature=0.9, top_k=4, generator=torch.Generator("cuda").manual_seed(3))
        logits = []
        for _ in range(prior.config.n_ctx - known):
            fast.step()
            logits.append(fast.logits.clone())
        dec.advance(len(logits))
        runs.append((torch.stack(logits), dec.codes()))
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][0], runs[1][0])
    ref = WindowDecoder(prior, 2)                   # the eager path (int positions), fed the same ids
    ref.begin(upper.cuda(), y.cuda())
    ref.prime(z)
    codes = runs[1][1]
    for t in range(known, prior.config.n_ctx):
        assert _rel(runs[1][0][t - known], ref.step()) < tol, t
        ref.push(codes[:, t])
