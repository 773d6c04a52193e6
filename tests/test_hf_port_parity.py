"""fastjukebox against transformers' Jukebox port (4.40.2, the ``peers`` extra), in float64.

Tiny random ``JukeboxModel``s are saved the way the hub's are (pickled ``.bin``: the port's
safetensors writer refuses the tied upsampler weights) and loaded by fastjukebox; the VQ-VAE's
codes and audio and every prior's teacher-forced logits must equal the port's. Around the port's
own pitfalls:

* its prior config's ``mask`` defaults to false (teacher-forced outputs then see the future), so
  the configs here set it;
* its attention softmax and VQ-VAE input are cast to float32 even in a float64 model, so the port
  runs with float64 tensors kept float64 (``_port_in_float64``);
* ``JukeboxPrior.forward_tokens(get_preds=True)`` fails for the upsamplers and for lyric priors at
  batch > 1, so the logits come from the port's own conditioning and token model directly.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[peers]' for the port comparison)")
if not hasattr(transformers, "JukeboxModel"):
    pytest.skip(f"transformers {transformers.__version__} has no Jukebox port (the peers extra pins 4.40.2)",
                allow_module_level=True)

from transformers import JukeboxConfig, JukeboxModel  # noqa: E402

from fastjukebox.bundle import load  # noqa: E402
from fastjukebox.hf_checkpoint import read_hf  # noqa: E402

SR = 44100
L_BINS = 32
N = 2                                   # batch: the port's forward_tokens fails above 1 for lyric priors
VQVAE = dict(nb_discrete_codes=L_BINS, embed_dim=8, res_conv_width=8, res_conv_depth=2, multipliers=[2, 1, 1],
             res_downs_t=[2, 1, 1], res_strides_t=[2, 2, 2], res_dilation_growth_rate=3, sample_length=256)
COMMON = dict(music_vocab_size=L_BINS, res_downs_t=[2, 1, 1], res_strides_t=[2, 2, 2], mask=True,
              metadata_dims=[6, 7], n_ctx=16, hidden_size=16, blocks=4)
UPSAMPLER = dict(COMMON, num_layers=3, n_heads=1, attention_pattern="raw_column_previous_row_attention",
                 is_encoder_decoder=False, nb_relevant_lyric_tokens=0, merged_decoder=False, res_conv_width=8,
                 res_conv_depth=3, res_dilation_growth_rate=3, res_dilation_cycle=2, init_scale=0.4)
# tiny versions of the released top priors: their attention cycles, lyric handling and output heads
TOPS = {
    "5b": dict(COMMON, num_layers=3, n_heads=2, attention_pattern="raw_column_previous_row_attention",
               is_encoder_decoder=False, nb_relevant_lyric_tokens=0, merged_decoder=True),
    "5b_lyrics": dict(COMMON, num_layers=19, n_heads=2, attention_pattern="large_separated_enc_dec_w_lyrics",
                      is_encoder_decoder=False, nb_relevant_lyric_tokens=8, lyric_vocab_size=80,
                      merged_decoder=True,
                      encoder_config=dict(hidden_size=12, num_layers=3, n_heads=2, blocks=2, mask=True,
                                          attention_pattern="raw_column_previous_row_attention",
                                          attention_multiplier=0.5)),
    "1b_lyrics": dict(COMMON, num_layers=16, n_heads=2, attention_pattern="enc_dec_with_lyrics",
                      is_encoder_decoder=True, nb_relevant_lyric_tokens=8, lyric_vocab_size=79,
                      merged_decoder=False),
}


def _config(top: str) -> JukeboxConfig:
    priors = [dict(TOPS[top], level=0), dict(UPSAMPLER, level=1, conv_res_scale=True), dict(UPSAMPLER, level=2)]
    return JukeboxConfig(vqvae_config=VQVAE, prior_config_list=priors, max_nb_genres=2, timing_dims=8,
                         min_duration=0.1, max_duration=2.0, sampling_rate=SR)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (the port initialises LayerNorms and biases to constants); tied
    tensors stay tied because they are one parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3)
    return model


@contextlib.contextmanager
def _port_in_float64():
    """Keep float64 tensors float64 where the port calls ``.float()`` (softmax, VQ-VAE input);
    integer and bool tensors (timing positions, genre masks) still become float32 as in the port."""
    original = torch.Tensor.float

    def float_keeping_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = float_keeping_float64
    try:
        yield
    finally:
        torch.Tensor.float = original


@pytest.fixture(scope="module", params=sorted(TOPS))
def pair(request, tmp_path_factory):
    """(the port's model in float64, fastjukebox's model loaded from its saved directory)."""
    torch.manual_seed(0)
    port = _randomise(JukeboxModel(_config(request.param)), seed=1).double().eval()
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    port.save_pretrained(d, safe_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing to note: every field is one fastjukebox reads
        ours = load(d, dtype=torch.float64)
    return port, ours


def _labels(prior, g: torch.Generator) -> torch.Tensor:
    c = prior.config
    rows = torch.zeros(N, c.label_len, dtype=torch.long)
    rows[:, 0] = int(1.5 * SR)                                   # total length
    rows[:, 1] = torch.tensor([0, 3000])                         # window offset
    rows[:, 2] = c.sample_length
    rows[:, 3] = torch.randint(0, c.y_bins[1], (N,), generator=g)
    rows[:, 4:4 + c.max_bow_genre_size] = torch.randint(0, c.y_bins[0], (N, c.max_bow_genre_size), generator=g)
    rows[0, 4 + c.max_bow_genre_size - 1] = -1                   # an empty genre slot
    if c.n_tokens:
        rows[:, -c.n_tokens:] = torch.randint(0, c.n_vocab, (N, c.n_tokens), generator=g)
    return rows


def _port_logits(port_prior, tokens, upper, labels) -> torch.Tensor:
    conds = [] if upper is None else [upper]
    audio_cond, metadata_cond, lyric = port_prior.get_cond(conds, labels)
    if port_prior.is_encoder_decoder:
        seq, audio_cond = port_prior.prior_preprocess([lyric, tokens], [None, audio_cond])
        return port_prior.prior(seq, audio_cond, metadata_cond, get_preds=True)[1]
    encoder_states = port_prior.get_encoder_states(lyric)
    return port_prior.prior(tokens, audio_cond, metadata_cond, encoder_states, get_preds=True)[1]


def test_every_prior_gives_the_ports_logits(pair):
    port, ours = pair
    g = torch.Generator().manual_seed(2)
    levels = ours.vqvae.config.levels
    for level in ours.levels:
        prior = ours.prior(level)
        c = prior.config
        tokens = torch.randint(0, L_BINS, (N, c.n_ctx), generator=g)
        upper = None if c.is_top else torch.randint(0, L_BINS, (N, c.n_ctx // c.cond_downsample), generator=g)
        labels = _labels(prior, g)
        with torch.no_grad():
            got = prior.logits(tokens, upper, labels)
            with _port_in_float64():
                want = _port_logits(port.priors[levels - 1 - level], tokens, upper, labels)
        assert got.dtype == want.dtype == torch.float64
        assert got.shape == want.shape, level
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"level {level}")
        assert got.std() > 0.1   # random weights: logits that differ by position and token


def test_vqvae_codes_and_audio_equal_the_ports(pair):
    port, ours = pair
    g = torch.Generator().manual_seed(3)
    audio = torch.rand(N, 4 * ours.vqvae.hop_lengths[-1], generator=g, dtype=torch.float64) * 2 - 1
    codes = ours.vqvae.encode(audio)
    with torch.no_grad(), _port_in_float64():
        port_codes = port.vqvae.encode(audio[..., None])
    for level, (got, want) in enumerate(zip(codes, port_codes)):
        assert torch.equal(got, want), level
        assert got.unique().numel() > 1
        with torch.no_grad(), _port_in_float64():
            want_audio = port.vqvae.decode([got], start_level=level, end_level=level + 1)[..., 0]
        torch.testing.assert_close(ours.vqvae.decode(got, level), want_audio, rtol=1e-10, atol=1e-10)


def test_round_trip_through_the_port_is_bit_identical(pair, tmp_path):
    """fastjukebox -> HF directory -> the port's from_pretrained -> its save_pretrained ->
    fastjukebox: every tensor and config the same."""
    _, ours = pair
    ours.save_hf(tmp_path / "to_port")
    port, info = JukeboxModel.from_pretrained(tmp_path / "to_port", output_loading_info=True,
                                                torch_dtype=torch.float64)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    port.save_pretrained(tmp_path / "from_port", safe_serialization=False)
    vqvae, priors, notes = read_hf(tmp_path / "from_port", dtype=torch.float64)
    assert notes == []
    assert vqvae.config == ours.vqvae.config
    back = {"vqvae": vqvae, **{f"prior {l}": p for l, p in priors.items()}}
    before = {"vqvae": ours.vqvae, **{f"prior {l}": ours.prior(l) for l in ours.levels}}
    for name, model in before.items():
        assert back[name].config == model.config, name
        a, b = model.state_dict(), back[name].state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{name}: {k}"


def test_bundled_family_through_the_port_keeps_its_configs(tmp_path):
    """A family whose configs the port's fields cannot all carry (here the conditioners' key
    layout, cond_c_res) comes back the same: the port keeps our own entry in config.json."""
    tiny = load("tiny")
    tiny.save_hf(tmp_path / "to_port")
    JukeboxModel.from_pretrained(tmp_path / "to_port").save_pretrained(tmp_path / "from_port",
                                                                         safe_serialization=False)
    back = load(tmp_path / "from_port")
    for level in tiny.levels:
        assert back.prior(level).config == tiny.prior(level).config
        a, b = tiny.prior(level).state_dict(), back.prior(level).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
