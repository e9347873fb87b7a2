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
Export replaces only an earlier export (see `check_out_dir`), and concurrent exports into
one folder take turns (`_folder_lock`).

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
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from gsae_pl.cli import ArgumentParser, run_main
from gsae_pl.config import migrate
from gsae_pl.data.model_identity import model_identity
from gsae_pl.errors import UserError
from gsae_pl.io import sweep_stale_temporaries
from gsae_pl.names import MAX_NAME_BYTES, fitting_name
from gsae_pl.run.checkpoint_checks import export_problem
from gsae_pl.run.checkpointing import (
    DamagedCheckpoint,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
)
from gsae_pl.saes.base import ARCHITECTURES, ENCODER_PARAMS
from gsae_pl.writable import check_writable_dir

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# cfg.json fields a form needs, as gsae_pl writes them (SAELens's defaults for the rest).
FORM_CFG = {"topk": {"rescale_acts_by_decoder_norm": False}}


class LoadedSAE(nn.Module):
    """An exported SAE as SAELens computes it, on raw activations."""

    stored_dtype = "float32"  # load_sae: the float type(s) the weights file held

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
    # SAELens saves bf16 and fp16 SAEs too: computed in float32 here, on a hook's float32
    # activations (bf16 and fp16 values are exact in float32; float64 is rounded once).
    stored = sorted({str(v.dtype).removeprefix("torch.") for v in params.values()})
    sae = LoadedSAE(cfg, {name: value.float() for name, value in params.items()}).eval()
    sae.stored_dtype = ", ".join(stored)  # the type(s) the file held
    return sae


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
        if not params[name].dtype.is_floating_point:
            raise UserError(f"{path / WEIGHTS_FILE}: {name} is "
                            f"{str(params[name].dtype).removeprefix('torch.')}, not a float "
                            "type: pass an SAE whose weights are floats")


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
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export at OUT_DIR (only one gsae_pl wrote)")
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
        state = load_checkpoint(ckpt)  # weights_only: a received file runs no code
    except DamagedCheckpoint as err:
        raise UserError(f"cannot read checkpoint {ckpt} ({err.reason}): {_DAMAGED}") from None
    # Weights that do not fit the config would be exported into files load_sae refuses.
    problem = export_problem(state)
    if problem:
        raise UserError(f"cannot export checkpoint {ckpt} ({problem}): {_DAMAGED}")
    step, cfg, weights = state["global_step"], state["hyper_parameters"]["cfg"], \
        state["state_dict"]
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
        raise UserError(f"cannot read checkpoint {last} ({_why_damaged(last)}): "
                        f"{_DAMAGED}{example}") from None


def _why_damaged(path: Path) -> str:
    try:
        load_checkpoint(path)
    except DamagedCheckpoint as err:
        return err.reason
    return "unreadable"


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
    check_out_dir(run_dir, out_dir, force)  # before the (slow) read: a refusal is quick
    # The files go to a temporary folder beside OUT_DIR: its parent must take them.
    check_writable_dir(out_dir.parent, "OUT_DIR's folder")
    cfg, weights, step = read_run(run_dir, allow_unfinished, checkpoint)
    params = saelens_params(cfg, weights)  # refuses before anything is written
    sae_cfg = saelens_cfg(cfg, params["b_dec"].numel(), step, float(weights["norm_scale"]),
                          provenance_model(run_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out_dir.parent):  # one export at a time beside OUT_DIR
        check_out_dir(run_dir, out_dir, force)  # again, now that it stays true
        _sweep_killed_exports(out_dir)
        tmp = _temporary(out_dir, "new")
        try:
            _write_files(tmp, params, sae_cfg)
        except BaseException:  # e.g. the disk filled: no half export left beside OUT_DIR
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _put_in_place(tmp, out_dir)
    return out_dir


# ---- what export may replace -------------------------------------------------------
# Export replaces only an earlier export of gsae_pl's: a folder holding cfg.json (with the
# "gsae_pl" record saelens_cfg writes) and at most sae_weights.safetensors beside it. Anything
# else at OUT_DIR (a run, a folder of runs, a SAELens SAE made elsewhere, a file, a symbolic
# link) is refused, --force or not: one line, exit 2, nothing touched.

def is_export(path: Path) -> bool:
    """Whether `path` is a folder export wrote (and export may therefore replace)."""
    if path.is_symlink() or not path.is_dir():
        return False
    entries = list(path.iterdir())
    if not {e.name for e in entries} <= {CFG_FILE, WEIGHTS_FILE} or \
            not all(e.is_file() and not e.is_symlink() for e in entries):
        return False
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("gsae_pl"), dict)


def check_out_dir(run_dir: Path, out_dir: Path, force: bool) -> None:
    """Refuse an OUT_DIR that export would have to delete something not its own to fill."""
    if out_dir.is_symlink():
        raise UserError(f"OUT_DIR {out_dir} is a symbolic link: pass the folder itself or a "
                        "new path (export never replaces a link or what it points to)")
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or out in run.parents:
        raise UserError(f"OUT_DIR {out_dir} is the run directory {run_dir} or a folder "
                        "above it: export into a new folder, e.g. "
                        f"{run_dir.parent / fitting_name(run_dir.name, '_saelens')}")
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if is_export(out_dir):
        if not force:
            raise UserError(f"{out_dir} already exists: pass --force to replace it")
        return
    raise UserError(f"{out_dir} {_not_an_export(out_dir)}, not an export of gsae_pl's: "
                    "export replaces only its own exports (even with --force), so choose "
                    "a new OUT_DIR or move that away")


def _not_an_export(path: Path) -> str:
    if not path.is_dir():
        return "is a file"
    if (path / "config.yaml").exists() or (path / "checkpoints").is_dir():
        return "is a run directory"
    names = sorted(e.name for e in path.iterdir())
    other = [n for n in names if n not in (CFG_FILE, WEIGHTS_FILE)]
    return f"holds {other[0]!r}" if other else f"holds a {CFG_FILE} gsae_pl did not write"


def _temporary_stem(out_dir: Path) -> str:
    """A short hidden name for OUT_DIR's temporaries (`<stem>.new.tmp<pid>`, `.old.`): a
    name of any length fits, and a killed export's leftovers are found by it."""
    digest = hashlib.sha256(out_dir.name.encode("utf-8", "surrogateescape")).hexdigest()
    return f".gsae_pl-export-{digest[:16]}"


def _temporary(out_dir: Path, kind: str) -> Path:
    return out_dir.with_name(f"{_temporary_stem(out_dir)}.{kind}.tmp{os.getpid()}")


def _sweep_killed_exports(out_dir: Path) -> None:
    """What a killed export into OUT_DIR left: its temporaries, and the `.<name>.tmp`
    folder of exports before these names (only if it holds nothing but export files)."""
    sweep_stale_temporaries(out_dir.parent, f"{_temporary_stem(out_dir)}.*.tmp*")
    legacy = f".{out_dir.name}.tmp"
    if len(legacy.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES:
        folder = out_dir.with_name(legacy)
        if folder.is_dir() and not folder.is_symlink() and \
                {e.name for e in folder.iterdir()} <= {CFG_FILE, WEIGHTS_FILE}:
            shutil.rmtree(folder)


@contextmanager
def _folder_lock(folder: Path):
    """An exclusive flock on `folder` itself, held until the block ends (the kernel drops
    it when the process dies, SIGKILL included); nothing is written to take it. Other
    exports into the folder wait their turn: each then sees the folder as the last left it."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _put_in_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to OUT_DIR. An earlier export there is first renamed aside and deleted
    after: a reader sees the old export, none for an instant, or the new one, never a mix."""
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        old = _temporary(out_dir, "old")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)  # replaces an empty folder, as `rename` may
    _fsync(out_dir.parent)


def provenance_model(run_dir: Path) -> str | None:
    """The model directory the run recorded (provenance.json's data.model), if any."""
    try:
        model = json.loads((run_dir / "provenance.json").read_text())["data"].get("model")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _write_files(tmp: Path, params: dict[str, Tensor], sae_cfg: dict) -> None:
    """Both files by plain writes: their mode is what the user's umask gives, as for cfg.json
    (safetensors' own save_file makes 0600 files a colleague cannot read)."""
    tmp.mkdir()
    with open(tmp / WEIGHTS_FILE, "wb") as fh:
        fh.write(save(params))
        os.fsync(fh.fileno())
    with open(tmp / CFG_FILE, "w") as fh:
        fh.write(json.dumps(sae_cfg, indent=2) + "\n")
        os.fsync(fh.fileno())  # on disk before the rename


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _main(args: argparse.Namespace) -> int:
    out = export(args.run_dir, args.out_dir, args.force, args.allow_unfinished,
                 args.checkpoint)
    print(f"exported {args.run_dir} to {out} (SAELens format: {CFG_FILE}, {WEIGHTS_FILE})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(parse_args(argv)))

