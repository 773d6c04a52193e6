"""The released architectures: state-dict layout, parameter counts, layer cycles, configs, CLI info."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import PRESET_NAMES, hps_path, meta_model, read_keys
from fastjukebox.attention import layer_patterns
from fastjukebox.cli import main
from fastjukebox.config import PRESETS, PriorConfig, VQVAEConfig, get_preset, resolve_config

# SPEC.md, section 2
SPEC_PARAMS = {
    "upsampler_level_0": 981_298_176,
    "upsampler_level_1": 981_298_176,
    "prior_5b": 5_060_452_800,
    "prior_5b_lyrics": 5_640_506_800,
    "prior_1b_lyrics": 942_643_200,
}
TIED = {"upsampler_level_0", "upsampler_level_1", "prior_1b_lyrics"}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_state_dict_keys_and_shapes(name):
    expected = read_keys(name)
    got = [(k, tuple(v.shape)) for k, v in meta_model(name).state_dict().items()]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"entry {i}: model has {g}, the original has {e}"


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_built_on_meta(name):
    m = meta_model(name)
    assert all(t.is_meta for t in list(m.parameters()) + list(m.buffers()))


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_parameter_counts(name):
    m = meta_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert n == SPEC_PARAMS[name]
    # the key list counts the tied output projection twice
    listed = sum(math.prod(s) for _, s in read_keys(name))
    tied = math.prod(m.prior.x_emb.weight.shape) if name in TIED else 0
    assert listed - tied == SPEC_PARAMS[name]
    assert m.prior.tied == (name in TIED)


def test_vqvae_parameter_count_matches_key_list():
    m = meta_model("vqvae")
    listed = sum(math.prod(s) for k, s in read_keys("vqvae") if not k.startswith("bottleneck."))
    assert sum(p.numel() for p in m.parameters()) == listed
    assert [k for k, _ in m.named_buffers()] == [f"bottleneck.level_blocks.{i}.k" for i in range(3)]


@pytest.mark.parametrize("name, head_dim, block_len, seq_len", [
    ("upsampler_level_0", 480, 64, 8192),
    ("prior_5b", 150, 64, 8192),
    ("prior_5b_lyrics", 150, 64, 8192),
    ("prior_1b_lyrics", 256, 102, 6528),
])
def test_derived_geometry(name, head_dim, block_len, seq_len):
    c = get_preset(name)
    assert (c.head_dim, c.block_len, c.seq_len) == (head_dim, block_len, seq_len)


def test_prime_len_1b():
    c = get_preset("prior_1b_lyrics")
    assert c.prime_len == 448
    assert c.bins == 79 + 2048


# --- layer cycles -----------------------------------------------------------------------------

def test_order_2_cycle():
    assert layer_patterns(2, 72) == ["block", "transpose", "prev_block"] * 24


def test_order_10_cycle():
    p = layer_patterns(10, 79)
    assert [d for d, x in enumerate(p) if x == "cross"] == list(range(18, 79, 10))
    rbt = ["block", "transpose", "prev_block"]
    assert p[:9] == rbt * 3
    for start in range(9, 79, 10):
        assert p[start:start + 10] == rbt * 3 + ["cross"]


def test_order_12_cycle():
    p = layer_patterns(12, 72)
    assert [d for d, x in enumerate(p) if x == "prime"] == [15, 31, 63]
    assert [d for d, x in enumerate(p) if x == "dense"] == [47]
    rbt = ["block", "transpose", "prev_block"]
    for d, x in enumerate(p):
        if d % 16 != 15:
            assert x == rbt[d % 3], d


def test_unsupported_order():
    with pytest.raises(ValueError, match=r"attn_order 5 is not supported"):
        layer_patterns(5, 3)


@pytest.mark.parametrize("name, order, depth", [
    ("upsampler_level_0", 2, 72), ("prior_5b", 2, 72), ("prior_5b_lyrics", 10, 79), ("prior_1b_lyrics", 12, 72),
])
def test_presets_use_the_cycles(name, order, depth):
    m = meta_model(name)
    assert m.prior.transformer.patterns == layer_patterns(order, depth)
    got = [blk.attn.pattern for blk in m.prior.transformer._attn_mods]
    assert got == layer_patterns(order, depth)


# --- configs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESET_NAMES)
def test_config_round_trip(name):
    cfg = PRESETS[name]
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON
    back = type(cfg).from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.to_dict() == d


def test_from_dict_rejects_unknown_fields():
    d = {**get_preset("prior_5b").to_dict(), "n_layer": 3}
    with pytest.raises(ValueError, match=r"unknown PriorConfig field.*n_layer"):
        PriorConfig.from_dict(d)


def test_resolve_preset_name():
    assert resolve_config("prior_5b", "prior") is PRESETS["prior_5b"]
    assert resolve_config("vqvae", "vqvae") == VQVAEConfig()


def test_resolve_fixture_json_and_dict():
    from_path = resolve_config(str(hps_path("tiny_prior_1b_lyrics")), "prior")
    from_pathlike = resolve_config(hps_path("tiny_prior_1b_lyrics"), "prior")
    hps = json.loads(hps_path("tiny_prior_1b_lyrics").read_text(encoding="utf-8"))
    from_dict = resolve_config(hps, "prior")
    assert from_path == from_pathlike == from_dict
    c = from_dict
    assert (c.level, c.n_ctx, c.width, c.depth, c.heads, c.blocks) == (2, 64, 32, 16, 2, 8)
    assert (c.lyrics, c.n_tokens, c.seq_len, c.block_len) == ("merged", 16, 80, 10)
    assert c.attn_order == hps["attn_order"]


def test_resolve_fixture_json_5b_lyrics_and_upsampler():
    c = resolve_config(hps_path("tiny_prior_5b_lyrics"), "prior")
    assert (c.lyrics, c.n_tokens, c.prime_width, c.prime_depth) == ("encoder", 16, 16, 2)
    assert layer_patterns(c.attn_order, c.depth)[-1] == "cross"
    u = resolve_config(hps_path("tiny_upsampler_level_1"), "prior")
    assert (u.level, u.is_top, u.cond_res_scale, u.cond_c_res) == (1, False, True, True)


def test_resolve_vqvae_json():
    c = resolve_config(hps_path("tiny_vqvae"), "vqvae")
    assert c.hop_lengths == (8, 32, 128)
    assert (c.emb_width, c.l_bins) == (16, 64)


def test_resolve_our_dict():
    d = {"kind": "prior", **get_preset("prior_1b_lyrics").to_dict()}
    assert resolve_config(d, "prior") == get_preset("prior_1b_lyrics")
    with pytest.raises(ValueError, match=r"describes a prior, expected a vqvae"):
        resolve_config(d, "vqvae")


@pytest.mark.parametrize("bad", ["prior_7b", "upsampler_level_2", "tiny_prior_5b"])
def test_resolve_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match=rf"'{bad}' is neither a preset .*prior_5b.* nor an existing JSON file"):
        resolve_config(bad, "prior")


def test_resolve_rejects_wrong_kind():
    with pytest.raises(ValueError, match=r"preset 'vqvae' is not a prior"):
        resolve_config("vqvae", "prior")
    with pytest.raises(ValueError, match=r"preset 'prior_5b' is not a vqvae"):
        resolve_config("prior_5b", "vqvae")


def test_get_preset_unknown():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; known presets: vqvae"):
        get_preset("nope")


# --- fastjukebox info -------------------------------------------------------------------------

def _info(capsys, name: str) -> str:
    assert main(["info", name]) == 0
    return capsys.readouterr().out


def _cache_bytes(out: str) -> dict[str, int]:
    found = dict(re.findall(r"KV cache per sample \((\w+)\): ([\d,]+) bytes", out))
    return {k: int(v.replace(",", "")) for k, v in found.items()}


def test_info_upsampler_kv_cache(capsys):
    out = _info(capsys, "upsampler_level_0")
    assert "981,298,176" in out
    b = _cache_bytes(out)
    assert set(b) == {"bf16", "fp16", "fp32"}
    assert b["fp16"] == b["bf16"] and b["fp32"] == 2 * b["fp16"]
    # Keys + values of one 8192-token window, fp16. Transpose layers must keep (nearly) the whole
    # window, so 24 layers x (8192 - 64) positions x 2 x 480 x 2 bytes is a floor; a cache that
    # keeps every position in every layer (72 x 8192 x 1920 bytes = 1.13e9) is ruled out.
    floor = 24 * (8192 - 64) * 2 * 480 * 2
    assert floor <= b["fp16"] <= 0.38 * 2 ** 30


@pytest.mark.parametrize("name", ["vqvae", "prior_5b", "prior_5b_lyrics", "prior_1b_lyrics", "upsampler_level_1"])
def test_info_runs(capsys, name):
    out = _info(capsys, name)
    if name == "vqvae":
        assert "hop lengths (8, 32, 128)" in out
        assert not _cache_bytes(out)
    else:
        assert f"{SPEC_PARAMS[name]:,}" in out
        b = _cache_bytes(out)
        assert 0 < b["fp16"] < b["fp32"]


def test_info_fixture_checkpoint(capsys):
    from conftest import checkpoint_path
    out = _info(capsys, str(checkpoint_path("tiny_prior_5b")))
    assert "prior level 2: n_ctx 64" in out
