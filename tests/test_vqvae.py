"""VQ-VAE parity with the original (tiny fixture) and input validation."""
from __future__ import annotations

import pytest
import torch

from conftest import checkpoint_path, io, load_vqvae, rel_err
from fastjukebox import VQVAE, VQVAEConfig
from fastjukebox.checkpoint import load_vqvae as load_vqvae_file

LEVELS = (0, 1, 2)


@pytest.fixture(scope="module")
def fx():
    return io("tiny_vqvae")


@pytest.fixture(scope="module")
def codes64(fx):
    return load_vqvae(torch.float64).encode(fx["x"])


@pytest.mark.parametrize("level", LEVELS)
def test_encode_codes_identical(fx, codes64, level):
    got, ref = codes64[level], fx[f"codes_level{level}"]
    assert got.dtype == torch.int64
    assert got.shape == ref.shape == (2, 8192 // (8, 32, 128)[level])
    mismatches = int((got != ref).sum())
    assert mismatches == 0, f"level {level}: {mismatches} codes differ from the original"


def test_encode_accepts_rank2_audio(fx, codes64):
    flat = load_vqvae(torch.float64).encode(fx["x"][..., 0])
    for level in LEVELS:
        assert torch.equal(flat[level], codes64[level])


def test_encode_subset_of_levels(fx, codes64):
    got = load_vqvae(torch.float64).encode(fx["x"], levels=(2,))
    assert got[0] is None and got[1] is None
    assert torch.equal(got[2], codes64[2])


@pytest.mark.parametrize("level", LEVELS)
def test_decode_parity_float64(fx, level):
    audio = load_vqvae(torch.float64).decode(fx[f"codes_level{level}"], level)
    ref = fx[f"decoded_level{level}"]
    assert audio.dtype == torch.float64
    assert audio.shape == ref.shape[:2]
    assert rel_err(audio, ref[..., 0]) <= 1e-9


@pytest.mark.parametrize("level", LEVELS)
def test_decode_parity_float32(fx, level):
    vq = load_vqvae(torch.float32)
    assert next(vq.parameters()).dtype == torch.float32
    audio = vq.decode(fx[f"codes_level{level}"], level)
    assert audio.dtype == torch.float32
    assert rel_err(audio, fx[f"decoded_level{level}"][..., 0]) <= 1e-4


def test_config_read_from_checkpoint():
    c = load_vqvae(torch.float64).config
    assert c.hop_lengths == (8, 32, 128)
    assert (c.emb_width, c.l_bins, c.width, c.depth) == (16, 64, 8, 2)
    assert c.multipliers == (2, 1, 1)


def test_from_preset_on_meta():
    with torch.device("meta"):
        vq = VQVAE.from_preset("vqvae")
    assert vq.config == VQVAEConfig()
    tensors = list(vq.parameters()) + list(vq.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert vq.hop_lengths == (8, 32, 128)
    assert tuple(vq.bottleneck.level_blocks[0].k.shape) == (2048, 64)


def test_float32_load_of_float64_request_differs_only_in_dtype():
    vq32 = load_vqvae_file(checkpoint_path("tiny_vqvae"))
    vq64 = load_vqvae(torch.float64)
    for (k32, v32), (k64, v64) in zip(vq32.state_dict().items(), vq64.state_dict().items()):
        assert k32 == k64
        assert v32.dtype == torch.float32 and v64.dtype == torch.float64
        assert torch.equal(v32.double(), v64), k32  # the stored weights are float32


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, match", [
    ((1024,), r"rank 1"),
    ((1, 2, 1024, 1), r"rank 4"),
    ((2, 1024, 2), r"mono"),
])
def test_encode_rejects_bad_shapes(gen, shape, match):
    audio = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    with pytest.raises(ValueError, match=match):
        load_vqvae(torch.float64).encode(audio)


def test_encode_rejects_integer_audio():
    audio = torch.randint(-100, 100, (2, 1024, 1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"floating point"):
        load_vqvae(torch.float64).encode(audio)


@pytest.mark.parametrize("length", [1, 100, 127])
def test_encode_rejects_too_short_audio(gen, length):
    audio = torch.rand(2, length, 1, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"{length} samples.*at least 128"):
        load_vqvae(torch.float64).encode(audio)


def test_encode_shortest_audio_gives_one_top_code(gen):
    audio = torch.rand(2, 128, 1, generator=gen, dtype=torch.float64) * 2 - 1
    codes = load_vqvae(torch.float64).encode(audio)
    assert [tuple(c.shape) for c in codes] == [(2, 16), (2, 4), (2, 1)]


@pytest.mark.parametrize("bad", [-1, 64, 1000])
def test_decode_rejects_out_of_range_codes(fx, bad):
    codes = fx["codes_level1"].clone()
    codes[1, 7] = bad
    with pytest.raises(ValueError, match=r"codes must be in \[0, 64\)"):
        load_vqvae(torch.float64).decode(codes, 1)


def test_decode_rejects_float_codes(fx):
    with pytest.raises(ValueError, match=r"integer"):
        load_vqvae(torch.float64).decode(fx["codes_level2"].double(), 2)


def test_decode_rejects_wrong_rank_codes(fx):
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        load_vqvae(torch.float64).decode(fx["codes_level2"][0], 2)


@pytest.mark.parametrize("level", [-1, 3, 7])
def test_decode_rejects_bad_level(fx, level):
    with pytest.raises(ValueError, match=r"level must be in 0\.\.2"):
        load_vqvae(torch.float64).decode(fx["codes_level2"], level)
