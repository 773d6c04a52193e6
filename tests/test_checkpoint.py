"""Checkpoint conversion round trips, bundles, and errors for bad files and bad prior inputs."""
from __future__ import annotations

import collections
import json
import random
import re
import shutil
import sys
import types

import pytest
import torch

from conftest import PRIOR_FIXTURES, checkpoint_path, hps_path, io, load_prior, prior_inputs
from fastjukebox import Prior
from fastjukebox.bundle import Jukebox, load
from fastjukebox.checkpoint import CheckpointError, load_component, save_component
from fastjukebox.checkpoint import load_prior as load_prior_file, load_vqvae as load_vqvae_file
from fastjukebox.cli import main

ROUND_TRIP = ("tiny_prior_5b", "tiny_prior_1b_lyrics", "tiny_prior_5b_lyrics", "tiny_upsampler_level_0")


def _logits(prior: Prior, name: str) -> torch.Tensor:
    z, zc, y = prior_inputs(name)
    with torch.no_grad():
        return prior.logits(z, zc, y)


@pytest.fixture(scope="module")
def ref_logits():
    """float32 logits of the fixture checkpoints as loaded from the original files."""
    return {name: _logits(load_prior(name, torch.float32), name) for name in PRIOR_FIXTURES}


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ROUND_TRIP)
def test_save_component_round_trip(tmp_path, name, ref_logits):
    src = load_prior(name, torch.float32)
    out = save_component(src, tmp_path / name)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "prior"
    back = load_prior_file(out)
    assert back.config == src.config
    assert back.prior.tied == src.prior.tied
    assert torch.equal(_logits(back, name), ref_logits[name])


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_cli_convert_both_ways(tmp_path, name, capsys, ref_logits):
    ours = tmp_path / "ours"
    assert main(["convert", str(checkpoint_path(name)), str(ours)]) == 0
    assert "wrote prior" in capsys.readouterr().out
    assert torch.equal(_logits(load_prior_file(ours), name), ref_logits[name])

    back = tmp_path / "x.pth.tar"
    assert main(["convert", str(ours), str(back)]) == 0
    reloaded = load_prior_file(back, hps_path(name))
    assert torch.equal(_logits(reloaded, name), ref_logits[name])
    # the original layout: same keys as the fixture file (tied x_out listed under both names)
    saved = torch.load(back, weights_only=True)
    fixture = torch.load(checkpoint_path(name), weights_only=True)
    assert list(saved["model"]) == list(fixture["model"])
    for k, v in fixture["model"].items():
        assert torch.equal(saved["model"][k], v), k


def test_tied_weight_stored_once(tmp_path):
    from safetensors.torch import load_file
    out = save_component(load_prior("tiny_prior_1b_lyrics", torch.float32), tmp_path / "p")
    sd = load_file(out / "model.safetensors")
    assert "prior.x_emb.weight" in sd and "prior.x_out.weight" not in sd
    back = load_prior_file(out)
    assert back.prior.x_out.weight is back.prior.x_emb.weight


def test_convert_with_dtype(tmp_path):
    out = tmp_path / "bf16"
    assert main(["convert", str(checkpoint_path("tiny_prior_5b")), str(out), "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    p = load_prior_file(out, dtype=torch.float64)
    ref = load_prior("tiny_prior_5b", torch.float64)
    for (k, a), (_, b) in zip(p.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16).double()), k


@pytest.mark.parametrize("name", PRIOR_FIXTURES + ("tiny_vqvae",))
def test_original_state_dict_keys(name):
    model = load_vqvae_or_prior(name)
    fixture = torch.load(checkpoint_path(name), weights_only=True)["model"]
    sd = model.original_state_dict()
    assert list(sd) == list(fixture)
    for k, v in fixture.items():
        assert torch.equal(sd[k], v), k


def load_vqvae_or_prior(name: str):
    if name == "tiny_vqvae":
        return load_vqvae_file(checkpoint_path(name))
    return load_prior(name, torch.float32)


def test_vqvae_component_round_trip(tmp_path, gen):
    src = load_vqvae_file(checkpoint_path("tiny_vqvae"))
    out = tmp_path / "vq"
    assert main(["convert", str(checkpoint_path("tiny_vqvae")), str(out)]) == 0
    back = load_vqvae_file(out)
    assert back.config == src.config
    x = io("tiny_vqvae")["x"]
    assert all(torch.equal(a, b) for a, b in zip(back.encode(x), src.encode(x)))


def test_checkpoint_with_module_prefix(tmp_path):
    """Files may prefix keys with ``module.`` and carry extra entries besides ``model``."""
    ckpt = torch.load(checkpoint_path("tiny_prior_5b"), weights_only=True)
    path = tmp_path / "prior_level_2.pth.tar"
    torch.save({"model": {f"module.{k}": v for k, v in ckpt["model"].items()}, "step": 3, "opt": None,
                "hps": ckpt["hps"]}, path)
    p = load_prior_file(path)
    assert torch.equal(_logits(p, "tiny_prior_5b"), _logits(load_prior("tiny_prior_5b", torch.float32), "tiny_prior_5b"))


def test_hyperparameter_class_refused(tmp_path, monkeypatch):
    """hps pickled as a class (the original writes a plain dict) is refused like any class."""
    jukebox = types.ModuleType("jukebox")
    hparams = types.ModuleType("jukebox.hparams")

    class Hyperparams(dict):
        pass

    Hyperparams.__module__ = "jukebox.hparams"
    Hyperparams.__qualname__ = "Hyperparams"
    hparams.Hyperparams = Hyperparams
    jukebox.hparams = hparams
    monkeypatch.setitem(sys.modules, "jukebox", jukebox)
    monkeypatch.setitem(sys.modules, "jukebox.hparams", hparams)
    ckpt = torch.load(checkpoint_path("tiny_prior_5b"), weights_only=True)
    path = tmp_path / "prior_level_2.pth.tar"
    torch.save({"model": ckpt["model"], "hps": Hyperparams(ckpt["hps"])}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*jukebox\.hparams\.Hyperparams"):
        load_prior_file(path)


def test_vqvae_file_as_prior_without_hps():
    with pytest.raises(CheckpointError, match=r"hyperparameters do not describe a prior"):
        load_prior_file(checkpoint_path("tiny_vqvae"))


# --- bundles ----------------------------------------------------------------------------------

BUNDLE = {"vqvae": "tiny_vqvae", "prior_level_0": "tiny_upsampler_level_0",
          "prior_level_1": "tiny_upsampler_level_1", "prior_level_2": "tiny_prior_5b"}


def _assert_same_family(a: Jukebox, b: Jukebox):
    assert a.levels == b.levels == [0, 1, 2]
    for m, n in [(a.vqvae, b.vqvae)] + [(a.prior(l), b.prior(l)) for l in a.levels]:
        assert m.config == n.config
        sa, sb = m.state_dict(), n.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _check_family(jb: Jukebox):
    assert isinstance(jb, Jukebox)
    assert jb.levels == [0, 1, 2]
    assert jb.sr == 44100
    assert jb.vqvae.config.l_bins == 64
    for level, name in ((0, "tiny_upsampler_level_0"), (1, "tiny_upsampler_level_1"), (2, "tiny_prior_5b")):
        assert jb.prior(level).config.level == level
        assert torch.equal(_logits(jb.prior(level), name), _logits(load_prior(name, torch.float32), name))
    with pytest.raises(ValueError, match=r"no prior for level 3"):
        jb.prior(3)


def test_bundle_directory_load_and_save(tmp_path):
    d = tmp_path / "bundle"
    d.mkdir()
    save_component(load_vqvae_file(checkpoint_path("tiny_vqvae")), d / "vqvae")
    for comp, name in BUNDLE.items():
        if comp != "vqvae":
            save_component(load_prior(name, torch.float32), d / comp)
    jb = load(d)
    _check_family(jb)
    out = jb.save(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == sorted(BUNDLE)
    _assert_same_family(jb, load(out))


def test_release_layout_directory(tmp_path, capsys):
    d = tmp_path / "release"
    d.mkdir()
    for comp, name in BUNDLE.items():
        shutil.copy(checkpoint_path(name), d / f"{comp}.pth.tar")
    jb = load(d)
    _check_family(jb)
    # convert a whole release directory into a bundle directory
    out = tmp_path / "converted"
    assert main(["convert", str(d), str(out)]) == 0
    assert "wrote bundle" in capsys.readouterr().out
    _assert_same_family(jb, load(out))


def test_bundle_load_dtype(tmp_path):
    d = tmp_path / "release"
    d.mkdir()
    for comp, name in BUNDLE.items():
        shutil.copy(checkpoint_path(name), d / f"{comp}.pth.tar")
    jb = load(d, dtype=torch.float64)
    assert {p.dtype for p in jb.parameters()} == {torch.float64}


def test_bundle_without_vqvae(tmp_path):
    d = tmp_path / "novq"
    d.mkdir()
    shutil.copy(checkpoint_path("tiny_prior_5b"), d / "prior_level_2.pth.tar")
    with pytest.raises(CheckpointError, match=r"no vqvae/ or vqvae.pth.tar"):
        load(d)


def test_bundle_without_priors(tmp_path):
    d = tmp_path / "onlyvq"
    d.mkdir()
    shutil.copy(checkpoint_path("tiny_vqvae"), d / "vqvae.pth.tar")
    with pytest.raises(CheckpointError, match=r"no prior_level_\* components"):
        load(d)


def test_bundle_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"is not a model directory"):
        load(tmp_path / "nowhere")


def test_bundle_prior_at_wrong_level(tmp_path):
    d = tmp_path / "swapped"
    d.mkdir()
    shutil.copy(checkpoint_path("tiny_vqvae"), d / "vqvae.pth.tar")
    shutil.copy(checkpoint_path("tiny_upsampler_level_1"), d / "prior_level_0.pth.tar")
    with pytest.raises(ValueError, match=r"prior given for level 0 models level 1"):
        load(d)


# --- bad files --------------------------------------------------------------------------------

class _Dict(collections.OrderedDict):
    """An OrderedDict subclass: a global the safe unpickler must refuse."""


class _Payload:
    pass


def test_truncated_file(tmp_path):
    data = checkpoint_path("tiny_prior_5b").read_bytes()
    bad = tmp_path / "truncated.pth.tar"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth\.tar: not a readable checkpoint \(truncated or corrupt\)"):
        load_prior_file(bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(tmp_path, seed):
    bad = tmp_path / "random.pth.tar"
    bad.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError, match=r"random\.pth\.tar: not a readable checkpoint"):
        load_prior_file(bad)


def test_other_architecture_lists_missing_and_unexpected():
    with pytest.raises(CheckpointError) as e:
        load_prior_file(checkpoint_path("tiny_upsampler_level_0"), hps_path("tiny_prior_5b"))
    msg = str(e.value)
    assert "does not match" in msg
    assert re.search(r"\d+ missing \(first: y_emb\.total_length_emb\.emb\.weight", msg)
    assert re.search(r"\d+ unexpected \(first: conditioner_blocks\.0\.", msg)


def test_other_architecture_lists_mis_shaped():
    with pytest.raises(CheckpointError, match=r"mis-shaped \(first: prior\.pos_emb\.pos_emb: checkpoint \(80, 32\) "
                                              r"vs model \(64, 32\)"):
        load_prior_file(checkpoint_path("tiny_prior_1b_lyrics"), hps_path("tiny_prior_5b"))


def test_vqvae_file_as_prior():
    with pytest.raises(CheckpointError, match=r"missing.*unexpected \(first: encoders\.0\."):
        load_prior_file(checkpoint_path("tiny_vqvae"), hps_path("tiny_prior_5b"))


def test_untied_output_where_tied_expected(tmp_path):
    ckpt = torch.load(checkpoint_path("tiny_upsampler_level_0"), weights_only=True)
    ckpt["model"]["prior.x_out.weight"] = ckpt["model"]["prior.x_out.weight"] + 1.0
    bad = tmp_path / "untied.pth.tar"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"prior\.x_out\.weight should equal prior\.x_emb\.weight"):
        load_prior_file(bad)


def test_dict_subclass_refused(tmp_path):
    sd = torch.load(checkpoint_path("tiny_prior_5b"), weights_only=True)["model"]
    bad = tmp_path / "subclass.pth.tar"
    torch.save({"model": _Dict(sd)}, bad)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*_Dict"):
        load_prior_file(bad)


def test_foreign_object_refused(tmp_path):
    sd = torch.load(checkpoint_path("tiny_prior_5b"), weights_only=True)["model"]
    bad = tmp_path / "payload.pth.tar"
    torch.save({"model": sd, "x": _Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*_Payload"):
        load_prior_file(bad)


def test_non_tensor_state_dict_entry(tmp_path):
    sd = dict(torch.load(checkpoint_path("tiny_prior_5b"), weights_only=True)["model"])
    sd["prior.note"] = "hello"
    bad = tmp_path / "str.pth.tar"
    torch.save({"model": sd}, bad)
    with pytest.raises(CheckpointError, match=r"not tensors: \['prior\.note'\]"):
        load_prior_file(bad, hps_path("tiny_prior_5b"))


def test_not_a_state_dict(tmp_path):
    bad = tmp_path / "list.pth.tar"
    torch.save([torch.zeros(3)], bad)
    with pytest.raises(CheckpointError, match=r"expected a dict with a 'model' state dict, got list"):
        load_prior_file(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"absent\.pth\.tar: no such checkpoint file"):
        load_prior_file(tmp_path / "absent.pth.tar")


def test_missing_file_cli(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "absent.pth.tar"), str(tmp_path / "out")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_directory_without_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"a directory without config\.json"):
        load_prior_file(d)


def _component_dir(tmp_path):
    return save_component(load_prior("tiny_prior_5b", torch.float32), tmp_path / "comp")


def test_corrupt_safetensors(tmp_path):
    d = _component_dir(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_prior_file(d)


def test_garbage_safetensors(tmp_path):
    d = _component_dir(tmp_path)
    (d / "model.safetensors").write_bytes(random.Random(5).randbytes(2048))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_prior_file(d)


def test_missing_safetensors(tmp_path):
    d = _component_dir(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_prior_file(d)


def test_invalid_config_json(tmp_path):
    d = _component_dir(tmp_path)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        load_prior_file(d)


def test_component_of_other_kind(tmp_path):
    d = _component_dir(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a 'prior' component, expected 'vqvae'"):
        load_vqvae_file(d)


def test_component_weights_of_other_architecture(tmp_path):
    d = _component_dir(tmp_path)
    other = save_component(load_prior("tiny_upsampler_level_0", torch.float32), tmp_path / "other")
    shutil.copy(other / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match.*missing.*unexpected"):
        load_prior_file(d)


def test_no_hps_and_no_matching_preset(tmp_path):
    ckpt = torch.load(checkpoint_path("tiny_prior_5b"), weights_only=True)
    bad = tmp_path / "nohps.pth.tar"
    torch.save({"model": ckpt["model"]}, bad)
    with pytest.raises(CheckpointError, match=r"has no hyperparameters and matches no released prior"):
        load_component(bad, "prior")


# --- bad prior inputs -------------------------------------------------------------------------

def _up():
    return load_prior("tiny_upsampler_level_0", torch.float64), *prior_inputs("tiny_upsampler_level_0")


def _top():
    return load_prior("tiny_prior_5b", torch.float64), *prior_inputs("tiny_prior_5b")


@pytest.mark.parametrize("bad", [-1, 64, 10_000])
def test_logits_token_out_of_range(bad):
    prior, z, _, y = _top()
    z = z.clone()
    z[0, 5] = bad
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
        prior.logits(z, None, y)


def test_logits_tokens_longer_than_window():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"tokens has 65 positions but this prior's window is n_ctx=64"):
        prior.logits(torch.cat([z, z[:, :1]], dim=1), None, y)


def test_logits_empty_tokens():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"tokens is empty"):
        prior.logits(z[:, :0], None, y)


def test_logits_float_tokens():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor, got torch.float32"):
        prior.logits(z.float(), None, y)


def test_logits_wrong_rank_tokens():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"tokens must have rank 2"):
        prior.logits(z[0], None, y)


@pytest.mark.parametrize("cols", [8, 10, 25])
def test_logits_labels_of_wrong_length(cols):
    prior, z, _, y = _top()
    bad = torch.zeros(2, cols, dtype=torch.long)
    bad[:, : min(cols, 9)] = y[:, : min(cols, 9)]
    with pytest.raises(ValueError, match=rf"labels must have 4 \+ 5 genres \+ 0 lyric tokens = 9 columns, got {cols}"):
        prior.logits(z, None, bad)


def test_logits_labels_lyrics_of_wrong_length():
    prior = load_prior("tiny_prior_5b_lyrics", torch.float64)
    z, _, y = prior_inputs("tiny_prior_5b_lyrics")
    with pytest.raises(ValueError, match=r"= 25 columns, got 24"):
        prior.logits(z, None, y[:, :-1])


def test_logits_lyric_ids_out_of_range():
    prior = load_prior("tiny_prior_1b_lyrics", torch.float64)
    z, _, y = prior_inputs("tiny_prior_1b_lyrics")
    y = y.clone()
    y[1, -1] = 79
    with pytest.raises(ValueError, match=r"lyric tokens must be in \[0, 79\)"):
        prior.logits(z, None, y)


def test_logits_float_labels():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"labels must be an integer tensor"):
        prior.logits(z, None, y.double())


def test_logits_missing_labels():
    prior, z, _, _ = _top()
    with pytest.raises(ValueError, match=r"this prior needs labels: \(N, 9\) rows"):
        prior.logits(z, None, None)


def test_logits_bad_artist():
    prior, z, _, y = _top()
    y = y.clone()
    y[0, 3] = 20
    with pytest.raises(ValueError, match=r"artist id must be in \[0, 20\)"):
        prior.logits(z, None, y)


def test_logits_missing_upper_codes():
    prior, z, _, y = _up()
    with pytest.raises(ValueError, match=r"an upsampler needs the level-1 codes of its window"):
        prior.logits(z, None, y)


@pytest.mark.parametrize("n", [15, 17, 64])
def test_logits_upper_codes_of_wrong_length(n):
    prior, z, zc, y = _up()
    upper = zc[:, :1].repeat(1, n)
    with pytest.raises(ValueError, match=rf"upper codes must cover the window: 16 level-1 codes, got {n}"):
        prior.logits(z, upper, y)


def test_logits_upper_codes_out_of_range():
    prior, z, zc, y = _up()
    zc = zc.clone()
    zc[1, 3] = 64
    with pytest.raises(ValueError, match=r"upper codes must be in \[0, 64\)"):
        prior.logits(z, zc, y)


def test_logits_upper_codes_for_top_level():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"top-level prior takes no upper-level codes"):
        prior.logits(z, z[:, :16], y)


def test_logits_batch_mismatch():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"tokens have batch 1 but the conditioning has batch 2"):
        prior.logits(z[:1], None, y)


def test_loss_needs_full_window():
    prior, z, _, y = _top()
    with pytest.raises(ValueError, match=r"the loss needs a full window of n_ctx=64 tokens"):
        prior.loss(z[:, :32], None, y)



def test_half_precision_load_keeps_layernorms_fp32():
    """bf16 loading converts the weights once; LayerNorm parameters stay fp32 (as the original
    keeps them), so a decode step casts no parameter. The step still runs and is finite."""
    import fastjukebox
    from fastjukebox.decoding import WindowDecoder
    from fastjukebox.layers import LayerNorm

    jb = fastjukebox.load("tiny", dtype=torch.bfloat16)
    prior = jb.prior(1)
    norms = [m for m in prior.modules() if isinstance(m, LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    ln_params = {id(p) for m in norms for p in m.parameters()}
    others = [p for p in prior.parameters() if id(p) not in ln_params]
    assert others and all(p.dtype == torch.bfloat16 for p in others)
    c = prior.config
    dec = WindowDecoder(prior, 2)
    upper = torch.randint(0, c.l_bins, (2, c.n_ctx // c.cond_downsample))
    labels = torch.tensor([[44100 * 4, 0, c.sample_length, 1, 2] + [-1] * (c.label_len - 5)] * 2)
    dec.begin(upper, labels if c.labels else None)
    logits = dec.step()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
