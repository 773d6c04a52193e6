"""Reading and writing model weights.

* Original files (``vqvae.pth.tar``, ``prior_level_{0,1,2}.pth.tar``): a ``torch.save`` dict whose
  ``model`` entry is the state dict (keys possibly prefixed ``module.``), loaded with
  ``weights_only=True``. The original writes its hyperparameters (``hps``) as a plain dict; any
  pickled class is refused.
* Our format: a directory per component with ``config.json`` and ``model.safetensors``.

Models are built on the meta device and the weights assigned, so a 5B prior never allocates a
random copy of itself first.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .layers import keep_layernorms_fp32
from .config import PRESETS, PriorConfig, VQVAEConfig, resolve_config
from .prior import Prior
from .vqvae import VQVAE

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason."""


def _is_ours(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).exists()


def read_original(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """State dict (``module.`` prefix removed) and the stored hyperparameters, if any."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=_zip(path))
    except pickle.UnpicklingError as e:
        msg = str(e)
        # torch wraps the unpickler's reason in boilerplate; keep the reason only. Only a
        # disallowed class/function is a refusal; other unpickler errors (e.g. "Unsupported
        # operand") mean the bytes are not a pickle at all.
        reason = msg.split("WeightsUnpickler error:", 1)[-1]
        detail = next((l.strip() for l in reason.splitlines() if l.strip()), msg[:200])[:300]
        if any(s in msg for s in ("Unsupported global", "unsupported class", "unrecognized function")):
            raise CheckpointError(f"{path}: holds objects other than plain tensors and containers; refusing to "
                                  f"unpickle it ({detail})") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {detail}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt): {str(e)[:200]}") from None
    if isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        sd, hps = ckpt["model"], ckpt.get("hps")
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        sd, hps = ckpt, None
    else:
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict, got "
                              f"{type(ckpt).__name__} with keys {list(ckpt)[:5] if isinstance(ckpt, dict) else '-'}")
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd, (dict(hps) if isinstance(hps, dict) else None)


def _zip(path: Path) -> bool:
    # mmap only works for the zip-based format; legacy files are read whole.
    return zipfile.is_zipfile(path)


def _model_class(kind: str):
    return VQVAE if kind == "vqvae" else Prior


def meta_model(kind: str, config):
    """The model of ``config`` on the meta device (its keys and shapes, no memory)."""
    with torch.device("meta"):
        return _model_class(kind)(config)


def check_state_dict(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str,
                     what: str = "this architecture") -> None:
    """Raise CheckpointError listing the first missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} mis-shaped (first: {'; '.join(shapes[:3])})")
        raise CheckpointError(f"{source} does not match {what}: " + "; ".join(parts)
                              + ". Is it a checkpoint of another architecture? Pass the right hps/preset.")


def infer_preset(sd: dict[str, torch.Tensor], kind: str) -> str | None:
    """Name of the released architecture whose keys and shapes match ``sd`` exactly."""
    for name, cfg in PRESETS.items():
        if isinstance(cfg, VQVAEConfig) != (kind == "vqvae"):
            continue
        expected = meta_model(kind, cfg).state_dict()
        if expected.keys() == sd.keys() and all(tuple(expected[k].shape) == tuple(sd[k].shape) for k in sd):
            return name
    return None


def _config_for_original(sd, hps_arg, stored_hps, kind: str, source: str):
    hps = hps_arg if hps_arg is not None else stored_hps
    if hps is None:
        name = infer_preset(sd, kind)
        if name is None:
            raise CheckpointError(f"{source} has no hyperparameters and matches no released {kind} "
                                  f"architecture; pass hps= (a preset name, a dict or a JSON file)")
        return PRESETS[name]
    try:
        cfg = resolve_config(hps, kind)
    except (KeyError, TypeError) as e:
        # e.g. a VQ-VAE's hyperparameters (prior entries None) read as a prior's
        raise CheckpointError(f"{source}: the hyperparameters do not describe a {kind} "
                              f"({type(e).__name__}: {e}); is this a checkpoint of another kind? "
                              f"Pass hps= (a preset name, a dict or a JSON file)") from None
    named = isinstance(hps, (VQVAEConfig, PriorConfig)) or (isinstance(hps, str) and hps in PRESETS)
    if kind == "prior" and not named and "prior.x_emb.weight" in sd:
        # The original's prior hyperparameters do not say the codebook size (it belongs to the
        # VQ-VAE's); read it off the token embedding.
        l_bins = sd["prior.x_emb.weight"].shape[0] - (cfg.n_vocab if cfg.lyrics == "merged" else 0)
        if l_bins != cfg.l_bins:
            cfg = cfg.replace(l_bins=l_bins)
    return cfg


def assign_weights(model_cfg, kind: str, sd: dict[str, torch.Tensor], source: str, dtype, device):
    """A model of ``model_cfg`` holding the state dict ``sd`` (checked key by key and shape by
    shape first; a tied ``prior.x_out.weight`` may be absent)."""
    meta = meta_model(kind, model_cfg)
    expected = meta.state_dict()
    tied = kind == "prior" and meta.prior.tied
    if tied and "prior.x_out.weight" not in sd and "prior.x_emb.weight" in sd:
        sd = {**sd, "prior.x_out.weight": sd["prior.x_emb.weight"]}
    check_state_dict(expected, sd, source)
    if tied and not torch.equal(sd["prior.x_out.weight"].float(), sd["prior.x_emb.weight"].float()):
        raise CheckpointError(f"{source}: prior.x_out.weight should equal prior.x_emb.weight (tied) but differs")
    dtype = dtype or torch.float32
    sd = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()}
    meta.load_state_dict(sd, strict=True, assign=True)
    if tied:
        meta.prior.x_out.weight = meta.prior.x_emb.weight
    if dtype in (torch.float16, torch.bfloat16):
        keep_layernorms_fp32(meta)
    return meta.eval()


def load_component(path, kind: str, hps=None, *, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu"):
    """A VQVAE (``kind="vqvae"``) or Prior from an original file or one of our directories."""
    path = Path(path)
    if _is_ours(path):
        cfg = read_config(path, kind) if hps is None else resolve_config(hps, kind)
        return assign_weights(cfg, kind, read_weights(path), str(path), dtype, device)
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory without {CONFIG_NAME}; expected one of our component "
                              f"directories or an original .pth.tar file")
    sd, stored = read_original(path)
    cfg = _config_for_original(sd, hps, stored, kind, str(path))
    return assign_weights(cfg, kind, sd, str(path), dtype, device)


def load_vqvae(path, hps=None, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> VQVAE:
    """A VQVAE from an original ``.pth.tar`` or one of our component directories.

    ``hps``: preset name, dict or JSON path of the original hyperparameters; read from the
    checkpoint (ours: ``config.json``; original: its ``hps`` entry) when omitted.
    """
    return load_component(path, "vqvae", hps, dtype=dtype, device=device)


def load_prior(path, hps=None, *, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> Prior:
    """A Prior from an original ``.pth.tar`` or one of our component directories (see ``load_vqvae``)."""
    return load_component(path, "prior", hps, dtype=dtype, device=device)


def read_config(directory: Path, kind: str):
    """The config in ``directory/config.json``, checked field by field: a ``CheckpointError`` names
    the file and the field that is missing, unknown or of the wrong type."""
    return read_config_and_extras(directory, kind)[0]


def read_config_and_extras(directory: Path, kind: str, extra: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """``read_config`` of a component whose ``config.json`` also holds fields of its own (not of its
    config class): the config, and those of the ``extra`` fields the file has."""
    path = Path(directory) / CONFIG_NAME
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    if "kind" not in d:
        raise CheckpointError(f"{path}: field 'kind' is missing (expected {kind!r})")
    if d["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {d['kind']!r} component, expected {kind!r}")
    d.pop("format", None)
    extras = {name: d.pop(name) for name in extra if name in d}
    try:
        return (VQVAEConfig if kind == "vqvae" else PriorConfig).from_dict(d), extras
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    f = directory / WEIGHTS_NAME
    if not f.exists():
        raise CheckpointError(f"{directory}: {WEIGHTS_NAME} is missing")
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt): {e}") from None


def save_component(model, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (tied weights stored once), atomically."""
    from safetensors.torch import save_file
    directory = Path(directory)
    kind = "vqvae" if isinstance(model, VQVAE) else "prior"
    sd = model.state_dict()
    if kind == "prior" and model.prior.tied:
        sd.pop("prior.x_out.weight")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in sd.items()}
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(sd, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump({"kind": kind, "format": FORMAT_VERSION, **model.config.to_dict()}, f, indent=1)
    if directory.exists():
        for p in (directory / WEIGHTS_NAME, directory / CONFIG_NAME):
            if p.exists():
                p.unlink()
        directory.rmdir()
    os.replace(tmp, directory)
    return directory


def write_component_dir(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                        extra_json: dict[str, dict] | None = None, dtype: torch.dtype | None = None) -> Path:
    """A component directory: ``model.safetensors`` (floating tensors in ``dtype`` when given),
    ``config.json`` holding ``config`` and one JSON file per ``extra_json`` entry (name -> object),
    written beside it and put in place of ``path`` only once complete."""
    import shutil

    from safetensors.torch import save_file
    directory = Path(path)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in state_dict.items()}
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(sd, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    for name, obj in {CONFIG_NAME: config, **(extra_json or {})}.items():
        with open(tmp / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.{os.getpid()}.old")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def save_original(model, path: str | os.PathLike) -> Path:
    """Write the weights in the original file layout ``{"model": state_dict}``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": {k: v.detach().cpu() for k, v in model.original_state_dict().items()}}, tmp)
    os.replace(tmp, path)
    return path
