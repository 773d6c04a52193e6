"""Hugging Face ``JukeboxModel`` directories (the transformers port), read and written.

A directory written by the port's ``save_pretrained`` holds one ``config.json``
(``model_type: "jukebox"``) for the VQ-VAE and every prior, and the weights of all of them in
``pytorch_model.bin`` (or shards ``pytorch_model-*.bin`` with ``pytorch_model.bin.index.json``,
or the ``model.safetensors`` equivalents). Reading it needs no transformers installation.

What differs from our layout:

* key names (:func:`hf_key` maps ours to the port's; the way back is the same table inverted
  over the architecture's keys): conv stacks as ``downsample_block`` / ``upsample_block`` /
  ``proj_in`` / ``proj_out`` / ``resnet_block.{d}.conv1d_{1,2}``, ``.k`` as ``.codebook``,
  ``y_emb`` as ``metadata_embedding``, ``x_emb`` / ``x_out`` as ``embed_tokens`` /
  ``fc_proj_out``, ``ln`` as ``layer_norm``, the lyric encoder (``prime_*``) under ``encoder.``,
  ``conditioner_blocks.0.cond`` as ``conditioner_blocks.upsampler``, ``.w`` / ``.b`` as
  ``.weight`` / ``.bias``;
* the port's ``priors.0`` is the top prior (our level ``levels - 1``);
* tied output / embedding weights are stored under both names in ``.bin`` files and may be
  stored once in safetensors files;
* hyperparameter names (:func:`configs_from_hf` / :func:`hf_config`); the port's nested
  ``vqvae_config`` is saved as a difference from its defaults, and ``JukeboxModel`` overwrites
  every prior's sampling rate, timing bins, durations, genre count and label switch with the
  top-level values, so those are read from the top level, as the port uses them.

A prior whose weights have the shapes of a released architecture (``config.PRESETS``) is built
from that preset: a hub snapshot's config may disagree with the original hyperparameters (such as
the timing range or the number of genres), and the original's values are the ones the weights
were trained with. Each disagreement is reported in the notes that :func:`read_hf` returns.

Directories we write carry our own configs under a ``fastjukebox`` entry of ``config.json`` as
well, so that a round trip restores them exactly; the port ignores the entry.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoint import CONFIG_NAME, CheckpointError, assign_weights, check_state_dict, meta_model, read_original
from .config import PRESETS, PriorConfig, VQVAEConfig
from .prior import Prior
from .vqvae import VQVAE

__all__ = ["is_hf_directory", "hf_key", "configs_from_hf", "hf_config", "read_hf", "read_hf_weights", "write_hf"]

HF_MODEL_TYPE = "jukebox"
HF_VERSION = "4.40.2"
OWN_ENTRY = "fastjukebox"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# The port's attention-pattern names and the original's attn_order numbers they stand for.
ATTENTION_PATTERNS = {0: "full_dense_attention", 2: "raw_column_previous_row_attention",
                      10: "large_separated_enc_dec_w_lyrics", 12: "enc_dec_with_lyrics"}

# The port's defaults, which fill what a saved config leaves out (its nested configs are saved
# as differences from them).
HF_MODEL_DEFAULTS: dict[str, Any] = dict(
    nb_priors=3, sampling_rate=44100, timing_dims=64, min_duration=0, max_duration=600.0, max_nb_genres=5,
    metadata_conditioning=True)
HF_VQVAE_DEFAULTS: dict[str, Any] = dict(
    act_fn="relu", nb_discrete_codes=2048, commit=0.02, conv_input_shape=1, conv_res_scale=False, embed_dim=64,
    hop_fraction=[0.125, 0.5, 0.5], levels=3, lmu=0.99, multipliers=[2, 1, 1], res_conv_depth=4, res_conv_width=32,
    res_convolution_multiplier=1, res_dilation_cycle=None, res_dilation_growth_rate=3, res_downs_t=[3, 2, 2],
    res_strides_t=[2, 2, 2], sample_length=1058304, init_scale=0.2, zero_out=False)
HF_PRIOR_DEFAULTS: dict[str, Any] = dict(
    act_fn="quick_gelu", level=0, alignment_head=2, alignment_layer=68, attention_multiplier=0.25,
    attention_pattern="enc_dec_with_lyrics", attn_dropout=0, attn_res_scale=False, blocks=64, conv_res_scale=None,
    num_layers=72, emb_dropout=0, encoder_config=None, encoder_loss_fraction=0.4, hidden_size=2048, init_scale=0.2,
    is_encoder_decoder=True, lyric_vocab_size=80, mask=False, max_duration=600, max_nb_genres=1, merged_decoder=True,
    metadata_conditioning=True, metadata_dims=[604, 7898], min_duration=0, mlp_multiplier=1.0, music_vocab_size=2048,
    n_ctx=6144, n_heads=2, nb_relevant_lyric_tokens=384, res_conv_depth=3, res_conv_width=128,
    res_convolution_multiplier=1, res_dilation_cycle=None, res_dilation_growth_rate=1, res_downs_t=[3, 2, 2],
    res_strides_t=[2, 2, 2], resid_dropout=0, sampling_rate=44100, spread=None, timing_dims=64, zero_out=False)
# Fields JukeboxModel copies from its own config into every prior's.
SHARED_PRIOR_FIELDS = ("sampling_rate", "timing_dims", "min_duration", "max_duration", "max_nb_genres",
                       "metadata_conditioning")
# The original's lyric vocabulary of the v3 labeller has 79 symbols (v2: 80).
V3_VOCAB = 79


def is_hf_directory(path: str | os.PathLike) -> bool:
    """A directory whose ``config.json`` says ``model_type: "jukebox"``."""
    f = Path(path) / CONFIG_NAME
    if not (Path(path).is_dir() and f.is_file()):
        return False
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("model_type") == HF_MODEL_TYPE
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


# --- key names ----------------------------------------------------------------------------------

_TOKEN_MODEL_NAMES = {"x_emb": "embed_tokens", "x_out": "fc_proj_out", "ln_0": "layer_norm_0",
                      "ln_1": "layer_norm_1", "w": "weight", "b": "bias"}
_RES_CONVS = {"1": "conv1d_1", "3": "conv1d_2"}


def _resnet(rest: list[str]) -> list[str]:
    # ["model" | "blocks", d, "model", "1" | "3", param] -> resnet_block.d.conv1d_{1,2}.param
    return ["resnet_block", rest[1], _RES_CONVS[rest[3]], rest[4]]


def _encoder_block(rest: list[str]) -> list[str]:
    # our Sequential: [conv_0, resnet_0], ..., final conv; the port's: flat list, proj_out apart
    i, tail = int(rest[0]), rest[1:]
    if len(tail) == 1:
        return ["proj_out", *tail]
    return ["downsample_block", str(2 * i + int(tail[0]))] + (_resnet(tail[1:]) if tail[0] == "1" else tail[1:])


def _decoder_block(rest: list[str]) -> list[str]:
    # our Sequential: first conv, then [resnet_i, transposed conv_i]; the port's: proj_in apart
    i, tail = int(rest[0]), rest[1:]
    if i == 0:
        return ["proj_in", *tail]
    return ["upsample_block", str(2 * (i - 1) + int(tail[0]))] + (_resnet(tail[1:]) if tail[0] == "0" else tail[1:])


def _token_model(rest: list[str]) -> list[str]:
    return [_TOKEN_MODEL_NAMES.get(p, p) for p in rest]


def _vqvae_key(p: list[str]) -> list[str]:
    if p[0] == "encoders" and p[2] == "level_blocks" and p[4] == "model":
        return p[:4] + _encoder_block(p[5:])
    if p[0] == "decoders" and p[2] == "level_blocks" and p[4] == "model":
        return p[:4] + _decoder_block(p[5:])
    if p[0] == "decoders" and p[2] == "out":
        return p
    if p[0] == "bottleneck" and p[-1] == "k":
        return p[:-1] + ["codebook"]
    raise KeyError


def _prior_key(p: list[str]) -> list[str]:
    head, rest = p[0], p[1:]
    if head == "conditioner_blocks":
        if rest[1] == "x_emb":
            return ["conditioner_blocks", "embed_tokens", *rest[2:]]
        if rest[1] == "ln":
            return ["conditioner_blocks", "layer_norm", *rest[2:]]
        if rest[1] == "cond" and rest[2] == "model":
            return ["conditioner_blocks", "upsampler"] + _decoder_block(rest[3:])
        raise KeyError
    if head == "y_emb":
        name = rest[0]
        keep_emb = name in ("total_length_emb", "absolute_pos_emb", "relative_pos_emb")
        return ["metadata_embedding", name] + (rest[1:] if keep_emb else rest[2:])
    if head == "prime_state_proj":
        return ["encoder", "proj_in", _TOKEN_MODEL_NAMES[rest[0]]]
    if head == "prime_state_ln":
        return ["encoder", "final_layer_norm", *rest]
    if head == "prime_x_out":
        return ["encoder", "lm_head", *rest]
    if head == "prime_prior":
        return ["encoder"] + _token_model(rest)
    if head == "prior":
        return ["prior"] + _token_model(rest)
    raise KeyError


def hf_key(key: str, kind: str) -> str:
    """The port's name (without the ``vqvae.`` / ``priors.N.`` prefix) of one of our keys."""
    try:
        return ".".join((_vqvae_key if kind == "vqvae" else _prior_key)(key.split(".")))
    except (KeyError, IndexError):
        raise ValueError(f"no transformers name for the {kind} key {key!r}") from None


def _hf_names(kind: str, config) -> dict[str, str]:
    """{our key: the port's key} over every key of the architecture."""
    return {k: hf_key(k, kind) for k in meta_model(kind, config).state_dict()}


# --- configs: the port's -> ours ----------------------------------------------------------------

def _attn_order(name: str, where: str) -> int:
    for order, pattern in ATTENTION_PATTERNS.items():
        if pattern == name:
            return order
    raise CheckpointError(f"{where}: attention_pattern {name!r} is not one of the port's patterns "
                          f"({', '.join(ATTENTION_PATTERNS.values())})")


def _whole(x, what: str, where: str) -> int:
    if float(x) != int(x):
        raise CheckpointError(f"{where}: {what} = {x} must be a whole number for the port")
    return int(x)


def _filled(defaults: Mapping[str, Any], d: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**defaults, **(d or {})}


def _prior_dicts(d: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
    n = int(d["nb_priors"])
    if d.get("prior_config_list") is not None:
        raw = list(d["prior_config_list"])
    else:
        raw = [d.get(f"prior_{i}") or {} for i in range(n)]
    if len(raw) != n:
        raise CheckpointError(f"{source}: nb_priors is {n} but prior_config_list has {len(raw)} entries")
    priors = []
    for p in raw:
        if not isinstance(p, Mapping):
            raise CheckpointError(f"{source}: prior_config_list entries must be objects")
        p = _filled(HF_PRIOR_DEFAULTS, p)
        p.update({f: d[f] for f in SHARED_PRIOR_FIELDS})   # as JukeboxModel does
        priors.append(p)
    return priors


def _vqvae_from_hf(v: Mapping[str, Any], sr: int, where: str) -> VQVAEConfig:
    if int(v["conv_input_shape"]) != 1:
        raise CheckpointError(f"{where}: conv_input_shape {v['conv_input_shape']}: only mono audio (1) is supported")
    if v["conv_res_scale"]:
        raise CheckpointError(f"{where}: conv_res_scale true is not supported for the VQ-VAE")
    if v["act_fn"] != "relu":
        raise CheckpointError(f"{where}: act_fn {v['act_fn']!r}: the VQ-VAE uses relu")
    levels = int(v["levels"])
    return VQVAEConfig(
        levels=levels, downs_t=tuple(v["res_downs_t"]), strides_t=tuple(v["res_strides_t"]),
        emb_width=int(v["embed_dim"]), l_bins=int(v["nb_discrete_codes"]), width=int(v["res_conv_width"]),
        depth=int(v["res_conv_depth"]), multipliers=tuple(v["multipliers"] or [1] * levels),
        m_conv=float(v["res_convolution_multiplier"]), dilation_growth_rate=int(v["res_dilation_growth_rate"]),
        dilation_cycle=v["res_dilation_cycle"], reverse_decoder_dilation=True, sr=int(sr))


def _prior_from_hf(p: Mapping[str, Any], index: int, vq: VQVAEConfig, where: str) -> PriorConfig:
    level = vq.levels - 1 - index
    if p["act_fn"] != "quick_gelu":
        raise CheckpointError(f"{where}: act_fn {p['act_fn']!r}: the priors use quick_gelu")
    if int(p["music_vocab_size"]) != vq.l_bins:
        raise CheckpointError(f"{where}: music_vocab_size {p['music_vocab_size']} differs from the VQ-VAE's "
                              f"nb_discrete_codes {vq.l_bins}")
    if level < vq.levels - 1:
        # the port up-samples the conditioning with its own res_downs_t[index]
        down, stride = p["res_downs_t"][index], p["res_strides_t"][index]
        if (down, stride) != (vq.downs_t[level + 1], vq.strides_t[level + 1]):
            raise CheckpointError(f"{where}: the conditioner up-samples by {stride}**{down} but the VQ-VAE's "
                                  f"level {level + 1} down-samples by {vq.strides_t[level + 1]}**{vq.downs_t[level + 1]}")
    n_tokens = int(p["nb_relevant_lyric_tokens"] or 0)
    lyrics = None
    enc = None
    if n_tokens:
        if p["is_encoder_decoder"]:
            lyrics = "merged"
        elif p.get("encoder_config"):
            lyrics = "encoder"
            enc = _filled(HF_PRIOR_DEFAULTS, p["encoder_config"])
        else:
            raise CheckpointError(f"{where}: {n_tokens} lyric tokens but neither is_encoder_decoder nor an "
                                  f"encoder_config")
    elif p["is_encoder_decoder"]:
        raise CheckpointError(f"{where}: is_encoder_decoder without lyric tokens is not supported")
    top = level == vq.levels - 1
    kw: dict[str, Any] = dict(
        level=level, n_ctx=int(p["n_ctx"]), width=int(p["hidden_size"]), depth=int(p["num_layers"]),
        heads=int(p["n_heads"]), attn_order=_attn_order(p["attention_pattern"], where), blocks=int(p["blocks"]),
        l_bins=vq.l_bins, levels=vq.levels, downs_t=vq.downs_t, strides_t=vq.strides_t,
        m_attn=float(p["attention_multiplier"]), m_mlp=float(p["mlp_multiplier"]),
        res_scale=bool(p["attn_res_scale"]), merged_decoder=bool(p["merged_decoder"]),
        init_scale=float(p["init_scale"]), labels=bool(p["metadata_conditioning"]),
        labels_v3=lyrics is not None and int(p["lyric_vocab_size"]) == V3_VOCAB,
        y_bins=tuple(int(b) for b in p["metadata_dims"]), t_bins=int(p["timing_dims"]),
        max_bow_genre_size=int(p["max_nb_genres"]), sr=int(p["sampling_rate"]),
        min_duration=float(p["min_duration"]) if top else None,
        max_duration=float(p["max_duration"]) if top else None,
        lyrics=lyrics, n_tokens=n_tokens, n_vocab=int(p["lyric_vocab_size"]),
        prime_loss_fraction=float(p["encoder_loss_fraction"]) if lyrics else 0.0,
        cond_width=int(p["res_conv_width"]), cond_depth=int(p["res_conv_depth"]),
        cond_m_conv=float(p["res_convolution_multiplier"]), cond_dilation_growth_rate=int(p["res_dilation_growth_rate"]),
        cond_dilation_cycle=p["res_dilation_cycle"], cond_res_scale=bool(p["conv_res_scale"]), cond_c_res=True)
    if enc is not None:
        kw.update(prime_width=int(enc["hidden_size"]), prime_depth=int(enc["num_layers"]),
                  prime_heads=int(enc["n_heads"]), prime_attn_order=_attn_order(enc["attention_pattern"], where + " encoder"),
                  prime_blocks=int(enc["blocks"]), prime_m_attn=float(enc["attention_multiplier"]),
                  prime_m_mlp=float(enc["mlp_multiplier"]), prime_init_scale=float(enc["init_scale"]))
    try:
        return PriorConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _shapes(kind: str, config) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in meta_model(kind, config).state_dict().items()}


@lru_cache(maxsize=None)
def _preset_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    cfg = PRESETS[name]
    return tuple(_shapes("vqvae" if isinstance(cfg, VQVAEConfig) else "prior", cfg).items())


def _released(kind: str, cfg, where: str, notes: list[str]):
    """The preset whose weights have ``cfg``'s keys and shapes, else ``cfg``; notes each field
    that differs from it."""
    cls = VQVAEConfig if kind == "vqvae" else PriorConfig
    candidates = [n for n, p in PRESETS.items() if isinstance(p, cls)
                  and (kind == "vqvae" or (p.level, p.width, p.depth) == (cfg.level, cfg.width, cfg.depth))]
    if kind == "vqvae":
        candidates = [n for n in candidates if (PRESETS[n].l_bins, PRESETS[n].width) == (cfg.l_bins, cfg.width)]
    if not candidates:
        return cfg
    shapes = tuple(_shapes(kind, cfg).items())
    for name in candidates:
        if _preset_shapes(name) == shapes:
            preset = PRESETS[name]
            diffs = [f"{f.name} {getattr(cfg, f.name)!r} (released: {getattr(preset, f.name)!r})"
                     for f in dataclasses.fields(cls) if getattr(cfg, f.name) != getattr(preset, f.name)]
            if diffs:
                notes.append(f"{where} has the weights of the released {name} but config.json differs from its "
                             f"original hyperparameters: {'; '.join(diffs)}; built with the original values")
            return preset
    return cfg


def _own_configs(entry: Any, source: str):
    try:
        vq = VQVAEConfig.from_dict(entry["vqvae"])
        priors = {int(level): PriorConfig.from_dict(c) for level, c in entry["priors"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: unreadable '{OWN_ENTRY}' entry ({type(e).__name__}: {e})") from None
    return vq, priors


def configs_from_hf(d: Mapping[str, Any], source: str = CONFIG_NAME
                    ) -> tuple[VQVAEConfig, dict[int, PriorConfig], list[str]]:
    """Our VQ-VAE and prior configs (by our level) from a ``JukeboxModel`` ``config.json``, and
    notes on what was taken from elsewhere than its fields."""
    if d.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type is {d.get('model_type')!r}, not {HF_MODEL_TYPE!r}")
    notes: list[str] = []
    try:
        top = _filled(HF_MODEL_DEFAULTS, d)
        v = _filled(HF_VQVAE_DEFAULTS, d.get("vqvae_config"))
        vq = _vqvae_from_hf(v, top["sampling_rate"], f"{source} vqvae_config")
        dicts = _prior_dicts(top, source)
        if len(dicts) != vq.levels:
            raise CheckpointError(f"{source}: {len(dicts)} priors for a VQ-VAE of {vq.levels} levels")
        priors = {}
        for i, p in enumerate(dicts):
            where = f"{source} priors.{i}"
            if not p.get("mask"):
                notes.append(f"{where}: mask is false, so the port's teacher-forced forward sees later "
                             f"positions; fastjukebox's priors are always causal")
            cfg = _prior_from_hf(p, i, vq, where)
            priors[cfg.level] = cfg
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: not a usable Jukebox config ({type(e).__name__}: {e})") from None
    if OWN_ENTRY in d:
        own_vq, own_priors = _own_configs(d[OWN_ENTRY], source)
        same = (_shapes("vqvae", own_vq) == _shapes("vqvae", vq) and own_priors.keys() == priors.keys()
                and all(_shapes("prior", own_priors[l]) == _shapes("prior", priors[l]) for l in priors))
        if same:
            return own_vq, own_priors, []
        notes.append(f"{source}: the '{OWN_ENTRY}' entry describes other shapes than the port's fields "
                     f"(edited after writing?); using the port's fields")
    vq = _released("vqvae", vq, "the VQ-VAE", notes)
    priors = {l: _released("prior", c, f"the level-{l} prior", notes) for l, c in priors.items()}
    return vq, priors, notes


# --- configs: ours -> the port's ----------------------------------------------------------------

def _attention_pattern(order: int, where: str) -> str:
    if order not in ATTENTION_PATTERNS:
        raise CheckpointError(f"{where}: attn_order {order} has no counterpart in the transformers port "
                              f"(it has {sorted(ATTENTION_PATTERNS)})")
    return ATTENTION_PATTERNS[order]


def _hf_prior(c: PriorConfig, vq: VQVAEConfig) -> dict[str, Any]:
    index = vq.levels - 1 - c.level
    where = f"level-{c.level} prior"
    if c.is_top and c.labels and (c.min_duration is None or c.max_duration is None):
        raise CheckpointError(f"{where}: min_duration and max_duration are required")
    if not c.is_top and (c.downs_t[index], c.strides_t[index]) != (c.downs_t[c.level + 1], c.strides_t[c.level + 1]):
        raise CheckpointError(f"{where}: the port up-samples level {c.level + 1} by its res_downs_t[{index}]; "
                              f"this VQ-VAE's geometry {c.downs_t} cannot be expressed")
    p = dict(HF_PRIOR_DEFAULTS)
    p.update(
        level=index, n_ctx=c.n_ctx, hidden_size=c.width, num_layers=c.depth, n_heads=c.heads,
        attention_pattern=_attention_pattern(c.attn_order, where), blocks=c.blocks, attention_multiplier=c.m_attn,
        mlp_multiplier=c.m_mlp, attn_res_scale=c.res_scale, merged_decoder=c.merged_decoder, init_scale=c.init_scale,
        metadata_conditioning=c.labels, metadata_dims=list(c.y_bins), timing_dims=c.t_bins,
        max_nb_genres=c.max_bow_genre_size, sampling_rate=c.sr,
        min_duration=c.min_duration if c.min_duration is not None else 0,
        max_duration=c.max_duration if c.max_duration is not None else 600.0,
        music_vocab_size=c.l_bins, lyric_vocab_size=c.n_vocab, nb_relevant_lyric_tokens=c.n_tokens,
        is_encoder_decoder=c.lyrics == "merged", encoder_loss_fraction=c.prime_loss_fraction,
        res_conv_width=c.cond_width, res_conv_depth=c.cond_depth,
        res_convolution_multiplier=_whole(c.cond_m_conv, "cond_m_conv", where),
        res_dilation_growth_rate=c.cond_dilation_growth_rate, res_dilation_cycle=c.cond_dilation_cycle,
        conv_res_scale=c.cond_res_scale, res_downs_t=list(c.downs_t), res_strides_t=list(c.strides_t),
        mask=True, encoder_config=None)
    if c.lyrics == "encoder":
        e = dict(HF_PRIOR_DEFAULTS)
        e.update(
            n_ctx=c.n_tokens, hidden_size=c.prime_width, num_layers=c.prime_depth, n_heads=c.prime_heads,
            attention_pattern=_attention_pattern(c.prime_attn_order, where + " lyric encoder"),
            blocks=c.prime_blocks or 1, attention_multiplier=c.prime_m_attn, mlp_multiplier=c.prime_m_mlp,
            init_scale=c.prime_init_scale, is_encoder_decoder=False, nb_relevant_lyric_tokens=c.n_tokens,
            lyric_vocab_size=c.n_vocab, music_vocab_size=c.l_bins, metadata_conditioning=False, merged_decoder=True,
            attn_res_scale=False, mask=True)
        p["encoder_config"] = e
    return p


def hf_config(vq: VQVAEConfig, priors: Mapping[int, PriorConfig]) -> tuple[dict[str, Any], list[str]]:
    """A ``JukeboxModel`` ``config.json`` for our configs, and notes on what the port cannot keep."""
    if sorted(priors) != list(range(vq.levels)):
        raise CheckpointError(f"the transformers port needs a prior for every level 0..{vq.levels - 1}; "
                              f"have {sorted(priors)}")
    if not vq.reverse_decoder_dilation:
        raise CheckpointError("the transformers port always reverses the decoder's dilations "
                              "(reverse_decoder_dilation must be true)")
    top = priors[vq.levels - 1]
    notes = []
    for level, c in sorted(priors.items()):
        if c.labels != top.labels or c.sr != top.sr:
            raise CheckpointError(f"the transformers port shares labels and sr across priors; level {level} "
                                  f"differs from the top prior")
        if c.max_bow_genre_size != top.max_bow_genre_size:
            notes.append(f"the port gives every prior the top prior's genre count ({top.max_bow_genre_size}); "
                         f"the level-{level} prior has {c.max_bow_genre_size}, which the port will not use")
    v = dict(HF_VQVAE_DEFAULTS)
    v.update(levels=vq.levels, res_downs_t=list(vq.downs_t), res_strides_t=list(vq.strides_t),
             embed_dim=vq.emb_width, nb_discrete_codes=vq.l_bins, res_conv_width=vq.width, res_conv_depth=vq.depth,
             multipliers=list(vq.multipliers), res_convolution_multiplier=_whole(vq.m_conv, "m_conv", "VQ-VAE"),
             res_dilation_growth_rate=vq.dilation_growth_rate, res_dilation_cycle=vq.dilation_cycle,
             sample_length=top.sample_length)
    d = dict(
        architectures=["JukeboxModel"], model_type=HF_MODEL_TYPE, transformers_version=HF_VERSION,
        nb_priors=vq.levels, sampling_rate=top.sr, timing_dims=top.t_bins,
        min_duration=top.min_duration if top.min_duration is not None else 0,
        max_duration=top.max_duration if top.max_duration is not None else 600.0,
        max_nb_genres=top.max_bow_genre_size, metadata_conditioning=top.labels, vqvae_config=v,
        prior_config_list=[_hf_prior(priors[vq.levels - 1 - i], vq) for i in range(vq.levels)],
        torch_dtype="float32")
    d[OWN_ENTRY] = {"vqvae": vq.to_dict(), "priors": {str(l): c.to_dict() for l, c in sorted(priors.items())}}
    return d, notes


# --- weights ------------------------------------------------------------------------------------

def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt): {e}") from None


def _read_file(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise CheckpointError(f"{f}: weight file listed in the index is missing")
    if f.name.endswith(".safetensors"):
        return _read_safetensors(f)
    sd, _ = read_original(f)   # torch.load(weights_only=True) with named errors
    return sd


def read_hf_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a ``JukeboxModel`` directory under the port's names, single file or shards."""
    directory = Path(directory)
    name = next((n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if name is None:
        raise CheckpointError(f"{directory}: no weights ({', '.join(WEIGHT_FILES)})")
    if not name.endswith(".index.json"):
        return _read_file(directory / name)
    index_file = directory / name
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file}: not a readable shard index ({type(e).__name__}: {e})") from None
    sd: dict[str, torch.Tensor] = {}
    for fname in files:
        if not isinstance(fname, str) or Path(fname).name != fname:
            raise CheckpointError(f"{index_file}: shard name {fname!r} is not a file in the directory")
        shard = _read_file(directory / fname)
        listed = {k for k, f in weight_map.items() if f == fname}
        absent = sorted(listed - shard.keys())
        if absent:
            raise CheckpointError(f"{directory / fname}: lacks {len(absent)} tensors the index puts there "
                                  f"(first: {', '.join(absent[:3])})")
        sd.update({k: shard[k] for k in listed})
    return sd


def _split(sd: dict[str, torch.Tensor], levels: int, source: str) -> tuple[dict, dict[int, dict]]:
    vq: dict[str, torch.Tensor] = {}
    priors: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(levels)}
    stray = []
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head == "vqvae":
            vq[rest] = v
            continue
        index, _, rest = rest.partition(".")
        if head == "priors" and index.isdigit() and int(index) < levels:
            priors[int(index)][rest] = v
        else:
            stray.append(k)
    if stray:
        raise CheckpointError(f"{source}: {len(stray)} tensors outside vqvae.* and priors.0..{levels - 1}.* "
                              f"(first: {', '.join(stray[:3])})")
    return vq, priors


def _component(kind: str, cfg, hf_sd: dict[str, torch.Tensor], source: str, dtype, device):
    names = _hf_names(kind, cfg)
    expected = meta_model(kind, cfg).state_dict()
    expected_hf = {names[k]: v for k, v in expected.items()}
    if kind == "prior" and not cfg.merged_decoder and names["prior.x_out.weight"] not in hf_sd:
        expected_hf.pop(names["prior.x_out.weight"])   # safetensors store a shared tensor once
    check_state_dict(expected_hf, hf_sd, source, "the architecture its config.json describes")
    ours = {k: hf_sd[n] for k, n in names.items() if n in hf_sd}
    return assign_weights(cfg, kind, ours, source, dtype, device)


def read_hf(directory: str | os.PathLike, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
            ) -> tuple[VQVAE, dict[int, Prior], list[str]]:
    """The VQ-VAE, the priors by our level and notes (see :func:`configs_from_hf`) of a
    ``JukeboxModel`` directory. Raises ``CheckpointError`` naming what is wrong."""
    directory = Path(directory)
    cfg_file = directory / CONFIG_NAME
    try:
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    vq_cfg, prior_cfgs, notes = configs_from_hf(d, str(cfg_file))
    sd = read_hf_weights(directory)
    vq_sd, prior_sds = _split(sd, vq_cfg.levels, str(directory))
    vqvae = _component("vqvae", vq_cfg, vq_sd, f"{directory} (vqvae.*)", dtype, device)
    priors = {}
    for index, psd in prior_sds.items():
        level = vq_cfg.levels - 1 - index
        priors[level] = _component("prior", prior_cfgs[level], psd, f"{directory} (priors.{index}.*)", dtype, device)
    return vqvae, priors, notes


def _hf_state_dict(vqvae: VQVAE, priors: Mapping[int, Prior]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in vqvae.state_dict().items():
        out[f"vqvae.{hf_key(k, 'vqvae')}"] = v
    levels = vqvae.config.levels
    for index in range(levels):
        for k, v in priors[levels - 1 - index].state_dict().items():
            out[f"priors.{index}.{hf_key(k, 'prior')}"] = v
    return {k: v.detach().cpu() for k, v in out.items()}


def _shards(sd: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def write_hf(vqvae: VQVAE, priors: Mapping[int, Prior], directory: str | os.PathLike, *,
             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[Path, list[str]]:
    """Write a directory that transformers' ``JukeboxModel.from_pretrained`` loads (pickled
    ``.bin`` weights, as on the hub: the port's safetensors writer refuses its tied weights),
    sharded above ``max_shard_bytes``; atomically. Returns it and notes on what the port will
    not use."""
    directory = Path(directory)
    config, notes = hf_config(vqvae.config, {l: p.config for l, p in priors.items()})
    sd = _hf_state_dict(vqvae, priors)
    config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards = _shards(sd, max_shard_bytes)
    if len(shards) == 1:
        torch.save(sd, tmp / "pytorch_model.bin")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, tmp / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (tmp / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1), encoding="utf-8")
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=1), encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory, notes
