"""The LightningModule: one SAE, the objective built from `loss:`, Adam with warm-ups, metrics.

Training metrics accumulate on device and are read only at log intervals (no per-step
host sync). Held-out metrics come from the validation loop over rows training never sees.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from gsae_pl.config import from_saved
from gsae_pl.data.synthetic import fraction_recovered, mmcs
from gsae_pl.losses import Objective
from gsae_pl.metrics import FeatureDensity, ReconstructionMetrics, density_summary, log10_density
from gsae_pl.resample import Resampler, lr_multiplier
from gsae_pl.saes import build_sae


class SAEModule(L.LightningModule):
    def __init__(self, cfg: dict, d_in: int):
        super().__init__()
        self.save_hyperparameters()  # the resolved config travels inside every checkpoint
        # A checkpoint's config may predate renamed or added keys: read it in today's schema.
        self.cfg = from_saved(cfg, "the checkpoint's config")
        self.objective = Objective.from_config(self.cfg.loss)
        self.sae = build_sae(self.cfg.sae, d_in, reads=self.objective.reads)
        # One scalar so that E||x||^2 = d_in (docs/method.md sec. 4); set by `prepare_from_sample`.
        self.register_buffer("norm_scale", torch.tensor(1.0))
        d_sae = self.cfg.sae.d_sae
        self.train_recon, self.val_recon = ReconstructionMetrics(d_in), ReconstructionMetrics(d_in)
        self.train_density, self.val_density = FeatureDensity(d_sae), FeatureDensity(d_sae)
        self.final_metrics: dict[str, float] = {}  # from the latest held-out evaluation
        self.evaluated_at_step = -1

    @torch.no_grad()
    def prepare_from_sample(self, sample: Tensor) -> None:
        """Estimate the normalisation scalar and initialise b_dec, before training."""
        if self.cfg.data.normalize:
            mean_sq_norm = sample.double().pow(2).sum(1).mean()
            self.norm_scale.fill_(float((self.sae.d_in / mean_sq_norm).sqrt()))
        self.sae.init_b_dec(sample * self.norm_scale, self.cfg.sae.b_dec_init)

    def forward(self, x: Tensor):
        return self.sae(x * self.norm_scale)

    # ---- training -------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> dict:
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
        # The terms ride along (detached) for gsae_pl.faults, which names a non-finite one;
        # `fired` for the dead-feature count of gsae_pl.resample.
        return {"loss": loss, "terms": {name: v.detach() for name, v in terms.items()},
                "fired": enc.fired}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.global_step  # already counts this batch's optimiser step
        # Window metrics go straight to the logger at their interval: `self.log` would
        # re-emit the cached value at every later logging step.
        if step % self.cfg.log.every_n_steps == 0:
            values = {f"train/{k}": v for k, v in self.train_recon.compute().items()}
            values.update({f"coefficient/{k}": c
                           for k, c in self.objective.coefficients(step).items()})
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
        self.sae.renormalise_decoder()

    def configure_optimizers(self):
        opt = self.cfg.optim
        # fused: one kernel over all parameters; ~10x faster than the default on CPU
        # (benchmarks/RESULTS.md), the same maths.
        adam = torch.optim.Adam(self.sae.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                fused=True)
        warmup, resample = max(1, opt.warmup_steps), self.cfg.resample
        schedule = torch.optim.lr_scheduler.LambdaLR(
            adam, lambda step: min(1.0, (step + 1) / warmup) * lr_multiplier(step, resample))
        return {"optimizer": adam, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_callbacks(self):
        # Dead-feature resampling (docs/method.md sec. 4) is a switch: a callback only when on.
        resampler = [Resampler(self.cfg.resample, self.cfg.sae.d_sae, self.cfg.seed)] \
            if self.cfg.resample.enabled else []
        # Then the architecture's own (a stage switch), so a revival precedes the switch.
        return resampler + self.sae.callbacks(self.cfg)

    # ---- held-out evaluation --------------------------------------------------------
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x = batch * self.norm_scale
        x_hat, enc = self.sae(x)
        self.val_recon.update(x, x_hat, enc.fired)
        self.val_density.update(enc.fired, x.shape[0])

    def on_validation_epoch_end(self) -> None:
        values = dict(self.val_recon.compute())
        values.update(self._log_histogram("val", self.val_density.compute()))
        values.update(self._ground_truth_scores())
        values.update(self._loss_recovered())
        # Already reduced across processes by the metrics themselves: no sync_dist.
        self.log_dict({f"val/{k}": torch.as_tensor(v, dtype=torch.float32)
                       for k, v in values.items()})
        self.final_metrics = {name: float(v) for name, v in values.items()}
        self.evaluated_at_step = self.global_step
        self.val_recon.reset()
        self.val_density.reset()

    def _loss_recovered(self) -> dict[str, float]:
        """CE with the SAE spliced into the LM on held-out windows (LM sources only)."""
        source = getattr(getattr(self.trainer, "datamodule", None), "source", None)
        lm = getattr(source, "lm", None)
        if lm is None or self.cfg.eval.lm_contexts == 0:
            return {}
        from gsae_pl import lm_eval

        rank, world = self.trainer.global_rank, self.trainer.world_size
        tokens, documents = lm.heldout_windows(self.cfg.eval.lm_contexts)
        # One document numbering for every process, made before the windows are dealt out
        # (disjoint shares), so the processes' sums add up (lm_eval.py).
        _, documents = documents.unique(return_inverse=True)
        n_documents = int(documents.max()) + 1
        # The spliced activation is the reconstruction on the raw scale: x_hat / norm_scale.
        sums = lm_eval.ce_sums(lm, tokens[rank::world],
                               lambda x: self(x.to(self.device))[0] / self.norm_scale,
                               documents[rank::world], n_documents)
        sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum")
        return lm_eval.loss_recovered(sums.cpu())

    def _ground_truth_scores(self) -> dict[str, float]:
        datamodule = getattr(self.trainer, "datamodule", None)
        truth = getattr(getattr(datamodule, "source", None), "true_features", None)
        if truth is None:
            return {}
        W_dec = self.sae.W_dec.detach()
        truth = truth.to(W_dec)
        return {"mmcs": mmcs(truth, W_dec), "fraction_recovered": fraction_recovered(truth, W_dec)}

    # ---- logging helpers -------------------------------------------------------------
    def _log_step(self) -> int:
        """The x-axis Lightning's `self.log` uses: the index of the last optimiser step."""
        return max(0, self.global_step - 1)

    def _write(self, values: dict) -> None:
        if self.logger is not None:  # metrics are still computed without a logger
            self.logger.log_metrics({k: float(v) for k, v in values.items()}, self._log_step())

    def _log_histogram(self, prefix: str, density: Tensor) -> dict[str, Tensor]:
        """Log the log10 feature-density histogram; return the dead/dense summary."""
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):
            experiment.add_histogram(f"{prefix}/log10_feature_density",
                                     log10_density(density).float().cpu(), self._log_step())
        return density_summary(density, self.cfg.log.dense_threshold)
