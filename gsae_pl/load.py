"""Read an SAE in SAELens's on-disk format (what `python -m gsae_pl.export` writes).

A directory holds `cfg.json` and `sae_weights.safetensors`. Parameter names and shapes
are SAELens's: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in]; `gated` adds
b_gate, r_mag, b_mag [d_sae] (W_mag = W_enc * exp(r_mag), paper eq. 7), `standard` adds
b_enc [d_sae]. The activation normalisation is folded into the weights at export
(`normalize_activations: "none"`), so `encode`, `decode` and `forward` take and give RAW
activations, as a model's hook produces them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from gsae_pl.errors import UserError

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# SAELens architecture name -> its parameters beyond W_enc, W_dec, b_dec (all [d_sae]).
ENCODER_PARAMS = {"gated": ("b_gate", "r_mag", "b_mag"), "standard": ("b_enc",)}


class LoadedSAE(nn.Module):
    """An exported SAE as SAELens computes it, on raw activations."""

    def __init__(self, cfg: dict, params: dict[str, Tensor]):
        super().__init__()
        self.cfg = cfg
        self.architecture = cfg["architecture"]
        self.d_in, self.d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
        for name, value in params.items():
            setattr(self, name, nn.Parameter(value, requires_grad=False))

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations f [..., d_sae]."""
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        if self.architecture == "standard":
            return torch.relu(sae_in @ self.W_enc + self.b_enc)
        pi_gate = sae_in @ self.W_enc + self.b_gate
        pi_mag = sae_in @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of x."""
        return self.decode(self.encode(x))


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> LoadedSAE:
    """The SAE saved in directory `path`, checked against its cfg.json."""
    path = Path(path)
    cfg = read_cfg(path)
    try:
        params = load_file(str(path / WEIGHTS_FILE), device=str(device))
    except (OSError, SafetensorError) as err:
        raise UserError(f"cannot read {path / WEIGHTS_FILE} ({err}): export the SAE "
                        "again") from None
    check_params(params, cfg, path)
    return LoadedSAE(cfg, params).eval()


def read_cfg(path: Path) -> dict:
    if not (path / CFG_FILE).is_file():
        raise UserError(f"{path} holds no {CFG_FILE}: pass a directory written by "
                        "python -m gsae_pl.export")
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path / CFG_FILE} is not valid JSON ({err.msg} at line "
                        f"{err.lineno})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path / CFG_FILE} must hold a JSON object")
    arch = cfg.get("architecture")
    if arch not in ENCODER_PARAMS:
        raise UserError(f"{path / CFG_FILE}: architecture {arch!r} is not one gsae_pl can "
                        f"load ({', '.join(ENCODER_PARAMS)})")
    if cfg.get("normalize_activations", "none") != "none":
        raise UserError(f"{path / CFG_FILE}: normalize_activations="
                        f"{cfg['normalize_activations']!r} is not supported: fold it first")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise UserError(f"{path / CFG_FILE}: {key} must be a positive integer")
    return cfg


def check_params(params: dict[str, Tensor], cfg: dict, path: Path) -> None:
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({name: (d_sae,) for name in ENCODER_PARAMS[cfg["architecture"]]})
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise UserError(f"{path / WEIGHTS_FILE} does not match architecture "
                        f"{cfg['architecture']!r} (missing: {missing or 'none'}, "
                        f"unexpected: {extra or 'none'})")
    for name, shape in shapes.items():
        if tuple(params[name].shape) != shape:
            raise UserError(f"{path / WEIGHTS_FILE}: {name} has shape "
                            f"{list(params[name].shape)}, cfg.json implies {list(shape)}")
