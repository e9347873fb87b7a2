"""`python -m gsae_pl.inspect RUN_DIR`: a look inside a finished run's latents.

For each latent asked for (`--latents most-active --n 20`, the default: the latents that
fire on the most held-out rows; or `--latents 3,17,42`): its firing density on the
held-out rows (the `eval.rows` rows the run's metrics come from), its top `--k` held-out
activations with the activating token highlighted in its text (on an LM source; the
held-out row's number otherwise), and on an LM source the output tokens its decoder
direction promotes most (gsae_pl/inspect_latents.py). Written as one static page,
RUN_DIR/inspect/latents.html, and as TensorBoard texts (TEXT tab) in the run's own event
folder, one per latent: both replaced whole at each call. Activations are the SAE's f,
the same as its SAELens export gives on raw activations (gsae_pl/saelens.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from gsae_pl.cli import ArgumentParser, run_main
from gsae_pl.config import from_saved
from gsae_pl.errors import UserError
from gsae_pl.inspect_html import Context, Inspection, Latent, about_markdown, markdown, page
from gsae_pl.inspect_latents import (
    RunningTopK,
    lm_rows,
    most_active,
    promoted_tokens,
    residual_directions,
    scan,
)
from gsae_pl.io import atomic_write, atomic_write_text
from gsae_pl.run.checkpointing import (
    DamagedCheckpoint,
    checkpoint_dir,
    latest_checkpoint,
    read_checkpoint,
)
from gsae_pl.run.datamodule import build_source, describe
from gsae_pl.saes.base import build_sae

PAGE = Path("inspect") / "latents.html"  # in the run folder
EVENTS_SUFFIX = ".inspect"  # the event file of the texts: events.out.tfevents.*.inspect
BEFORE, AFTER = 12, 4  # tokens shown before and after the activating one
N_PROMOTED = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gsae_pl.inspect", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run folder written by fit")
    parser.add_argument("--latents", default="most-active",
                        help="most-active (default), or latent indices: 3,17,42")
    parser.add_argument("--n", type=int, default=20,
                        help="how many latents with --latents most-active (default 20)")
    parser.add_argument("--k", type=int, default=10,
                        help="top held-out activations shown per latent (default 10)")
    args = parser.parse_args(argv)
    if args.n <= 0:
        raise UserError(f"--n {args.n}: the number of latents must be at least 1")
    if args.k <= 0:
        raise UserError(f"--k {args.k}: the number of top activations must be at least 1")
    args.indices = _indices(args.latents)
    return args


def _indices(text: str) -> list[int] | None:
    """None for most-active, else the indices in the order given, each once."""
    if text == "most-active":
        return None
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--latents {text}: give most-active, or latent indices separated "
                        "by commas (e.g. --latents 3,17,42)") from None
    return list(dict.fromkeys(indices))


def _check_indices(indices: list[int] | None, d_sae: int, run_dir: Path) -> None:
    bad = [i for i in indices or [] if not 0 <= i < d_sae]
    if bad:
        raise UserError(f"--latents: latent {bad[0]} is out of range: the SAE of {run_dir} "
                        f"has d_sae={d_sae} latents, numbered 0 to {d_sae - 1}")


_RUN = "pass <output.dir>/<output.name> of a run that python -m gsae_pl.fit trained"


def read_finished_run(run_dir: Path):
    """The config (today's schema), weights and step of a finished run's newest
    checkpoint: the SAE its metrics.json describes."""
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found: {_RUN}")
    if not (run_dir / "config.yaml").is_file() and not checkpoint_dir(run_dir).is_dir():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml, no checkpoints/): "
                        f"{_RUN}")
    if not (run_dir / "metrics.json").is_file():
        raise UserError(f"{run_dir} has not finished (no metrics.json): rerun its fit "
                        "command, which resumes it, then inspect it")
    damaged = "it is damaged; rerun the run's fit command with --force to train it again"
    try:
        ckpt = latest_checkpoint(run_dir)
    except UserError:  # its last.ckpt cannot be read
        raise UserError(f"cannot read checkpoint {checkpoint_dir(run_dir) / 'last.ckpt'}: "
                        f"{damaged}") from None
    if ckpt is None:
        raise UserError(f"{run_dir} holds no checkpoint (checkpoints/*.ckpt): {_RUN}")
    try:
        step, saved, weights = read_checkpoint(ckpt)
    except DamagedCheckpoint as err:
        raise UserError(f"cannot read checkpoint {ckpt} ({err.reason}): {damaged}") from None
    if weights is None:
        raise UserError(f"cannot read checkpoint {ckpt} (no state_dict): {damaged}")
    return from_saved(saved, f"checkpoint {ckpt}"), weights, step


def token_text(tokenizer, token: int) -> str:
    """A token as text; a byte-level piece that is no whole UTF-8 character on its own as
    the tokenizer's name for it (e.g. 'âĢ'), not a replacement character."""
    text = tokenizer.decode([token])
    return tokenizer.convert_ids_to_tokens(token) if "\ufffd" in text else text


def load_sae(cfg, weights: dict[str, Tensor]):
    """The run's SAE in evaluation mode on its plain-autograd path (dense codes), and its
    normalisation scalar: the SAE reads x * norm_scale (docs/method.md sec. 4)."""
    d_in = int(weights["sae.W_dec"].shape[1])
    sae = build_sae(cfg.sae, d_in)
    sae.load_state_dict({name[len("sae."):]: value for name, value in weights.items()
                         if name.startswith("sae.")})
    sae.reference_only = True  # dense f, whatever kernel trained it
    return sae.eval(), float(weights["norm_scale"])


def _say(message: str, start: float) -> None:
    print(f"inspect: {message} ({time.perf_counter() - start:.1f} s)", file=sys.stderr,
          flush=True)


def inspect_run(run_dir: Path, indices: list[int] | None, n: int, k: int,
                start: float | None = None) -> Inspection:
    start = time.perf_counter() if start is None else start
    cfg, weights, step = read_finished_run(run_dir)
    d_sae = int(weights["sae.W_dec"].shape[0])
    _check_indices(indices, d_sae, run_dir)
    sae, norm_scale = load_sae(cfg, weights)
    _say(f"opening {describe(cfg)}", start)
    source = build_source(cfg)
    if source.d_in != sae.d_in:
        raise UserError(f"{describe(cfg)} now gives rows of width {source.d_in}, but the SAE of "
                        f"{run_dir} reads width {sae.d_in}: the data changed since training")
    n_rows, lm = int(cfg.eval.rows), source.lm
    _say(f"reading {n_rows:,} held-out rows of {describe(cfg)} through {d_sae:,} latents",
         start)
    if lm is not None:
        chunks, places = lm_rows(lm, n_rows)
    else:
        chunks, places = iter([source.eval_rows(n_rows)]), None
    best = scan(lambda x: sae.encode(x * norm_scale).f, chunks, k, d_sae)
    _say("held-out pass done", start)
    density = best.density()
    chosen = indices if indices is not None else most_active(density, n)
    latents = [Latent(i, float(density[i]), int(best.fired[i]),
                      _contexts(best, i, places, lm)) for i in chosen]
    note = _add_promoted(latents, sae, norm_scale, lm)
    how = (f"The {len(chosen)} latents that fire on the most held-out rows" if indices is None
           else f"Latents {', '.join(map(str, chosen))}")
    facts = [("run folder", str(run_dir)), ("checkpoint step", f"{step:,}"),
             ("architecture", str(cfg.sae.architecture)), ("d_sae", f"{d_sae:,}"),
             ("d_in", f"{sae.d_in:,}"), ("data", describe(cfg)),
             ("held-out rows", f"{n_rows:,} (eval.rows: those the run's metrics come from)")]
    return Inspection(run=run_dir.name, step=step, facts=facts, rows=n_rows, chosen=how,
                      latents=latents, promoted_note=note, notes=_notes(lm, note))


def _notes(lm, promoted_note: str) -> list[str]:
    notes = ["Activation: the latent's f on the row, as the SAE (and its SAELens export, "
             "on raw activations) computes it."]
    if lm is None:
        notes.append("Not a language-model source: contexts are held-out row numbers, and "
                     "there are no tokens to promote.")
    elif promoted_note.startswith("none"):
        notes.append(f"Promoted tokens: {promoted_note}.")
    return notes


def _contexts(best: RunningTopK, latent: int, places: Tensor | None, lm) -> list[Context]:
    out = []
    for activation, row in best.top(latent):
        if places is None:
            out.append(Context(activation, f"held-out row {row}"))
            continue
        window, position = (int(v) for v in places[row])
        tokens = lm.heldout[window]
        lo, hi = max(0, position - BEFORE), min(len(tokens), position + AFTER + 1)
        texts = [token_text(lm.bridge.tokenizer, int(t)) for t in tokens[lo:hi]]
        out.append(Context(activation, f"window {window}, token {position}", texts,
                           position - lo))
    return out


def _add_promoted(latents: list[Latent], sae, norm_scale: float, lm) -> str:
    """Fill each latent's promoted tokens on an LM source; the page's note on them."""
    if lm is None or not latents:
        return "none: not a language-model source"
    rows = torch.tensor([lat.index for lat in latents])
    directions = sae.W_dec.detach()[rows].float() / norm_scale  # raw-activation units
    residual = residual_directions(lm.bridge, lm.hook, directions)
    if residual is None:
        return (f"none: {lm.hook} has no linear path of its own to the residual stream, "
                "so no unembedding to read its directions through")
    values, ids = promoted_tokens(residual, lm.bridge.W_U, N_PROMOTED)
    for lat, vals, toks in zip(latents, values.tolist(), ids.tolist()):
        lat.promoted = [(token_text(lm.bridge.tokenizer, t), v) for t, v in zip(toks, vals)]
    path = "W_dec row" + (" @ W_out" if "mlp.hook_post" in lm.hook else "") + " @ W_U"
    return (f"{path}, the decoder row in raw-activation units: the logit each token gains "
            "per unit of activation on the direct path (no final LayerNorm)")


def write_tensorboard(run_dir: Path, step: int, texts: dict[str, str]) -> Path:
    """The texts as one event file in the run folder (TensorBoard's logdir for the run),
    written whole; the event file of an earlier inspect is removed after."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp, filename_suffix=EVENTS_SUFFIX)
        for tag, text in texts.items():
            writer.add_text(tag, text, step)
        writer.close()
        (events,) = Path(tmp).glob(f"events.out.tfevents.*{EVENTS_SUFFIX}")
        target = run_dir / events.name
        atomic_write(target, lambda fh: fh.write(events.read_bytes()))
    for old in run_dir.glob(f"events.out.tfevents.*{EVENTS_SUFFIX}"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def texts(view: Inspection) -> dict[str, str]:
    """TensorBoard text tags: one per latent, numbered in the page's order."""
    width = max(2, len(str(len(view.latents))))
    out = {f"inspect/{0:0{width}d}_about": about_markdown(view)}
    for rank, latent in enumerate(view.latents, 1):
        out[f"inspect/{rank:0{width}d}_latent_{latent.index}"] = markdown(latent, view)
    return out


def _main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    view = inspect_run(args.run_dir, args.indices, args.n, args.k, start)
    html_path = args.run_dir / PAGE
    atomic_write_text(html_path, page(view))
    events = write_tensorboard(args.run_dir, view.step, texts(view))
    _say("page and texts written", start)
    print(f"wrote {html_path} ({len(view.latents)} latents) and their TensorBoard texts "
          f"({events.name}: the TEXT tab)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
