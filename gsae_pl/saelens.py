"""SAELens interop: export a trained run in SAELens's on-disk format, and read one back.

Export: `python -m gsae_pl.export RUN_DIR OUT_DIR`. OUT_DIR gets `cfg.json` and
`sae_weights.safetensors` (`load_sae` below reads them back, SAELens's `SAE.load_from_disk`
too). The model was trained on x * norm_scale (docs/method.md sec. 4); the scalar s is
folded into the weights so that raw activations go in and raw reconstructions come out
(SAELens's own `fold_activation_norm_scaling_factor`):

    W_enc' = s * W_enc      W_dec' = W_dec / s      b_dec' = b_dec / s

Feature activations are unchanged: (x - b_dec') @ W_enc' = (s x - b_dec) @ W_enc. The
folding is done in float64 and rounded once to float32. Both files are written into a
temporary directory beside OUT_DIR that is renamed into place: never half an export.

The pre-activations, (x - b_dec') @ W_enc' + b_enc, are unchanged too, so a JumpReLU
threshold and the top-k choice carry over as they are: the folding leaves them alone.

Load: parameter names and shapes are SAELens's: W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_dec [d_in]; `gated` adds b_gate, r_mag, b_mag [d_sae] (W_mag = W_enc * exp(r_mag), paper
eq. 7), `standard` and `topk` add b_enc, `jumprelu` b_enc and threshold [d_sae]. With
z = (x - b_dec) @ W_enc + b_enc, SAELens 6.54 computes
    standard  f = ReLU(z)
    jumprelu  f = ReLU(z) * 1[z > threshold]         (= z * H(z - threshold) for threshold >= 0)
    topk      f = ReLU of the k largest z of each row, 0 elsewhere (`k` in cfg.json); with
              `rescale_acts_by_decoder_norm` z is first multiplied by ||W_dec row|| and f
              divided by it before decoding (gsae_pl writes false)
The normalisation is folded in at export (`normalize_activations: "none"`), so `encode`,
`decode` and `forward` take and give RAW activations, as a model's hook produces them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gsae_pl.cli import ArgumentParser, run_main
from gsae_pl.config import migrate
from gsae_pl.data.model_identity import model_identity
from gsae_pl.errors import UserError
from gsae_pl.run.checkpointing import (
    DamagedCheckpoint,
    checkpoint_dir,
    latest_checkpoint,
    read_checkpoint,
)
from gsae_pl.saes.base import ARCHITECTURES, ENCODER_PARAMS
from gsae_pl.writable import check_writable_dir

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# cfg.json fields a form needs, as gsae_pl writes them (SAELens's defaults for the rest).
FORM_CFG = {"topk": {"rescale_acts_by_decoder_norm": False}}


class LoadedSAE(nn.Module):
    """An exported SAE as SAELens computes it, on raw activations."""

    def __init__(self, cfg: dict, params: dict[str, Tensor]):
        super().__init__()
        self.cfg = cfg
        self.architecture = cfg["architecture"]
        self.d_in, self.d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        self.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
        self.rescale_acts_by_decoder_norm = (self.architecture == "topk" and
                                             bool(cfg.get("rescale_acts_by_decoder_norm")))
        for name, value in params.items():
            setattr(self, name, nn.Parameter(value, requires_grad=False))

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations f [..., d_sae]."""
        sae_in = x - self.b_dec if self.apply_b_dec_to_input else x
        if self.architecture == "gated":
            return self._encode_gated(sae_in)
        z = sae_in @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(z) * (z > self.threshold).to(z.dtype)
        if self.architecture == "topk":
            return self._top_k(z)
        return torch.relu(z)

    def _top_k(self, z: Tensor) -> Tensor:
        """ReLU of each row's k largest entries, zeros elsewhere (SAELens's TopK)."""
        if self.rescale_acts_by_decoder_norm:
            z = z * self.W_dec.norm(dim=-1)
        values, indices = torch.topk(z, k=int(self.cfg["k"]), dim=-1, sorted=False)
        return torch.zeros_like(z).scatter_(-1, indices, torch.relu(values))

    def _encode_gated(self, sae_in: Tensor) -> Tensor:
        pi_gate = sae_in @ self.W_enc + self.b_gate
        pi_mag = sae_in @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def decode(self, f: Tensor) -> Tensor:
        if self.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
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
    k = cfg.get("k")
    if arch == "topk" and (type(k) is not int or not 1 <= k <= cfg["d_sae"]):
        raise UserError(f"{path / CFG_FILE}: architecture 'topk' needs k, an integer from 1 "
                        f"to d_sae={cfg['d_sae']} (got {k!r})")
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


# ---- export ------------------------------------------------------------------------

# Each architecture names its SAELens form and the tensors it exports (`saelens`,
# `saelens_weights`: gsae_pl/saes/base.py); rescale_shift (docs/method.md sec. 3 item 4)
# ends as a gated SAE with weight sharing.
# SAELens metadata fields we can fill from the data config (null when not an LM source).
_METADATA = {"model_name": "data.model", "hook_name": "data.hook",
             "context_size": "data.context_size", "dataset_path": "data.dataset"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gsae_pl.export", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run directory written by gsae_pl.fit")
    parser.add_argument("out_dir", type=Path, help="directory to write the SAE into")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="export the newest checkpoint of a run without metrics.json")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="export this checkpoint of the run (e.g. RUN_DIR/checkpoints/"
                             "step3000.ckpt) instead of its newest")
    return parser.parse_args(argv)


def read_run(run_dir: Path, allow_unfinished: bool,
             checkpoint: Path | None = None) -> tuple[dict, dict[str, Tensor], int]:
    """The run's config, its SAE state (with norm_scale) and step, from `checkpoint` or
    else the run's newest checkpoint."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found: pass <output.dir>/<output.name>")
    ckpt = checkpoint or _newest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir} holds no checkpoint (checkpoints/*.ckpt): train it first")
    if not ckpt.is_file():
        raise UserError(f"checkpoint {ckpt} not found: pass one of {run_dir}/checkpoints/*.ckpt")
    if not (run_dir / "metrics.json").is_file() and not allow_unfinished:
        raise UserError(f"{run_dir} has not finished (no metrics.json): export a finished run, "
                        "or pass --allow-unfinished to export its newest checkpoint")
    try:
        step, cfg, weights = read_checkpoint(ckpt)
    except DamagedCheckpoint as err:
        raise UserError(f"cannot read checkpoint {ckpt} ({err.reason}): {_DAMAGED}") from None
    if weights is None:
        raise UserError(f"cannot read checkpoint {ckpt} (no state_dict): {_DAMAGED}")
    # A run trained before a key was renamed exports under today's names (config.ALIASES).
    return migrate(cfg, f"checkpoint {ckpt}"), weights, step


def _step_of(path: Path) -> int:
    digits = "".join(c for c in path.stem if c.isdigit())
    return int(digits) if digits else -1


_DAMAGED = "it is damaged; export an older checkpoint with --checkpoint FILE, or rerun fit"


def _newest_checkpoint(run_dir: Path) -> Path | None:
    """latest_checkpoint, whose refusal of a damaged last.ckpt gives fit's advice (--force)."""
    try:
        return latest_checkpoint(run_dir)
    except UserError:
        last = checkpoint_dir(run_dir) / "last.ckpt"  # the only file it opens
        older = sorted(checkpoint_dir(run_dir).glob("step*.ckpt"), key=_step_of)
        example = f" (e.g. --checkpoint {older[-1]})" if older else ""
        raise UserError(f"cannot read checkpoint {last}: {_DAMAGED}{example}") from None


def saelens_params(cfg: dict, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """SAELens-named float32 tensors with norm_scale folded in; refuses what it cannot hold."""
    architecture = ARCHITECTURES[cfg["sae"]["architecture"]]
    sae = {name: value.detach().double()
           for name, value in architecture.saelens_weights(cfg["sae"], weights).items()}
    s = weights["norm_scale"].double()
    sae["W_enc"] = sae["W_enc"] * s
    sae["W_dec"] = sae["W_dec"] / s
    sae["b_dec"] = sae["b_dec"] / s
    return {name: value.float().contiguous() for name, value in sae.items()}


def saelens_cfg(cfg: dict, d_in: int, step: int, norm_scale: float,
                model_dir: str | None = None) -> dict:
    """`model_dir`: the directory the run's activations came from (its provenance.json)."""
    node = OmegaConf.create(cfg)
    from_lm = node.data.source not in ("synthetic", "file")  # else no model or hook made x
    metadata = {key: OmegaConf.select(node, dotted, default=None) if from_lm else None
                for key, dotted in _METADATA.items()}
    if from_lm:  # the exact model: file, version, quantisation, instruct or base
        metadata["model_name"] = model_identity(node.data.source, node.data.model, model_dir)
    architecture = ARCHITECTURES[cfg["sae"]["architecture"]]
    return {
        "architecture": architecture.saelens,
        "d_in": d_in, "d_sae": int(cfg["sae"]["d_sae"]),
        "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True,  # f depends on x - b_dec (docs/method.md sec. 1)
        "normalize_activations": "none",  # folded into the weights, see the module docstring
        "reshape_activations": "none",
        # the form's own fields (topk: k), from gsae_pl and then from the architecture
        **FORM_CFG.get(architecture.saelens, {}), **architecture.saelens_cfg(cfg["sae"]),
        "metadata": metadata,
        # Ignored by SAELens (unknown top-level keys are dropped); kept for provenance.
        "gsae_pl": {"step": step, "norm_scale_folded": norm_scale, "config": cfg},
    }


def export(run_dir: Path, out_dir: Path, force: bool = False,
           allow_unfinished: bool = False, checkpoint: Path | None = None) -> Path:
    if out_dir.exists() and not force and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists: pass --force to replace it")
    # The files go to a temporary folder beside OUT_DIR: its parent must take them.
    check_writable_dir(out_dir.parent, "OUT_DIR's folder")
    cfg, weights, step = read_run(run_dir, allow_unfinished, checkpoint)
    params = saelens_params(cfg, weights)  # refuses before anything is written
    sae_cfg = saelens_cfg(cfg, params["b_dec"].numel(), step, float(weights["norm_scale"]),
                          provenance_model(run_dir))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_files(tmp, params, sae_cfg)
    except BaseException:  # e.g. the disk filled: no half export left beside OUT_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
    tmp.rename(out_dir)
    return out_dir


def provenance_model(run_dir: Path) -> str | None:
    """The model directory the run recorded (provenance.json's data.model), if any."""
    try:
        model = json.loads((run_dir / "provenance.json").read_text())["data"].get("model")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _write_files(tmp: Path, params: dict[str, Tensor], sae_cfg: dict) -> None:
    tmp.mkdir(parents=True)
    save_file(params, str(tmp / WEIGHTS_FILE))
    (tmp / CFG_FILE).write_text(json.dumps(sae_cfg, indent=2) + "\n")
    for written in (tmp / WEIGHTS_FILE, tmp / CFG_FILE):  # on disk before the rename
        with open(written, "rb") as fh:
            os.fsync(fh.fileno())


def _main(args: argparse.Namespace) -> int:
    out = export(args.run_dir, args.out_dir, args.force, args.allow_unfinished,
                 args.checkpoint)
    print(f"exported {args.run_dir} to {out} (SAELens format: {CFG_FILE}, {WEIGHTS_FILE})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(parse_args(argv)))

