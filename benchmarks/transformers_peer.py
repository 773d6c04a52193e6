"""transformers' Jukebox port (4.40.2, extra ``peers``) as a peer of the speed report.

The report's model family (``--model``: the demo family, ``tiny`` with ``--quick``) is written as
a Hugging Face directory (``fastjukebox.hf_checkpoint.write_hf``) and loaded with the port's
``JukeboxModel.from_pretrained``, so both run the same weights, on the CPU, in float32, in one
process. For the level-0 upsampler, on one steady-state window (``n_ctx - hop`` known codes,
primed in chunks of 32 by both, then ``n_new`` new codes; the report's batches):

* speed: the port's own sampling (``JukeboxPrior.sample``) against our ``"ar"`` sampler
  (``ARWindowSampler``); each is timed priming plus 1 token and priming plus ``1 + n_new`` tokens
  (the port cannot sample none), and the new tokens' rate is ``batch * n_new / (difference of the
  medians)``;
* greedy tokens (``top_k=1``, batch 1) of the same window, compared position by position.

Cases where the port is known to sample otherwise than the original are stated, not compared
(``NOT_COMPARED``).
"""
from __future__ import annotations

import os
import tempfile

import torch
from fastjukebox.settings import DEFAULT_CHUNK_SIZE

from .report_cases import geometry, level_inputs, measure

__all__ = ["NOT_COMPARED", "peer_rows"]

PEER = "transformers"
LEVEL = 0
CHUNK = DEFAULT_CHUNK_SIZE
NOT_COMPARED = {
    "upsampling beyond one window": "the port conditions every upsampler window on the whole upper-level "
                                    "sequence instead of the window's part (JukeboxPrior.get_music_tokens_conds "
                                    "slices it but keeps the unsliced codes), so windows after the first differ "
                                    "from the original's",
    "primed sampling": "JukeboxModel.primed_sample hands the encoded prompt to its priors finest level first, "
                       "where they index levels top first, so each prior is primed with another level's codes",
}


def _skipped(reason: str, version: str | None = None) -> list[dict]:
    row = {"peer": PEER, "status": "skipped", "reason": reason}
    if version:
        row["version"] = version
    return [row]


def _not_compared(version: str) -> list[dict]:
    return [{"peer": PEER, "version": version, "status": "not compared", "case": case, "reason": why}
            for case, why in NOT_COMPARED.items()]


def _port(jb) -> torch.nn.Module:
    from transformers import JukeboxModel
    from transformers.utils import logging as hf_logging
    from fastjukebox.hf_checkpoint import write_hf
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        out, _ = write_hf(jb.vqvae, {l: jb.prior(l) for l in jb.levels}, os.path.join(d, "hf"))
        return JukeboxModel.from_pretrained(out, torch_dtype=torch.float32).eval()


def _ours(prior, upper, labels, known, n_new: int, top_k: int = 0):
    from fastjukebox.sampling import ARWindowSampler
    sampler = ARWindowSampler(prior, known.shape[0])

    def prepare():
        g = torch.Generator().manual_seed(0)
        return lambda: sampler(known, n_new, upper, labels, temperature=1.0, top_k=top_k, top_p=0.0,
                               chunk_size=CHUNK, generator=g)
    return prepare


def _theirs(port_prior, upper, labels, known, n_new: int, top_k: int = 0):
    def prepare():
        return lambda: port_prior.sample(known.shape[0], music_tokens=known, music_tokens_conds=[upper],
                                         metadata=labels, temp=1.0, top_k=top_k, top_p=0.0, chunk_size=CHUNK,
                                         sample_tokens=known.shape[1] + n_new)
    return prepare


def _new_tokens_per_s(prepare_full, prepare_prime, batch: int, n_new: int, rounds: int) -> tuple[float, float]:
    full = measure(prepare_full, rounds).median
    prime = measure(prepare_prime, rounds).median
    return batch * n_new / max(full - prime, 1e-9), full


def peer_rows(model: str, batches, ar_tokens: int, rounds: int) -> list[dict]:
    """The port's rows of the report (see the module docstring)."""
    try:
        import transformers
    except ImportError:
        return _skipped("transformers is not installed (pip install -e '.[peers]')")
    if not hasattr(transformers, "JukeboxModel"):
        return _skipped(f"transformers {transformers.__version__} has no Jukebox port (the peers extra pins 4.40.2)",
                        transformers.__version__)
    import fastjukebox
    from fastjukebox.checkpoint import CheckpointError
    version = transformers.__version__
    jb = fastjukebox.load(model, dtype=torch.float32).eval().requires_grad_(False)
    try:
        port = _port(jb)
    except CheckpointError as e:
        return _skipped(f"the {model} family cannot be written for the port: {e}", version)
    prior, port_prior = jb.prior(LEVEL), port.priors[jb.vqvae.config.levels - 1 - LEVEL]
    g = geometry(prior.config, jb.vqvae.hop_lengths[LEVEL])
    n_new = min(g.hop_tokens - 1, ar_tokens)
    rows = []
    with torch.no_grad():
        for b in batches:
            upper, labels, known = level_inputs(prior.config, b, g.known, "cpu")
            ours, ours_window = _new_tokens_per_s(_ours(prior, upper, labels, known, 1 + n_new),
                                                  _ours(prior, upper, labels, known, 1), b, n_new, rounds)
            theirs, theirs_window = _new_tokens_per_s(_theirs(port_prior, upper, labels, known, 1 + n_new),
                                                      _theirs(port_prior, upper, labels, known, 1), b, n_new, rounds)
            rows.append({"peer": PEER, "version": version, "status": "measured", "case": "speed", "model": model,
                         "level": LEVEL, "batch": b, "known": g.known, "n_new": n_new, "device": "cpu",
                         "dtype": "float32", "ours_tokens_per_s": round(ours, 1),
                         "port_tokens_per_s": round(theirs, 1), "ratio": round(ours / theirs, 2),
                         "ours_window_s": round(ours_window, 4), "port_window_s": round(theirs_window, 4)})
        upper, labels, known = level_inputs(prior.config, 1, g.known, "cpu")
        mine = _ours(prior, upper, labels, known, n_new, top_k=1)()()[:, g.known:]
        port_tokens = _theirs(port_prior, upper, labels, known, n_new, top_k=1)()()[:, g.known:]
    same = (mine == port_tokens)[0]
    first = int((~same).nonzero()[0]) if not bool(same.all()) else None
    rows.append({"peer": PEER, "version": version, "status": "measured", "case": "greedy tokens", "model": model,
                 "level": LEVEL, "batch": 1, "known": g.known, "n_new": n_new,
                 "agreement": round(float(same.float().mean()), 4), "first_difference": first})
    return rows + _not_compared(version)


def describe(row: dict) -> str:
    """One line of the report's peer section."""
    head = f"{row['peer']} {row.get('version', '')}".rstrip()
    if row["status"] != "measured":
        case = f" {row['case']}" if "case" in row else ""
        return f"{head}{case}: {row['status']} ({row['reason']})"
    where = f"level-{row['level']} window of {row['model']} ({row['known']} known + {row['n_new']} new codes"
    if row["case"] == "speed":
        return (f"{head}, {where}, batch {row['batch']}, CPU float32): ours {row['ours_tokens_per_s']} tokens/s, "
                f"the port {row['port_tokens_per_s']} tokens/s: {row['ratio']}x (whole window {row['ours_window_s']} s "
                f"vs {row['port_window_s']} s)")
    diff = "identical" if row["first_difference"] is None else f"first difference at new code {row['first_difference']}"
    return f"{head}, {where}, batch 1): greedy codes agree at {row['agreement']:.0%} of positions ({diff})"
