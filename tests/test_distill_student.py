"""Parallel upsampler student, its mask schedule and its iterative window sampler."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import distill.sampler as sampler_mod
from distill.sampler import ParallelWindowSampler
from distill.schedules import (mask_ratio, masks_per_pass, pass_temperature, sample_training_mask,
                               sample_training_mask_ratio, spread_order)
from distill.student import ParallelStudent, StudentSampling
from fastjukebox import PriorConfig, Prior, load_prior
from fastjukebox.checkpoint import CheckpointError, save_component

from conftest import checkpoint_path


# --- helpers ---------------------------------------------------------------------------------
def _teacher(level: int = 0) -> Prior:
    return load_prior(checkpoint_path(f"tiny_upsampler_level_{level}"))


def _small_config(**kw) -> PriorConfig:
    """A small upsampler with awkward sizes (n_ctx 40 = 5 blocks of 8, 27 codes)."""
    base = dict(level=0, n_ctx=40, width=32, depth=3, heads=2, attn_order=2, blocks=5, l_bins=27,
                y_bins=(6, 9), max_bow_genre_size=2, cond_width=8, cond_depth=1, cond_dilation_cycle=None)
    return PriorConfig(**{**base, **kw})


def _inputs(c: PriorConfig, n: int, gen: torch.Generator):
    upper = torch.randint(0, c.l_bins, (n, c.n_ctx // c.cond_downsample), generator=gen)
    labels = None
    if c.labels:
        genres = torch.randint(-1, c.y_bins[0], (n, c.max_bow_genre_size), generator=gen)
        artist = torch.randint(0, c.y_bins[1], (n, 1), generator=gen)
        labels = torch.cat([torch.tensor([[44100 * 9, 0, c.sample_length]]).expand(n, 3), artist, genres], 1)
    return upper, labels


class _CountForward:
    """Counts evaluations of the student's token model."""

    def __init__(self, student):
        self.n = 0
        self.handle = student.prior.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


class _SyncCounter(TorchDispatchMode):
    """Counts ops that read device values back to the host."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNC_OPS):
            self.count += 1
        return func(*args, **(kwargs or {}))


# --- schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,passes", [(1, 1), (5, 5), (7, 3), (37, 36), (64, 16), (1000, 8), (1024, 16), (7168, 12)])
def test_masks_per_pass_follows_cosine_and_ends_at_zero(n, passes):
    m = masks_per_pass(n, passes)
    assert len(m) == passes and m[-1] == 0
    prev = n
    for k, mk in enumerate(m, start=1):
        assert mk < prev, f"pass {k} unmasks nothing"
        assert mk >= passes - k, "later passes could not each unmask a position"
        target = math.floor(n * math.cos(math.pi / 2 * k / passes) + 1e-9)
        if passes - k <= target <= prev - 1:
            assert mk == target
        prev = mk
    if n >= 64 * passes:  # room for every pass: the schedule is the cosine itself
        assert all(abs(mk - n * math.cos(math.pi / 2 * k / passes)) < 1 for k, mk in enumerate(m, start=1))


def test_schedule_helpers_and_bad_arguments():
    assert mask_ratio(0.0) == 1.0 and abs(mask_ratio(1.0)) < 1e-12
    r = torch.rand(17)
    assert torch.allclose(mask_ratio(r), torch.cos(math.pi / 2 * r))
    for bad in [(3, 4), (5, 0)]:
        with pytest.raises(ValueError, match="passes"):
            masks_per_pass(*bad)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mask_ratio(1.5)
    temps = [pass_temperature(0.9, i, 6) for i in range(6)]
    assert temps[0] == pytest.approx(0.9) and all(t > 0 for t in temps)
    steps = [a - b for a, b in zip(temps, temps[1:])]
    assert all(s == pytest.approx(0.9 / 6) for s in steps), "not linear towards 0"
    assert temps[-1] - steps[0] == pytest.approx(0.0)  # the next pass would be at 0
    with pytest.raises(ValueError, match="pass_index"):
        pass_temperature(1.0, 6, 6)


def test_training_mask_ratio_distribution_and_masks():
    g = torch.Generator().manual_seed(5)
    ratio = sample_training_mask_ratio((40000,), g)
    assert ratio.min() > 0 and ratio.max() <= 1
    assert ratio.mean().item() == pytest.approx(2 / math.pi, abs=0.01)  # E[cos(pi/2 U)]
    mask = sample_training_mask(9, 23, torch.Generator().manual_seed(3))
    expect = torch.ceil(sample_training_mask_ratio((9, 1), torch.Generator().manual_seed(3)) * 23).clamp(1, 23)
    assert mask.dtype == torch.bool and mask.shape == (9, 23)
    assert torch.equal(mask.sum(1), expect[:, 0].long())
    assert not torch.equal(mask, sample_training_mask(9, 23, torch.Generator().manual_seed(4)))


# --- student ---------------------------------------------------------------------------------
@pytest.mark.parametrize("merged_decoder", [False, True], ids=["tied", "untied"])
def test_from_teacher_copies_every_matching_weight(merged_decoder, gen):
    if merged_decoder:
        torch.manual_seed(0)
        teacher = Prior(_small_config(merged_decoder=True)).eval()
    else:
        teacher = _teacher(1)
    student = ParallelStudent.from_teacher(teacher)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    c = teacher.config
    assert student.mask_id == c.l_bins
    assert s_sd["prior.x_emb.weight"].shape == (c.l_bins + 1, c.width)
    assert torch.equal(s_sd["prior.x_emb.weight"][: c.l_bins], t_sd["prior.x_emb.weight"])
    assert not torch.equal(s_sd["prior.x_emb.weight"][c.l_bins], torch.zeros(c.width)), "mask row left empty"
    shared = [k for k in s_sd if k != "prior.x_emb.weight"]
    assert len(shared) > 20
    for k in shared:
        assert torch.equal(s_sd[k], t_sd[k]), k
    not_copied = set(t_sd) - set(s_sd)
    assert not_copied == (set() if merged_decoder else {"prior.x_out.weight"})
    assert ("prior.x_out.weight" in s_sd) == merged_decoder
    # the student's own copy: training it leaves the teacher unchanged
    next(student.parameters()).data.add_(1.0)
    assert torch.equal(teacher.state_dict()[next(iter(s_sd))], t_sd[next(iter(s_sd))])


@pytest.mark.parametrize("merged_decoder", [False, True], ids=["tied", "untied"])
def test_student_is_the_teacher_run_bidirectionally_on_unshifted_input(merged_decoder, gen):
    """From the teacher's own modules: input at t = emb(token t) + pos[t] + start + x_cond[t],
    transformer with causal=False, x_cond added again before a tied head unless merged_decoder."""
    if merged_decoder:
        torch.manual_seed(1)
        teacher = Prior(_small_config(merged_decoder=True)).eval()
    else:
        teacher = _teacher(0)
    student = ParallelStudent.from_teacher(teacher)
    c = teacher.config
    upper, labels = _inputs(c, 2, gen)
    tokens = torch.randint(0, c.l_bins + 1, (2, c.n_ctx), generator=gen)
    tokens[:, :3] = student.mask_id
    mask_row = student.prior.x_emb.weight[c.l_bins]
    with torch.no_grad():
        cond = teacher.condition(upper, labels)
        tm = teacher.prior
        emb = torch.cat([tm.x_emb.weight, mask_row[None]])[tokens]
        h = tm.transformer(emb + tm.pos_emb.pos_emb + cond.start + cond.x_cond, None, causal=False)
        ref = tm.x_out(h) if merged_decoder else tm.x_out(h + cond.x_cond)
        got = student(tokens, student.condition(upper, labels))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_identity_student_returns_its_input_tokens(gen):
    """Input embedding = scaled identity, every residual branch and all conditioning zero: the
    logits at position t are then the embedding of token t scored against the (tied) code rows,
    so argmax must give back the given tokens at their own positions (the teacher would see t-1)."""
    c = _small_config(width=32, l_bins=27)
    student = ParallelStudent(c).eval()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".c_proj." in name or name.endswith("ln.weight") or name.endswith("ln.bias") or "y_emb" in name \
                    or "pos_emb" in name:
                p.zero_()
        student.prior.x_emb.weight.copy_(10 * torch.eye(c.l_bins + 1, c.width))
    upper, labels = _inputs(c, 3, gen)
    tokens = torch.randint(0, c.l_bins, (3, c.n_ctx), generator=gen)
    tokens[:, 5::7] = student.mask_id
    logits = student(tokens, student.condition(upper, labels))
    assert logits.shape == (3, c.n_ctx, c.l_bins) and logits.dtype == torch.float32
    known = tokens != student.mask_id
    assert torch.equal(logits.argmax(-1)[known], tokens[known])


def test_conditioning_reaches_every_position(gen):
    student = ParallelStudent.from_teacher(_teacher(0))
    c = student.config
    upper, labels = _inputs(c, 2, gen)
    tokens = torch.randint(0, c.l_bins + 1, (2, c.n_ctx), generator=gen)
    with torch.no_grad():
        ref = student(tokens, student.condition(upper, labels))
        other_upper = (upper + 1) % c.l_bins
        other_artist = labels.clone()
        other_artist[:, 3] = (labels[:, 3] + 1) % c.y_bins[1]
        for u, y in [(other_upper, labels), (upper, other_artist)]:
            got = student(tokens, student.condition(u, y))
            assert ((got - ref).abs().amax(-1) > 1e-6).all()


def test_student_is_bidirectional_teacher_is_not(gen):
    teacher = _teacher(0)
    student = ParallelStudent.from_teacher(teacher)
    c = teacher.config
    upper, labels = _inputs(c, 2, gen)
    tokens = torch.randint(0, c.l_bins, (2, c.n_ctx), generator=gen)
    s = 43  # block 5, column 3 of the 8 x 8 window
    changed = tokens.clone()
    changed[:, s] = (tokens[:, s] + 1 + torch.randint(0, c.l_bins - 1, (2,), generator=gen)) % c.l_bins
    with torch.no_grad():
        cond = student.condition(upper, labels)
        diff = (student(changed, cond) - student(tokens, cond)).abs().amax(-1)
        t_diff = (teacher.logits(changed, upper, labels) - teacher.logits(tokens, upper, labels)).abs().amax(-1)
    assert (diff[:, :s] > 1e-6).all(), "an earlier position does not see a later token"
    assert (diff[:, s + 1:] > 1e-6).all()
    assert (t_diff[:, : s + 1] == 0).all() and (t_diff[:, s + 1:] > 0).any()


def test_every_parameter_gets_a_gradient(gen):
    """A masked-token loss reaches every weight (no unused parameters under DDP)."""
    student = ParallelStudent.from_teacher(_teacher(1)).train()
    c = student.config
    upper, labels = _inputs(c, 2, gen)
    target = torch.randint(0, c.l_bins, (2, c.n_ctx), generator=gen)
    mask = sample_training_mask(2, c.n_ctx, gen)
    logits = student(target.masked_fill(mask, student.mask_id), student.condition(upper, labels))
    F.cross_entropy(logits[mask], target[mask]).backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_save_load_round_trip(tmp_path, gen):
    student = ParallelStudent.from_teacher(_teacher(1))
    c = student.config
    upper, labels = _inputs(c, 2, gen)
    tokens = torch.randint(0, c.l_bins + 1, (2, c.n_ctx), generator=gen)
    out = student.save(tmp_path / "student_level_1")
    student.sampling = StudentSampling(confidence_noise=2.0, temperature_anneal=True)
    student.save(out)  # overwriting an existing directory works
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sampling.json"]
    loaded = ParallelStudent.load(out)
    assert loaded.config == c
    assert loaded.sampling == StudentSampling(confidence_noise=2.0, temperature_anneal=True)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, loaded.condition(upper, labels)), student(tokens, student.condition(upper, labels)))
    half = ParallelStudent.load(out, dtype=torch.bfloat16)
    assert half.prior.x_emb.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert half(tokens, half.condition(upper, labels)).dtype == torch.float32
    save_component(_teacher(1), tmp_path / "prior_level_1")
    with pytest.raises(CheckpointError, match="'prior' component, expected 'student'"):
        ParallelStudent.load(tmp_path / "prior_level_1")
    with pytest.raises(CheckpointError, match="not a student directory"):
        ParallelStudent.load(tmp_path / "nothing")


def test_sampling_settings_file(tmp_path):
    """Students saved before ``sampling.json`` existed load with the defaults; a bad file is named."""
    out = ParallelStudent.from_teacher(_teacher(1)).save(tmp_path / "s")
    (out / "sampling.json").unlink()
    assert ParallelStudent.load(out).sampling == StudentSampling()
    for text, match in (('{"confidence_noise": -1}', "confidence_noise"), ('{"noise": 1}', "unknown sampling"),
                        ("[1]", "JSON object"), ("{", "sampling.json")):
        (out / "sampling.json").write_text(text)
        with pytest.raises(CheckpointError, match=match):
            ParallelStudent.load(out)


def test_sampler_takes_the_students_setting(gen):
    student = ParallelStudent.from_teacher(_teacher(1))
    assert ParallelWindowSampler(student).confidence_noise == 16.0
    student.sampling = StudentSampling(confidence_noise=3.0, temperature_anneal=True)
    s = ParallelWindowSampler(student)
    assert (s.confidence_noise, s.temperature_anneal) == (3.0, True)
    s = ParallelWindowSampler(student, confidence_noise=0.0, temperature_anneal=False)
    assert (s.confidence_noise, s.temperature_anneal) == (0.0, False)


def test_student_bad_input(gen):
    top = PriorConfig(level=2, n_ctx=16, width=8, depth=1, heads=1, attn_order=2, blocks=4, l_bins=8, labels=False)
    with pytest.raises(ValueError, match="top level"):
        ParallelStudent(top)
    with pytest.raises(ValueError, match="top level"):
        ParallelStudent.from_teacher(Prior(top))
    student = ParallelStudent.from_teacher(_teacher(0))
    c = student.config
    upper, labels = _inputs(c, 2, gen)
    with pytest.raises(ValueError, match="upper codes must cover the window: 16"):
        student.condition(upper[:, :-1], labels)
    with pytest.raises(ValueError, match="needs labels"):
        student.condition(upper)
    cond = student.condition(upper, labels)
    with pytest.raises(ValueError, match="n_ctx=64"):
        student(torch.randint(0, c.l_bins, (2, c.n_ctx - 3), generator=gen), cond)
    with pytest.raises(ValueError, match="mask_id=64"):
        student(torch.full((2, c.n_ctx), c.l_bins + 1), cond)
    with pytest.raises(ValueError, match="batch 3 but the conditioning has batch 2"):
        student(torch.randint(0, c.l_bins, (3, c.n_ctx), generator=gen), cond)


# --- sampler ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_student():
    return ParallelStudent.from_teacher(_teacher(0))


@pytest.mark.parametrize("K,n_new,passes", [(0, 64, 16), (13, 51, 5), (20, 31, 7), (56, 8, 16), (9, 0, 4)])
def test_sampler_keeps_known_fills_all_and_counts_passes(tiny_student, gen, K, n_new, passes):
    c = tiny_student.config
    upper, labels = _inputs(c, 3, gen)
    known = torch.randint(0, c.l_bins, (3, K), generator=gen)
    counter = _CountForward(tiny_student)
    progress = []
    try:
        out = ParallelWindowSampler(tiny_student, passes=passes)(
            known, n_new, upper, labels, temperature=0.95, generator=gen, on_progress=progress.append)
    finally:
        counter.handle.remove()
    assert out.shape == (3, K + n_new) and out.dtype == torch.long
    assert torch.equal(out[:, :K], known)
    assert out.min() >= 0 and out.max() < c.l_bins, "a mask id was left in the output"
    evaluations = min(passes, n_new)
    assert counter.n == evaluations
    assert len(progress) == evaluations and sum(progress) == n_new
    if n_new:
        assert progress == [a - b for a, b in zip([n_new] + masks_per_pass(n_new, evaluations),
                                                  masks_per_pass(n_new, evaluations))]


def test_padding_positions_stay_masked(tiny_student, gen):
    """Positions past K + n_new are fed as mask ids in every pass."""
    c = tiny_student.config
    upper, labels = _inputs(c, 2, gen)
    seen = []
    hook = tiny_student.prior.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        ParallelWindowSampler(tiny_student, passes=3)(torch.randint(0, c.l_bins, (2, 10), generator=gen), 30,
                                                      upper, labels, generator=gen)
    finally:
        hook.remove()
    assert len(seen) == 3
    for tokens in seen:
        assert (tokens[:, 40:] == tiny_student.mask_id).all()
    masked_before = [(t[:, 10:40] == tiny_student.mask_id).sum(1).tolist() for t in seen]
    assert masked_before == [[30, 30]] + [[m, m] for m in masks_per_pass(30, 3)[:-1]]


def test_seeded_runs_are_reproducible(tiny_student, gen):
    c = tiny_student.config
    upper, labels = _inputs(c, 2, gen)
    known = torch.randint(0, c.l_bins, (2, 7), generator=gen)

    def run(seed, noise=0.0):
        s = ParallelWindowSampler(tiny_student, passes=6, confidence_noise=noise)
        return s(known, 50, upper, labels, temperature=1.0, top_p=0.97, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))
    assert torch.equal(run(11, noise=2.0), run(11, noise=2.0))
    assert not torch.equal(run(11, noise=2.0), run(11))


def _crafted(student, logits_fn, calls=None):
    """Replace the student's logits with ``logits_fn(tokens, lo, hi)``; record inputs in ``calls``."""
    def fake(tokens, cond, lo=0, hi=None, prefix_len=0, *, cache=None, positions=None):
        if calls is not None:
            calls.append(tokens.clone())
        if positions is None:
            return logits_fn(tokens, lo, hi)
        full = logits_fn(tokens, 0, tokens.shape[1])
        return full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    student.logits_unchecked = fake


def test_filtered_tokens_are_never_emitted(gen):
    student = ParallelStudent(_small_config())
    c = student.config
    upper, labels = _inputs(c, 4, gen)
    # nearly flat logits with a random favourite per position: unfiltered draws mostly miss it
    flat = torch.randn(4, c.n_ctx, c.l_bins, generator=gen) * 0.05
    best = flat.argmax(-1)
    _crafted(student, lambda tokens, lo, hi: flat[:, lo:hi])
    known = torch.randint(0, c.l_bins, (4, 5), generator=gen)
    sampler = ParallelWindowSampler(student, passes=4)
    free = sampler(known, 30, upper, labels, generator=gen)
    assert (free[:, 5:] != best[:, 5:35]).float().mean() > 0.5
    for kw in [dict(top_k=1), dict(top_p=1e-4), dict(top_k=1, temperature=0.0)]:
        out = sampler(known, 30, upper, labels, generator=gen, **kw)
        assert torch.equal(out[:, 5:], best[:, 5:35]), kw
        assert torch.equal(out[:, :5], known)


def test_most_confident_positions_are_kept_first(gen):
    """Greedy draws on crafted logits whose peak height differs per position: after pass 1
    exactly the positions with the highest peaks are final, the others masked again."""
    student = ParallelStudent(_small_config())
    c = student.config
    upper, labels = _inputs(c, 2, gen)
    K, n_new = 4, 33
    logits = torch.randn(2, c.n_ctx, c.l_bins, generator=gen)
    peak = torch.rand(2, c.n_ctx, generator=gen) * 8
    logits.scatter_add_(-1, logits.argmax(-1, keepdim=True), peak.unsqueeze(-1))
    calls = []
    _crafted(student, lambda tokens, lo, hi: logits[:, lo:hi], calls)
    sampler = ParallelWindowSampler(student, passes=3, confidence_noise=0.0)   # rank by probability alone
    out = sampler(torch.randint(0, c.l_bins, (2, K), generator=gen), n_new, upper, labels, temperature=0.0)
    assert len(calls) == 3
    conf = torch.log_softmax(logits[:, K:K + n_new], -1).amax(-1)
    n_final = n_new - masks_per_pass(n_new, 3)[0]
    expect_final = torch.zeros(2, n_new, dtype=torch.bool).scatter_(1, conf.topk(n_final, dim=1).indices, True)
    assert torch.equal(calls[1][:, K:K + n_new] != student.mask_id, expect_final)
    assert torch.equal(out[:, K:], logits[:, K:K + n_new].argmax(-1))


def _record_draw_temperatures(monkeypatch) -> list:
    """The temperature of every draw the parallel sampler makes, in order."""
    temps = []
    draw = sampler_mod.draw_codes

    def spy(logits, temperature, *args):
        temps.append(temperature)
        return draw(logits, temperature, *args)

    monkeypatch.setattr(sampler_mod, "draw_codes", spy)
    return temps


@pytest.mark.parametrize("anneal", [True, False])
def test_temperature_annealing(monkeypatch, tiny_student, gen, anneal):
    c = tiny_student.config
    upper, labels = _inputs(c, 1, gen)
    temps = _record_draw_temperatures(monkeypatch)
    ParallelWindowSampler(tiny_student, passes=5, temperature_anneal=anneal)(
        torch.zeros(1, 0, dtype=torch.long), 40, upper, labels, temperature=0.8, generator=gen)
    assert temps == ([pass_temperature(0.8, i, 5) for i in range(5)] if anneal else [0.8] * 5)


def test_sampler_loop_does_not_sync(tiny_student, gen):
    """Host reads (``.item()``, ``nonzero``, ...) happen only in the checks before the loop:
    their number does not grow with the number of passes."""
    c = tiny_student.config
    upper, labels = _inputs(c, 2, gen)
    known = torch.randint(0, c.l_bins, (2, 16), generator=gen)
    counts = []
    for passes in (2, 9):
        with _SyncCounter() as counter:
            ParallelWindowSampler(tiny_student, passes=passes, confidence_noise=1.0)(
                known, 48, upper, labels, top_k=7, top_p=0.9, generator=gen)
        counts.append(counter.count)
    assert counts[0] == counts[1] and counts[0] > 0  # > 0: the counter sees the input checks


def test_sampler_bad_input(tiny_student, gen):
    c = tiny_student.config
    upper, labels = _inputs(c, 2, gen)
    known = torch.randint(0, c.l_bins, (2, 20), generator=gen)
    sampler = ParallelWindowSampler(tiny_student, passes=4)
    with pytest.raises(ValueError, match="20 known \\+ 45 new codes exceed the window \\(n_ctx=64\\)"):
        sampler(known, 45, upper, labels)
    with pytest.raises(ValueError, match="upper codes must cover the window"):
        sampler(known, 8, upper[:, :10], labels)
    with pytest.raises(ValueError, match="known codes must be in \\[0, 64\\)"):
        sampler(known.clone().fill_(c.l_bins), 8, upper, labels)
    with pytest.raises(ValueError, match="integer tensor"):
        sampler(known.float(), 8, upper, labels)
    with pytest.raises(ValueError, match="batch 3 but the conditioning has batch 2"):
        sampler(torch.randint(0, c.l_bins, (3, 20), generator=gen), 8, upper, labels)
    with pytest.raises(ValueError, match="temperature"):
        sampler(known, 8, upper, labels, temperature=-1.0)
    with pytest.raises(ValueError, match="n_new"):
        sampler(known, -1, upper, labels)
    with pytest.raises(ValueError, match="passes"):
        ParallelWindowSampler(tiny_student, passes=0)
    with pytest.raises(TypeError, match="ParallelStudent"):
        ParallelWindowSampler(_teacher(0))


def test_spread_order_decodes_its_prefixes_evenly(gen):
    """Greedy spread decoding on crafted logits: after pass k exactly the first positions of
    ``spread_order`` are final (whatever the confidences), heads run only where codes become
    final, and every code is the argmax."""
    student = ParallelStudent(_small_config())
    c = student.config
    upper, labels = _inputs(c, 2, gen)
    K, n_new, passes = 5, 33, 4
    logits = torch.randn(2, c.n_ctx, c.l_bins, generator=gen)
    calls, scored = [], []
    real = student.logits_unchecked

    def spy(tokens, cond, lo=0, hi=None, prefix_len=0, *, cache=None, positions=None):
        calls.append(tokens.clone())
        scored.append(positions.clone())
        return logits.gather(1, positions[..., None].expand(-1, -1, c.l_bins))

    student.logits_unchecked = spy
    sampler = ParallelWindowSampler(student, passes=passes, order="spread", confidence_noise=5.0)
    out = sampler(torch.randint(0, c.l_bins, (2, K), generator=gen), n_new, upper, labels, temperature=0.0)
    student.logits_unchecked = real
    order = torch.tensor(spread_order(n_new)) + K
    done = 0
    for k, still in enumerate(masks_per_pass(n_new, passes)):
        final_before = calls[k][0, K:K + n_new] != student.mask_id
        assert torch.equal(final_before.nonzero().flatten().sort().values + K, order[:done].sort().values)
        assert torch.equal(scored[k][0], order[done:n_new - still])
        done = n_new - still
    assert torch.equal(out[:, K:], logits[:, K:K + n_new].argmax(-1))
    adjacent = (order[:n_new // 4].sort().values.diff() == 1).sum()
    assert adjacent == 0          # the first quarter of the order holds no two neighbours


def test_temperature_scale_multiplies_the_callers_temperature(monkeypatch, tiny_student, gen):
    c = tiny_student.config
    upper, labels = _inputs(c, 1, gen)
    temps = _record_draw_temperatures(monkeypatch)
    tiny_student.sampling = StudentSampling(temperature_scale=0.5, order="spread")
    s = ParallelWindowSampler(tiny_student, passes=3)
    assert (s.temperature_scale, s.order) == (0.5, "spread")
    s(torch.zeros(1, 0, dtype=torch.long), 40, upper, labels, temperature=0.8, generator=gen)
    assert temps == [pytest.approx(0.4)] * 3
    tiny_student.sampling = StudentSampling()
    for kw, match in ((dict(temperature_scale=0.0), "temperature_scale"), (dict(order="zigzag"), "order")):
        with pytest.raises(ValueError, match=match):
            ParallelWindowSampler(tiny_student, **kw)
        with pytest.raises(ValueError, match=match):
            StudentSampling(**kw)


def test_spread_order_is_a_permutation_with_even_prefixes():
    for n in (1, 2, 5, 8, 37, 512):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
        for m in (2, 4, 8):
            if n >= 2 * m:
                gaps = torch.tensor(sorted(order[:m])).diff()
                assert gaps.min() >= n // (2 * m), (n, m, order[:m])
    with pytest.raises(ValueError, match="n must be"):
        spread_order(-1)


def test_random_order_is_a_fresh_permutation_per_window(gen):
    """``order="random"``: each pass makes final the next positions of a permutation drawn per
    window from the generator (rows differ, a seed repeats them), as many per pass as the mask
    schedule says, and heads run only there."""
    student = ParallelStudent(_small_config())
    c = student.config
    upper, labels = _inputs(c, 3, gen)
    K, n_new, passes = 7, 29, 4
    logits = torch.randn(3, c.n_ctx, c.l_bins, generator=gen)
    real = student.logits_unchecked

    def run(seed):
        scored = []

        def spy(tokens, cond, lo=0, hi=None, prefix_len=0, *, cache=None, positions=None):
            scored.append(positions.clone())
            return logits.gather(1, positions[..., None].expand(-1, -1, c.l_bins))

        student.logits_unchecked = spy
        sampler = ParallelWindowSampler(student, passes=passes, order="random")
        out = sampler(torch.randint(0, c.l_bins, (3, K), generator=gen), n_new, upper, labels, temperature=0.0,
                      generator=torch.Generator().manual_seed(seed))
        student.logits_unchecked = real
        return out, scored

    out, scored = run(1)
    sizes = [n_new - still for still in masks_per_pass(n_new, passes)]
    assert [p.shape[1] for p in scored] == [b - a for a, b in zip([0] + sizes, sizes)]
    order = torch.cat(scored, dim=1)
    for row in order:
        assert sorted(row.tolist()) == list(range(K, K + n_new))
    assert not torch.equal(order[0], order[1]) and not torch.equal(order[1], order[2])
    assert torch.equal(torch.cat(run(1)[1], dim=1), order)
    assert not torch.equal(torch.cat(run(2)[1], dim=1), order)
    assert torch.equal(out[:, K:], logits[:, K:K + n_new].argmax(-1))


@pytest.mark.parametrize("order", ["confidence", "spread", "random"])
def test_one_generator_per_row_gives_each_row_what_it_draws_alone(order, gen):
    """With ``SampleGenerators`` a row's codes do not depend on the rest of its batch: each row
    of a batch of 3 equals that row sampled alone from a generator with its seed (so a run's
    samples can be batched, or split over processes, and stay the same)."""
    from fastjukebox.sample_seeds import SampleGenerators
    student = ParallelStudent(_small_config())
    c = student.config
    upper, labels = _inputs(c, 3, gen)
    known = torch.randint(0, c.l_bins, (3, 6), generator=gen)
    sampler = ParallelWindowSampler(student, passes=3, order=order, confidence_noise=2.0)
    seeds = [11, 12, 13]
    batch = sampler(known, 30, upper, labels, generator=SampleGenerators(seeds))
    alone = torch.cat([sampler(known[i:i + 1], 30, upper[i:i + 1], labels[i:i + 1],
                               generator=torch.Generator().manual_seed(s)) for i, s in enumerate(seeds)])
    assert torch.equal(batch, alone)
    again = sampler(known, 30, upper, labels, generator=SampleGenerators([11, 99, 13]))
    assert torch.equal(again[[0, 2]], batch[[0, 2]]) and not torch.equal(again[1], batch[1])


def test_categorical_draw_takes_the_first_of_tied_maxima_in_place_or_not(gen):
    from kernels.sampling.reference import categorical_draw
    for V in (7, 256, 300):
        probs = torch.randint(0, 3, (64, V), generator=gen).float()      # many tied maxima
        noise = torch.ones(64, V)
        want = (probs / noise).argmax(-1)
        assert torch.equal(categorical_draw(probs, noise=noise), want)
        before = probs.clone()
        assert torch.equal(categorical_draw(probs, noise=noise), want) and torch.equal(probs, before)
        noise = torch.empty(64, V).exponential_(generator=gen)
        want = (probs / noise).argmax(-1)
        assert torch.equal(categorical_draw(probs.clone(), noise=noise, inplace=True), want)
        inplace = probs.clone()
        categorical_draw(inplace, noise=noise, inplace=True)
        assert torch.equal(inplace, probs / noise)                           # divided in place


def test_draw_codes_with_a_noise_buffer_draws_the_same_codes(gen):
    from fastjukebox.sample_seeds import SampleGenerators
    logits = torch.randn(3, 17, 29, generator=gen) * 3
    kept = logits.clone()
    for t, k, p in ((0.7, 0, 0.0), (1.0, 5, 0.9)):
        for make in (lambda: torch.Generator().manual_seed(4), lambda: SampleGenerators([4, 5, 6])):
            want = sampler_mod.draw_codes(logits, t, k, p, make())
            buffer = torch.full((3 * 17 * 29 + 11,), float("nan"))
            got = sampler_mod.draw_codes(logits, t, k, p, make(), buffer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            wrong = torch.zeros(3 * 17 * 29, dtype=torch.float64)          # another dtype: not used
            got = sampler_mod.draw_codes(logits, t, k, p, make(), wrong)
            assert torch.equal(got[0], want[0]) and (wrong == 0).all()
    assert torch.equal(logits, kept)                                          # the caller's logits untouched
