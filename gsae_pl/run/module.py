"""The LightningModule: one SAE, the objective built from `loss:`, Adam with warm-ups, metrics.

Training metrics accumulate on device and are read only at log intervals (no per-step
host sync). Held-out metrics come from the validation loop over rows training never sees.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from gsae_pl.collectives import all_gather_stack
from gsae_pl.config import from_saved
from gsae_pl.data.outliers import REFERENCE_RATIO, median_norm, outlier_rows, threshold
from gsae_pl.eval.base import EvalContext, HeldOutBatch, build_evaluators
from gsae_pl.eval.metrics import (
    FeatureDensity,
    OutlierShare,
    ReconstructionMetrics,
    density_summary,
    log10_density,
)
from gsae_pl.losses.base import Objective
from gsae_pl.resample_schedule import lr_multiplier
from gsae_pl.run.bias_histograms import BiasHistograms
from gsae_pl.run.resample import Resampler
from gsae_pl.saes.base import SAE, build_sae


class SAEModule(L.LightningModule):
    def __init__(self, cfg: dict, d_in: int, source=None):
        """`source`: the run's ActivationSource, which the held-out evaluations read (true
        features, the LM); None builds only those that need no source."""
        super().__init__()
        # The resolved config travels inside every checkpoint; the data source does not.
        self.save_hyperparameters(ignore=["source"])
        # A checkpoint's config may predate renamed or added keys: read it in today's schema.
        self.cfg = from_saved(cfg, "the checkpoint's config")
        self.objective = Objective.from_config(self.cfg.loss)
        self.sae = build_sae(self.cfg.sae, d_in, reads=self.objective.reads)
        # One scalar so that E||x||^2 = d_in (docs/method.md sec. 4); set by `prepare_from_sample`.
        self.register_buffer("norm_scale", torch.tensor(1.0))
        d_sae = self.cfg.sae.d_sae
        self.train_recon = ReconstructionMetrics(d_in)
        self.train_density = FeatureDensity(d_sae)
        self.evaluators = build_evaluators(self.cfg, d_in, source)  # gsae_pl/eval/
        # Outlier rows (data/outliers.py): the median row norm of the normalisation sample
        # (raw scale), set by `prepare_from_sample` and kept in checkpoints; 0 = not yet.
        self.outlier_ratio = float(self.cfg.data.outlier_norm_ratio)
        self.median_norm = 0.0
        self.outlier_share = OutlierShare()

    @property
    def outlier_norm(self) -> float:
        """Raw rows with a norm above this are left out of the run (inf: none are)."""
        return threshold(self.outlier_ratio, self.median_norm)

    @torch.no_grad()
    def prepare_from_sample(self, sample: Tensor) -> None:
        """Estimate the median row norm, the normalisation scalar and b_dec's init, before
        training; the last two without the outlier rows when they are left out."""
        self.median_norm = median_norm(sample)
        if self.outlier_ratio > 0:
            sample = sample[~outlier_rows(sample, self.outlier_norm)]
        if self.cfg.data.normalize:
            mean_sq_norm = sample.double().pow(2).sum(1).mean()
            self.norm_scale.fill_(float((self.sae.d_in / mean_sq_norm).sqrt()))
        self.sae.init_b_dec(sample * self.norm_scale, self.cfg.sae.b_dec_init)

    def forward(self, x: Tensor):
        return self.sae(x * self.norm_scale)

    # ---- training -------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> dict:
        if self.outlier_ratio > 0:  # off: the batch as it came, bit for bit
            batch = batch[~outlier_rows(batch, self.outlier_norm)]
        x = batch * self.norm_scale
        x_hat, enc = self.sae(x)
        terms = self.objective(x, x_hat, enc, self.sae, self.global_step)
        loss = torch.stack(list(terms.values())).sum()
        # Frozen parameters join the graph with a zero gradient, so DDP (which expects one
        # for every parameter) stays happy; on_before_optimizer_step drops them again.
        for p in self.sae.frozen_parameters():
            loss = loss + 0 * p.sum()
        self.log_dict({f"loss/{name}": value for name, value in terms.items()})
        self.log("loss/total", loss, prog_bar=True)
        with torch.no_grad():
            self.train_recon.update(x, x_hat, enc.fired)
            self.train_density.update(enc.fired, x.shape[0])
        # The terms ride along (detached) for gsae_pl.run.faults, which names a non-finite one;
        # `fired` for the dead-feature count of gsae_pl.run.resample.
        return {"loss": loss, "terms": {name: v.detach() for name, v in terms.items()},
                "fired": enc.fired}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.global_step  # already counts this batch's optimiser step
        # Window metrics go straight to the logger at their interval: `self.log` would
        # re-emit the cached value at every later logging step.
        if step % self.cfg.log.every_n_steps == 0:
            values = {f"train/{k}": v for k, v in self.train_recon.compute().items()}
            values["lr"] = self.optimizers().param_groups[0]["lr"]
            self._write(values)
            self.train_recon.reset()
        if step % self.cfg.log.histogram_every_n_steps == 0:
            summary = self._log_histogram("train", self.train_density.compute())
            self._write({f"train/{k}": v for k, v in summary.items()})
            self.train_density.reset()

    def on_before_optimizer_step(self, optimizer) -> None:
        # No gradient, so (fused) Adam skips frozen parameters and their moments entirely.
        for p in self.sae.frozen_parameters():
            p.grad = None
        # Before clipping and the step: keep only the gradient tangent to the unit sphere.
        self.sae.remove_parallel_grad()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.after_optimizer_step()

    def configure_optimizers(self):
        opt = self.cfg.optim
        # fused: one kernel over all parameters; ~10x faster than the default on CPU
        # (benchmarks/RESULTS.md), the same maths.
        adam = torch.optim.Adam(param_groups(self.sae, opt.lr), lr=opt.lr,
                                betas=(opt.beta1, opt.beta2), fused=True)
        warmup, resample = max(1, opt.warmup_steps), self.cfg.resample
        schedule = torch.optim.lr_scheduler.LambdaLR(
            adam, lambda step: min(1.0, (step + 1) / warmup) * lr_multiplier(step, resample))
        return {"optimizer": adam, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_callbacks(self):
        # Dead-feature resampling (docs/method.md sec. 4) is a switch: a callback only when on.
        resampler = [Resampler(self.cfg.resample, self.cfg.sae.d_sae, self.cfg.seed)] \
            if self.cfg.resample.enabled else []
        # Then the architecture's own (a stage switch), so a revival precedes the switch.
        return resampler + self.sae.callbacks(self.cfg) + \
            [BiasHistograms(self.cfg.log.histogram_every_n_steps)]

    # ---- resume ----------------------------------------------------------------------
    # A gated SAE with sae.kernel=auto picks its CPU path (sparse or dense, equal maths,
    # not equal bits) from the last batch's density, a host float outside the state dict.
    # Resumed at 1.0 it took the dense path where the uninterrupted run took the sparse
    # one, and the runs drifted apart (issue 25: L0 4.868 vs 4.882 after a SIGKILL at
    # step 300). Every process saves its own (DDP: they differ) and reloads its own.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["median_norm"] = self.median_norm  # fixed for the run (data/outliers.py)
        if hasattr(self.sae, "last_density"):
            mine = torch.tensor([self.sae.last_density], dtype=torch.float64,
                                device=self.device)
            gathered = all_gather_stack(mine).reshape(-1).cpu()  # [world]
            checkpoint["kernel_density"] = [float(d) for d in gathered]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "median_norm" in checkpoint:  # absent: an older checkpoint, the sample's estimate
            self.median_norm = float(checkpoint["median_norm"])
        saved = checkpoint.get("kernel_density")  # absent: an older checkpoint
        if saved and hasattr(self.sae, "last_density"):
            self.sae.last_density = saved[self.global_rank % len(saved)]

    # ---- held-out evaluation --------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        rows, documents = batch  # SAEDataModule.val_dataloader: rows and their documents
        # Outliers by the run's ratio, or (option off) by the reference ratio, for the
        # typical / outlier split of the metrics (data/outliers.py).
        ratio = self.outlier_ratio or REFERENCE_RATIO
        outlier = outlier_rows(rows, threshold(ratio, self.median_norm))
        self.outlier_share.update(rows, outlier)
        if self.outlier_ratio > 0:  # left out of every held-out metric
            rows, documents, outlier = rows[~outlier], documents[~outlier], outlier[~outlier]
            if len(rows) == 0:
                return
        x = rows * self.norm_scale
        x_hat, enc = self.sae(x)
        held_out = HeldOutBatch(documents=documents, outlier=outlier)
        for evaluator in self.evaluators.values():
            evaluator.update_batch(x, x_hat, enc, held_out)

    def on_validation_epoch_end(self) -> None:
        values, ctx = {}, self.eval_context()
        for evaluator in self.evaluators.values():
            values.update(evaluator.compute(ctx))
        values.update(self.outlier_share.compute())
        self.outlier_share.reset()
        # Already reduced across processes by the evaluators (ctx.reduce_sum): every process
        # holds the global value, so sync_dist=False, deliberately (gsae_pl/run/quiet.py
        # drops Lightning's advice to the contrary). float64, so the values fit reads back
        # from Lightning (trainer.callback_metrics, validate's return) are the computed
        # ones; TensorBoard stores float32 either way.
        self.log_dict({f"val/{k}": torch.as_tensor(v, dtype=torch.float64)
                       for k, v in values.items()}, sync_dist=False)
        for evaluator in self.evaluators.values():
            evaluator.reset()

    def eval_context(self) -> EvalContext:
        """What the evaluations see of this run (gsae_pl/eval/base.py)."""
        trainer = self._trainer  # None outside a Trainer (a module built to evaluate alone)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        reduce_sum = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer \
            else (lambda t: t)
        return EvalContext(sae=self.sae, norm_scale=self.norm_scale, device=self.device,
                           rank=rank, world_size=world, reduce_sum=reduce_sum,
                           log_histogram=self._log_histogram, outlier_norm=self.outlier_norm)

    # ---- logging helpers -------------------------------------------------------------
    def _log_step(self) -> int:
        """The x-axis Lightning's `self.log` uses: the index of the last optimiser step."""
        return max(0, self.global_step - 1)

    def _write(self, values: dict) -> None:
        values = {k: float(v) for k, v in values.items()}
        for logger in self.loggers:  # TensorBoard, and W&B when on; none: computed anyway
            logger.log_metrics(values, self._log_step())

    def _log_histogram(self, prefix: str, density: Tensor) -> dict[str, Tensor]:
        """Log the log10 feature-density histogram; return the dead/dense summary."""
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):
            experiment.add_histogram(f"{prefix}/log10_feature_density",
                                     log10_density(density).float().cpu(), self._log_step())
        return density_summary(density, self.cfg.log.dense_threshold)


def param_groups(sae: SAE, lr: float) -> list[dict]:
    """Adam's parameter groups: every parameter at `lr`, but those the architecture scales
    (`SAE.lr_scales`) in a group of their own at lr x scale. One group when none is
    scaled, so checkpoints of such runs keep their layout."""
    scales, named = sae.lr_scales(), dict(sae.named_parameters())
    unknown = set(scales) - set(named)
    if unknown:
        raise ValueError(f"{type(sae).__name__}.lr_scales names no parameter {sorted(unknown)}")
    groups = [{"params": [p for name, p in named.items() if name not in scales]}]
    groups += [{"params": [named[name]], "lr": lr * scale} for name, scale in scales.items()]
    return groups
