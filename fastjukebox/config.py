"""Hyperparameters of the VQ-VAE and the priors, and the released architectures by name.

Two ways in:

* ``VQVAEConfig`` / ``PriorConfig`` dataclasses (our names, JSON round-trip through
  ``to_dict``/``from_dict``), with ``PRESETS`` holding the released architectures;
* ``*.from_original(hps)``: the original implementation's hyperparameter names, as a dict or a
  JSON file (every fixture ships one).

A prior does not own the VQ-VAE, but it depends on its geometry (levels, down-sampling, codebook
size). The original keeps those in the VQ-VAE's hyperparameters, so a prior's ``hps`` alone says
nothing reliable about them (its ``downs_t``/``l_bins`` entries are unused defaults); they default
here to the released VQ-VAE and can be overridden.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["VQVAEConfig", "PriorConfig", "PRESETS", "get_preset", "resolve_config"]


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


def _matches(value, tp) -> bool:
    """Whether a JSON value fits the field type ``tp`` (int, float, bool, str, None, unions and
    tuples of these)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


class _ConfigMixin:
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """The config of ``d`` (a ``config.json``), checked against the dataclass's fields: a
        ``ValueError`` names an unknown, missing or wrongly typed field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a JSON object of {cls.__name__} fields, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields) - {"kind"})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(map(str, unknown))}")
        hints = typing.get_type_hints(cls)
        for name, f in fields.items():
            if name not in d:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"field {name!r} is missing")
                continue
            if not _matches(d[name], hints[name]):
                raise ValueError(f"field {name!r} must be {_describe(hints[name])}, got {d[name]!r}")
        try:
            return cls(**{k: _tuple(v) for k, v in d.items() if k in fields})
        except ZeroDivisionError:
            zero = next((k for k, v in d.items() if v == 0 and k in fields), "?")
            raise ValueError(f"field {zero!r} must not be 0") from None

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class VQVAEConfig(_ConfigMixin):
    """Three-level VQ-VAE: independent encoder/decoder pairs, one codebook per level."""

    levels: int = 3
    downs_t: tuple[int, ...] = (3, 2, 2)     # stride-2 convolutions per level
    strides_t: tuple[int, ...] = (2, 2, 2)
    emb_width: int = 64                       # codebook vector width
    l_bins: int = 2048                        # codes per level
    width: int = 32                           # conv width, times multipliers[level]
    depth: int = 4                            # residual units per block, times multipliers[level]
    multipliers: tuple[int, ...] = (2, 1, 1)
    m_conv: float = 1.0
    dilation_growth_rate: int = 3
    dilation_cycle: int | None = None
    reverse_decoder_dilation: bool = True
    sr: int = 44100

    def __post_init__(self):
        if not (len(self.downs_t) == len(self.strides_t) == len(self.multipliers) == self.levels):
            raise ValueError("downs_t, strides_t and multipliers need one entry per level")

    @property
    def downsamples(self) -> tuple[int, ...]:
        return tuple(s ** d for s, d in zip(self.strides_t, self.downs_t))

    @property
    def hop_lengths(self) -> tuple[int, ...]:
        """Audio samples per code at each level (8, 32, 128 for the released model)."""
        return tuple(math.prod(self.downsamples[: i + 1]) for i in range(self.levels))

    @classmethod
    def from_original(cls, hps: Mapping[str, Any] | str | os.PathLike) -> "VQVAEConfig":
        h = _read_hps(hps)
        levels = int(h.get("levels", 3))
        mult = h.get("hvqvae_multipliers") or [1] * levels
        return cls(
            levels=levels,
            downs_t=tuple(h["downs_t"]),
            strides_t=tuple(h["strides_t"]),
            emb_width=int(h["emb_width"]),
            l_bins=int(h["l_bins"]),
            width=int(h["width"]),
            depth=int(h["depth"]),
            multipliers=tuple(mult),
            m_conv=float(h.get("m_conv", 1.0)),
            dilation_growth_rate=int(h.get("dilation_growth_rate", 1)),
            dilation_cycle=h.get("dilation_cycle"),
            reverse_decoder_dilation=bool(h.get("vqvae_reverse_decoder_dilation", True)),
            sr=int(h.get("sr", 44100)),
        )


@dataclass(frozen=True)
class PriorConfig(_ConfigMixin):
    """One autoregressive prior over the codes of one VQ-VAE level.

    ``lyrics`` is ``None`` (no lyrics), ``"encoder"`` (5b_lyrics: a separate causal lyric
    encoder feeding cross-attention layers) or ``"merged"`` (1b_lyrics: one sequence
    ``[lyric tokens | music tokens]`` over a merged vocabulary).
    """

    level: int
    n_ctx: int                       # music tokens per window
    width: int
    depth: int
    heads: int
    attn_order: int                  # per-layer cycle of attention patterns
    blocks: int                      # the sequence is factored as (blocks, block_len)
    # geometry of the VQ-VAE it models
    l_bins: int = 2048
    levels: int = 3
    downs_t: tuple[int, ...] = (3, 2, 2)
    strides_t: tuple[int, ...] = (2, 2, 2)
    # transformer details
    m_attn: float = 0.25             # attention width = m_attn * width
    m_mlp: float = 1.0
    res_scale: bool = False
    merged_decoder: bool = False     # True: untied x_out, x_cond added only at the input
    init_scale: float = 1.0
    # labels (artist, genre, timing)
    labels: bool = True
    labels_v3: bool = False
    y_bins: tuple[int, int] = (120, 4111)   # (genres, artists)
    t_bins: int = 128
    max_bow_genre_size: int = 5
    sr: int = 44100
    min_duration: float | None = None
    max_duration: float | None = None
    # lyrics
    lyrics: str | None = None
    n_tokens: int = 0
    n_vocab: int = 80
    prime_loss_fraction: float = 0.0
    prime_width: int = 128
    prime_depth: int = 3
    prime_heads: int = 1
    prime_attn_order: int = 0
    prime_blocks: int | None = None
    prime_m_attn: float = 0.25
    prime_m_mlp: float = 1.0
    prime_init_scale: float = 1.0
    # upsampler conditioner (levels below the top)
    cond_width: int = 1024
    cond_depth: int = 16
    cond_m_conv: float = 1.0
    cond_dilation_growth_rate: int = 3
    cond_dilation_cycle: int | None = 8
    cond_res_scale: bool = False
    cond_c_res: bool = True          # True stores residual stacks under ``.blocks.``

    def __post_init__(self):
        if self.lyrics not in (None, "encoder", "merged"):
            raise ValueError(f"lyrics must be None, 'encoder' or 'merged', got {self.lyrics!r}")
        if self.seq_len % self.blocks:
            raise ValueError(f"sequence length {self.seq_len} is not a multiple of blocks={self.blocks}")
        if (self.width * self.m_attn) % self.heads:
            raise ValueError("attention width must split evenly into heads")
        if not 0 <= self.level < self.levels:
            raise ValueError(f"level {self.level} outside 0..{self.levels - 1}")

    # --- derived facts -------------------------------------------------------------------
    @property
    def is_top(self) -> bool:
        return self.level == self.levels - 1

    @property
    def time_signal(self) -> bool:
        """The top level conditions on total length and position instead of upper codes."""
        return self.labels and self.is_top

    @property
    def raw_to_tokens(self) -> int:
        return math.prod(s ** d for s, d in zip(self.strides_t[: self.level + 1], self.downs_t[: self.level + 1]))

    @property
    def cond_downsample(self) -> int | None:
        """Codes of this level per code of the level above (4 for the released model)."""
        if self.is_top:
            return None
        return self.strides_t[self.level + 1] ** self.downs_t[self.level + 1]

    @property
    def sample_length(self) -> int:
        """Audio samples covered by one window."""
        return self.n_ctx * self.raw_to_tokens

    @property
    def n_lyric_prefix(self) -> int:
        """Lyric positions in front of the music in the transformer's sequence."""
        return self.n_tokens if self.lyrics == "merged" else 0

    @property
    def seq_len(self) -> int:
        return self.n_ctx + self.n_lyric_prefix

    @property
    def bins(self) -> int:
        """Output vocabulary of the transformer (merged lyric + music for 1b-style priors)."""
        return self.l_bins + (self.n_vocab if self.lyrics == "merged" else 0)

    @property
    def block_len(self) -> int:
        return self.seq_len // self.blocks

    @property
    def n_state(self) -> int:
        return int(self.width * self.m_attn)

    @property
    def head_dim(self) -> int:
        return self.n_state // self.heads

    @property
    def label_len(self) -> int:
        return (4 + self.max_bow_genre_size + self.n_tokens) if self.labels else 0

    @property
    def prime_len(self) -> int | None:
        """Keys visible to prime-attention layers (merged lyrics only).

        The original rounds the lyric length up to whole blocks counted in *number of blocks*,
        ``(n_tokens // blocks + 1) * blocks``, which lets music positions see a few music keys.
        """
        if self.lyrics != "merged":
            return None
        return (self.n_tokens // self.blocks + 1) * self.blocks

    @property
    def encoder_len(self) -> int:
        return self.n_tokens if self.lyrics == "encoder" else 0

    @classmethod
    def from_original(cls, hps: Mapping[str, Any] | str | os.PathLike, *, l_bins: int | None = None,
                      vqvae: VQVAEConfig | None = None) -> "PriorConfig":
        """Build from the original hyperparameter names.

        ``l_bins`` and the level geometry come from ``vqvae`` when given (else the released
        VQ-VAE); a checkpoint loader passes ``l_bins`` read off the embedding's shape.
        """
        h = _read_hps(hps)
        vq = vqvae or VQVAEConfig()
        use_tokens = bool(h.get("use_tokens", False)) and int(h.get("n_tokens", 0) or 0) > 0
        lyrics = None
        if use_tokens:
            lyrics = "merged" if h.get("single_enc_dec", False) else "encoder"
        y_bins = h.get("y_bins") or (0, 0)
        return cls(
            level=int(h["level"]),
            n_ctx=int(h["n_ctx"]),
            width=int(h["prior_width"]),
            depth=int(h["prior_depth"]),
            heads=int(h["heads"]),
            attn_order=int(h["attn_order"]),
            blocks=int(h["blocks"]),
            l_bins=int(l_bins if l_bins is not None else vq.l_bins),
            levels=vq.levels,
            downs_t=vq.downs_t,
            strides_t=vq.strides_t,
            m_attn=float(h.get("m_attn", 0.25)),
            m_mlp=float(h.get("m_mlp", 1.0)),
            res_scale=bool(h.get("res_scale", False)),
            merged_decoder=bool(h.get("merged_decoder", False)),
            init_scale=float(h.get("init_scale", 1.0)),
            labels=bool(h.get("labels", True)),
            labels_v3=bool(h.get("labels_v3", False)),
            y_bins=tuple(int(b) for b in y_bins),
            t_bins=int(h.get("t_bins", 64)),
            max_bow_genre_size=int(h.get("max_bow_genre_size") or 0),
            sr=int(h.get("sr", 44100)),
            min_duration=h.get("min_duration"),
            max_duration=h.get("max_duration"),
            lyrics=lyrics,
            n_tokens=int(h.get("n_tokens", 0) or 0) if use_tokens else 0,
            n_vocab=int(h.get("n_vocab", 0) or 0),
            prime_loss_fraction=float(h.get("prime_loss_fraction", 0.0)) if use_tokens else 0.0,
            prime_width=int(h.get("prime_width", 128)),
            prime_depth=int(h.get("prime_depth", 3)),
            prime_heads=int(h.get("prime_heads", 1)),
            prime_attn_order=int(h.get("prime_attn_order", 0)),
            prime_blocks=h.get("prime_blocks"),
            prime_m_attn=float(h.get("prime_m_attn", 0.25)),
            prime_m_mlp=float(h.get("prime_m_mlp", 1.0)),
            prime_init_scale=float(h.get("prime_init_scale", 1.0)),
            cond_width=int(h.get("cond_width", 128)),
            cond_depth=int(h.get("cond_depth", 3)),
            cond_m_conv=float(h.get("cond_m_conv", 1.0)),
            cond_dilation_growth_rate=int(h.get("cond_dilation_growth_rate", 1)),
            cond_dilation_cycle=h.get("cond_dilation_cycle"),
            cond_res_scale=bool(h.get("cond_res_scale", False)),
            cond_c_res=bool(h.get("cond_c_res", 0)),
        )


def _read_hps(hps: Mapping[str, Any] | str | os.PathLike) -> Mapping[str, Any]:
    if isinstance(hps, (str, os.PathLike)):
        with open(hps, encoding="utf-8") as f:
            return json.load(f)
    if not isinstance(hps, Mapping):
        raise TypeError(f"hyperparameters must be a dict or a JSON path, got {type(hps).__name__}")
    return hps


_UPSAMPLER = dict(
    n_ctx=8192, width=1920, depth=72, heads=1, attn_order=2, blocks=128, init_scale=0.4,
    y_bins=(120, 4111), t_bins=128, max_bow_genre_size=5, n_vocab=80,
    cond_width=1024, cond_depth=16, cond_dilation_growth_rate=3, cond_dilation_cycle=8, cond_c_res=True,
)

PRESETS: dict[str, VQVAEConfig | PriorConfig] = {
    "vqvae": VQVAEConfig(),
    "upsampler_level_0": PriorConfig(level=0, **_UPSAMPLER),
    "upsampler_level_1": PriorConfig(level=1, cond_res_scale=True, **_UPSAMPLER),
    "prior_5b": PriorConfig(
        level=2, n_ctx=8192, width=4800, depth=72, heads=8, attn_order=2, blocks=128, init_scale=0.1,
        min_duration=60.0, max_duration=600.0, merged_decoder=True,
        y_bins=(120, 4111), t_bins=128, max_bow_genre_size=5, n_vocab=80,
    ),
    "prior_5b_lyrics": PriorConfig(
        level=2, n_ctx=8192, width=4800, depth=79, heads=8, attn_order=10, blocks=128, init_scale=0.1,
        min_duration=23.8, max_duration=600.0, merged_decoder=True,
        y_bins=(120, 4111), t_bins=128, max_bow_genre_size=5, n_vocab=80,
        lyrics="encoder", n_tokens=512, prime_loss_fraction=0.4,
        prime_width=1280, prime_depth=18, prime_heads=4, prime_attn_order=2, prime_blocks=32,
        prime_init_scale=0.7,
    ),
    "prior_1b_lyrics": PriorConfig(
        level=2, n_ctx=6144, width=2048, depth=72, heads=2, attn_order=12, blocks=64, init_scale=0.2,
        labels_v3=True, min_duration=17.84, max_duration=600.0,
        y_bins=(604, 7898), t_bins=64, max_bow_genre_size=1, n_vocab=79,
        lyrics="merged", n_tokens=384, prime_loss_fraction=0.4,
    ),
}


def get_preset(name: str) -> VQVAEConfig | PriorConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def resolve_config(hps, kind: str, **original_kwargs) -> VQVAEConfig | PriorConfig:
    """``hps`` as a preset name, one of our configs, a dict/JSON path of ours (has ``kind``) or
    of the original's hyperparameter names."""
    cls = VQVAEConfig if kind == "vqvae" else PriorConfig
    if isinstance(hps, cls):
        return hps
    if isinstance(hps, str) and hps in PRESETS:
        cfg = PRESETS[hps]
        if not isinstance(cfg, cls):
            raise ValueError(f"preset {hps!r} is not a {kind} architecture")
        return cfg
    if isinstance(hps, (str, os.PathLike)) and not os.path.exists(hps):
        raise ValueError(f"{hps!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file")
    h = _read_hps(hps)
    if "kind" in h:
        if h["kind"] != kind:
            raise ValueError(f"config describes a {h['kind']}, expected a {kind}")
        return cls.from_dict(h)
    return cls.from_original(h, **original_kwargs)
