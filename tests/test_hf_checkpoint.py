"""Hugging Face ``JukeboxModel`` directories without transformers: round trips, shards, tied
weights stored once, hub-style configs of the released architectures, and named errors.
(The comparison with the port itself is ``test_hf_port_parity.py``.)"""
from __future__ import annotations

import json
import shutil
import sys
import warnings

import pytest
import torch

from fastjukebox.bundle import ConfigNote, load
from fastjukebox.checkpoint import CheckpointError, meta_model
from fastjukebox.cli import main
from fastjukebox.config import PRESETS
from fastjukebox.hf_checkpoint import configs_from_hf, hf_config, hf_key, is_hf_directory, read_hf_weights


@pytest.fixture(scope="module")
def tiny():
    return load("tiny")


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    return tiny.save_hf(tmp_path_factory.mktemp("hf") / "tiny_hf")


def _assert_same_models(a, b):
    assert a.levels == b.levels
    assert a.vqvae.config == b.vqvae.config
    pairs = [(a.vqvae, b.vqvae)] + [(a.prior(l), b.prior(l)) for l in a.levels]
    for x, y in pairs:
        assert x.config == y.config
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        for k in sx:
            assert sx[k].dtype == sy[k].dtype and torch.equal(sx[k], sy[k]), k


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_round_trip_is_bit_identical_without_transformers(tiny, hf_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # any import of it would fail
    assert is_hf_directory(hf_dir)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "pytorch_model.bin"]
    d = json.loads((hf_dir / "config.json").read_text())
    assert d["model_type"] == "jukebox" and d["nb_priors"] == 3
    # the port's prior order: priors.0 is the top level
    assert d["prior_config_list"][0]["n_ctx"] == tiny.prior(2).config.n_ctx
    assert all(p["mask"] for p in d["prior_config_list"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same_models(tiny, load(hf_dir))


def test_the_ports_key_names():
    assert hf_key("bottleneck.level_blocks.1.k", "vqvae") == "bottleneck.level_blocks.1.codebook"
    assert hf_key("encoders.0.level_blocks.0.model.1.1.model.2.model.3.bias", "vqvae") == \
        "encoders.0.level_blocks.0.downsample_block.3.resnet_block.2.conv1d_2.bias"
    assert hf_key("encoders.0.level_blocks.0.model.3.weight", "vqvae") == "encoders.0.level_blocks.0.proj_out.weight"
    assert hf_key("decoders.1.level_blocks.1.model.0.weight", "vqvae") == "decoders.1.level_blocks.1.proj_in.weight"
    assert hf_key("decoders.1.level_blocks.1.model.2.1.weight", "vqvae") == \
        "decoders.1.level_blocks.1.upsample_block.3.weight"
    assert hf_key("conditioner_blocks.0.cond.model.1.0.blocks.4.model.1.weight", "prior") == \
        "conditioner_blocks.upsampler.upsample_block.0.resnet_block.4.conv1d_1.weight"
    assert hf_key("y_emb.artist_emb.emb.weight", "prior") == "metadata_embedding.artist_emb.weight"
    assert hf_key("y_emb.total_length_emb.emb.weight", "prior") == "metadata_embedding.total_length_emb.emb.weight"
    assert hf_key("prior.transformer._attn_mods.3.ln_0.bias", "prior") == \
        "prior.transformer._attn_mods.3.layer_norm_0.bias"
    assert hf_key("prior.transformer._attn_mods.3.attn.c_enc_kv.w", "prior") == \
        "prior.transformer._attn_mods.3.attn.c_enc_kv.weight"
    assert hf_key("prior.x_out.weight", "prior") == "prior.fc_proj_out.weight"
    assert hf_key("prime_prior.x_emb.weight", "prior") == "encoder.embed_tokens.weight"
    assert hf_key("prime_state_proj.b", "prior") == "encoder.proj_in.bias"
    assert hf_key("prime_state_ln.weight", "prior") == "encoder.final_layer_norm.weight"
    assert hf_key("prime_x_out.weight", "prior") == "encoder.lm_head.weight"


@pytest.mark.parametrize("name", ["upsampler_level_0", "upsampler_level_1", "prior_5b", "prior_5b_lyrics",
                                  "prior_1b_lyrics", "vqvae"])
def test_every_released_key_has_one_distinct_name(name):
    cfg = PRESETS[name]
    kind = "vqvae" if name == "vqvae" else "prior"
    keys = list(meta_model(kind, cfg).state_dict())
    names = {hf_key(k, kind) for k in keys}
    assert len(names) == len(keys)


def test_sharded_directory(tiny, tmp_path):
    out = tiny.save_hf(tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted(p.name for p in out.glob("pytorch_model-*.bin"))
    assert len(shards) > 2 and not (out / "pytorch_model.bin").exists()
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    _assert_same_models(tiny, load(out))


def test_safetensors_with_tied_weights_stored_once(tiny, hf_dir, tmp_path):
    from safetensors.torch import save_file
    out = tmp_path / "st"
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out)
    sd = read_hf_weights(hf_dir)
    tied = [k for k in sd if k.endswith("prior.fc_proj_out.weight")
            and sd[k].data_ptr() == sd[k.replace("fc_proj_out", "embed_tokens")].data_ptr()]
    assert tied   # the upsamplers' output layer is their embedding
    save_file({k: v.contiguous() for k, v in sd.items() if k not in tied}, out / "model.safetensors")
    _assert_same_models(tiny, load(out))


def test_cli_convert_both_ways(tiny, hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "ours")]) == 0
    assert "wrote bundle" in capsys.readouterr().out
    assert (tmp_path / "ours" / "prior_level_2" / "model.safetensors").exists()
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert "Hugging Face" in capsys.readouterr().out
    _assert_same_models(tiny, load(tmp_path / "hf2"))
    assert main(["info", str(tmp_path / "hf2")]) == 0
    assert "prior level 2" in capsys.readouterr().out


def _hub_style(config: dict) -> dict:
    """A config as the port writes it: no fastjukebox entry, the VQ-VAE's config saved as its
    difference from the port's defaults, and top-level values that differ from the original's
    (the port's default min_duration of 0, its default genre count)."""
    from fastjukebox.hf_checkpoint import HF_VQVAE_DEFAULTS
    d = {k: v for k, v in config.items() if k != "fastjukebox"}
    d["vqvae_config"] = {k: v for k, v in d["vqvae_config"].items() if HF_VQVAE_DEFAULTS.get(k) != v}
    d.update(min_duration=0, max_nb_genres=5)
    return d


@pytest.mark.parametrize("top", ["prior_5b", "prior_5b_lyrics", "prior_1b_lyrics"])
def test_released_architectures_are_built_from_the_presets_and_differences_are_named(top):
    vq = PRESETS["vqvae"]
    priors = {0: PRESETS["upsampler_level_0"], 1: PRESETS["upsampler_level_1"], 2: PRESETS[top]}
    config, notes = hf_config(vq, priors)
    # the port gives the upsamplers the top prior's genre count (1b_lyrics: 1, the upsamplers: 5)
    assert any("genre count" in n for n in notes) == (top == "prior_1b_lyrics")
    got_vq, got, notes = configs_from_hf(_hub_style(config))
    assert got_vq == vq and got == priors
    (note,) = [n for n in notes if "level-2" in n]
    released = PRESETS[top]
    assert top in note and f"min_duration 0.0 (released: {released.min_duration})" in note
    if released.max_bow_genre_size != 5:
        assert f"max_bow_genre_size 5 (released: {released.max_bow_genre_size})" in note


def test_the_top_level_fields_override_the_priors_as_in_the_port(hf_dir, tmp_path):
    def edit(d):
        del d["fastjukebox"]
        d.update(max_nb_genres=2, sampling_rate=22050)
        for p in d["prior_config_list"]:
            p.update(max_nb_genres=9, sampling_rate=16000)
    jb = load(_edit_config(hf_dir, tmp_path, edit))
    assert jb.sr == 22050
    assert all(jb.prior(l).config.max_bow_genre_size == 2 and jb.prior(l).config.sr == 22050 for l in jb.levels)


def test_hub_style_directory_loads_with_notes(tiny, hf_dir, tmp_path, capsys):
    out = _copy(hf_dir, tmp_path / "hub")
    d = json.loads((out / "config.json").read_text())
    del d["fastjukebox"]
    for p in d["prior_config_list"]:
        p["mask"] = False
    (out / "config.json").write_text(json.dumps(d))
    with pytest.warns(ConfigNote, match="mask is false"):
        jb = load(out)
    assert all(torch.equal(jb.prior(l).prior.x_emb.weight, tiny.prior(l).prior.x_emb.weight) for l in tiny.levels)
    assert main(["convert", str(out), str(tmp_path / "ours")]) == 0
    err = capsys.readouterr().err
    assert err.count("note: ") == 3 and "mask is false" in err


# --- named errors ---------------------------------------------------------------------------------

def _edit_config(hf_dir, tmp_path, edit):
    out = _copy(hf_dir, tmp_path / "edited")
    d = json.loads((out / "config.json").read_text())
    edit(d)
    (out / "config.json").write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["prior_config_list"][0].update(hidden_size=48), "does not match"),
    (lambda d: d.pop("fastjukebox") and d["prior_config_list"][1].update(num_layers=5), "does not match"),
    (lambda d: d["prior_config_list"][0].update(attention_pattern="summary_attention"), "attention_pattern"),
    (lambda d: d.update(nb_priors=2), "nb_priors"),
    (lambda d: d["vqvae_config"].update(nb_discrete_codes=99), "music_vocab_size"),
    (lambda d: d.update(prior_config_list="x"), "prior_config_list"),
])
def test_mismatched_config_is_a_named_error(hf_dir, tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        load(_edit_config(hf_dir, tmp_path, edit))


def test_corrupt_weights_are_a_named_error(hf_dir, tmp_path):
    out = _copy(hf_dir, tmp_path / "corrupt")
    data = (out / "pytorch_model.bin").read_bytes()
    (out / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(out)
    (out / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load(out)
    (out / "config.json").write_text("{not json")
    assert not is_hf_directory(out)


def test_missing_shard_and_stray_tensor_are_named_errors(tiny, tmp_path):
    out = tiny.save_hf(tmp_path / "sharded", max_shard_bytes=100_000)
    sorted(out.glob("pytorch_model-*.bin"))[1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(out)
    one = tiny.save_hf(tmp_path / "one")
    sd = torch.load(one / "pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = torch.zeros(2)
    torch.save(sd, one / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load(one)


def test_pickled_objects_are_refused(hf_dir, tmp_path):
    out = _copy(hf_dir, tmp_path / "pickle")
    torch.save({"vqvae.x": torch.zeros(1), "evil": ConfigNote("x")}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load(out)


def test_what_the_port_cannot_express_is_a_named_error(tiny, tmp_path):
    from fastjukebox.bundle import Jukebox
    partial = Jukebox(tiny.vqvae, {l: tiny.prior(l) for l in (1, 2)})
    with pytest.raises(CheckpointError, match="every level"):
        partial.save_hf(tmp_path / "x")
    assert not (tmp_path / "x").exists()
