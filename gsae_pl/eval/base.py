"""What an evaluation is, and how a run's `eval:` settings and evaluators come from the
registry.

Every held-out batch goes through the SAE once (SAEModule.validation_step); each evaluator
sees that batch in `update` and returns its metrics from `compute`, which SAEModule logs as
`val/<metric>` and `fit` writes to metrics.json (docs/method.md sec. 6). An evaluator that
does not apply to the run's data source (no language model, no ground truth) is not built,
so it yields nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import Metric

from gsae_pl.errors import UserError
from gsae_pl.ranges import POSITIVE
from gsae_pl.registry import Registry
from gsae_pl.saes.base import SAE, Encoding


@dataclass
class EvalContext:
    """What an evaluation's `compute` is handed: the trained SAE and where it runs, never the
    training stack (gsae_pl/run/module.py builds one per evaluation)."""

    sae: SAE
    norm_scale: Tensor  # x * norm_scale is the SAE's scale (docs/method.md sec. 4)
    device: torch.device
    rank: int  # this process, of world_size
    world_size: int
    reduce_sum: Callable[[Tensor], Tensor]  # the sum over processes (identity in one)
    # (prefix, per-feature density) -> its dead / dense summary, the histogram logged
    log_histogram: Callable[[str, Tensor], dict]
    # Raw rows with a norm above this are outliers left out of the run (data/outliers.py);
    # inf: data.outlier_norm_ratio=0, none are.
    outlier_norm: float = math.inf

    def reconstruct_raw(self, x: Tensor) -> Tensor:
        """The SAE's reconstruction of raw activations x, on the raw scale; an outlier row
        left out of the run keeps its own activation (loss recovered splices the SAE only
        at kept positions)."""
        x = x.to(self.device)
        if math.isinf(self.outlier_norm):
            return self.sae(x * self.norm_scale)[0] / self.norm_scale
        out, kept = x.clone(), x.double().norm(dim=1) <= self.outlier_norm
        out[kept] = (self.sae(x[kept] * self.norm_scale)[0] / self.norm_scale).to(x.dtype)
        return out


@dataclass
class HeldOutBatch:
    """What the validation loop knows of a held-out batch's rows beyond their values."""

    documents: Tensor  # int64 [B]: each row's held-out document (data/base.py)
    # bool [B]: rows beyond data/outliers.py's REFERENCE_RATIO x the median norm, when
    # data.outlier_norm_ratio=0 (the typical / outlier split); all False when outliers are
    # left out of the run (they never reach an evaluator then).
    outlier: Tensor


@dataclass
class Settings:
    """The block `eval.<name>`: every evaluation has the switch; subclass it to add fields."""

    enabled: bool = True


class Evaluator(nn.Module):
    """One held-out evaluation. A module, so that torchmetrics states inside it follow the
    SAE's device and sum over DDP processes; it holds no checkpointed state."""

    Settings: type[Settings] = Settings  # the dataclass of its `eval.<name>` block

    @classmethod
    def applies(cls, settings: DictConfig, source) -> bool:
        """Whether it measures anything on this data source (None: a module built without
        one, e.g. for export). Default: every source."""
        return True

    def __init__(self, settings: DictConfig, cfg: DictConfig, d_in: int, source):
        """`settings`: its own block; `cfg`: the whole run config; `source`: the run's
        ActivationSource (data/base.py)."""
        super().__init__()
        self.settings = settings

    def update(self, x: Tensor, x_hat: Tensor, enc: Encoding) -> None:
        """One held-out batch on the SAE's scale (x * norm_scale) and the SAE's output."""

    def update_batch(self, x: Tensor, x_hat: Tensor, enc: Encoding, batch: HeldOutBatch) -> None:
        """`update`, with the rows' documents and outlier flags; the validation loop calls
        this one. Override it where the metric needs them (reconstruction.py)."""
        self.update(x, x_hat, enc)

    def document_table(self) -> dict | None:
        """Per held-out document, the sums behind its metrics at the last `compute`
        (numpy arrays with a `document` id array; gsae_pl/eval/document_stats.py), kept
        in the run folder; None: it keeps none."""
        return None

    def compute(self, ctx: EvalContext) -> dict[str, Tensor | float]:
        """The metrics after the last batch, equal on every process (reduce across them
        here, with `ctx.reduce_sum`)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the batches seen, before the next evaluation."""
        for child in self.children():
            if isinstance(child, Metric):
                child.reset()


EVALUATORS: Registry[type[Evaluator]] = Registry("eval", "gsae_pl.eval")


@dataclass
class EvalConfig:
    """What every evaluation shares. Each registered evaluation adds its block `eval.<name>`
    (`eval_schema`), so the schema is assembled when a config is made."""

    rows: int = field(default=16384, metadata=POSITIVE)
    every_n_steps: int = field(default=1000, metadata=POSITIVE)
    # Milestones: the whole evaluation again after these many training tokens (rows), each
    # kept in milestones.json (gsae_pl/run/milestones.py); [] is off. Checked by
    # `milestone_steps`.
    at_tokens: list[int] = field(default_factory=list)


def milestone_steps(cfg: DictConfig) -> dict[int, int]:
    """The optimiser step of each of `eval.at_tokens` -> the token count asked for.

    Decision (docs/method.md sec. 6): a milestone is taken after the first step by which
    the run has trained on at least that many tokens, ceil(tokens / data.batch_size) (the
    global batch), and records the tokens actually trained, step x data.batch_size. The
    counts must be positive, increasing, fall on distinct steps and lie within the run.
    """
    asked, batch = list(cfg.eval.at_tokens or []), cfg.data.batch_size
    total = cfg.trainer.max_steps * batch
    steps: dict[int, int] = {}
    for before, tokens in zip([0, *asked], asked):
        if tokens <= 0:
            raise UserError(f"eval.at_tokens: {tokens} must be a positive number of tokens")
        if tokens <= before:
            raise UserError(f"eval.at_tokens: {tokens} after {before}: list the token counts "
                            "in increasing order")
        if tokens > total:
            raise UserError(f"eval.at_tokens: {tokens} is beyond the run's {total} tokens "
                            f"(trainer.max_steps={cfg.trainer.max_steps} x data.batch_size="
                            f"{batch}): drop it or train longer")
        step = -(-tokens // batch)  # ceil
        if step in steps:
            raise UserError(f"eval.at_tokens: {steps[step]} and {tokens} both fall on step "
                            f"{step} (data.batch_size={batch} tokens a step): keep one")
        steps[step] = tokens
    return steps


def eval_schema(shared: type) -> type:
    """The dataclass of `eval:`: the fields of `shared` (every evaluation's), then one block
    per registered evaluation, named after it."""
    taken = {f.name for f in fields(shared)}
    blocks = []
    for name, evaluator in EVALUATORS.items():
        if name in taken:
            raise RuntimeError(f"evaluation {name!r} would hide the setting eval.{name}")
        blocks.append((name, evaluator.Settings, field(default_factory=evaluator.Settings)))
    return make_dataclass("EvalConfig", blocks, bases=(shared,))


def build_evaluators(cfg: DictConfig, d_in: int, source) -> nn.ModuleDict:
    """The run's evaluators: every registered one that is enabled and applies to `source`."""
    built = {}
    for name, evaluator in EVALUATORS.items():
        settings = _settings(cfg, name, evaluator)
        if settings.enabled and evaluator.applies(settings, source):
            built[name] = evaluator(settings, cfg, d_in, source)
    return nn.ModuleDict(built)


def _settings(cfg: DictConfig, name: str, evaluator: type[Evaluator]) -> DictConfig:
    # A config made before the evaluation was registered lacks its block: the defaults.
    block = OmegaConf.select(cfg, f"eval.{name}", default=None)
    return OmegaConf.merge(OmegaConf.structured(evaluator.Settings), block or {})
