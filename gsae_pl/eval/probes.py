"""Linear probes on SAE latents and on the raw activations (docs/method.md sec. 6), off by
default: `eval.probes.enabled`.

The data source labels held-out rows it makes for the purpose (`probe_sets(n)`: task ->
rows, boolean labels): on an LM over Python text, whether a token lies in a string, a
comment, ... (data/code_labels.py), on one file and on all held-out files; on synthetic
data, whether a chosen true feature fired (data/synthetic.py). Sources without it (a file
of activations) get no probes. Per task, SAEBench's sparse probing (Gao et al. / Karvonen
et al. 2025, arXiv 2503.09532) on single tokens:
- a balanced set: every row of the smaller class and as many of the other, drawn with a
  fixed seed, each class halved into train and test;
- logistic regression, L2 with C = 1 (minimise sum_i log(1 + exp(-y_i (w.x_i + b)))
  + ||w||^2 / (2C), the intercept unpenalised), fitted by LBFGS in float64 on the CPU:
  deterministic, the same on every process;
- test accuracy with all latents (`acc_all`), with the k latents of largest
  |mean_pos - mean_neg| on the train half (`acc_top<k>`, k = 1, 2, 5), and the same on the
  SAE's input x (`acc_raw`, `acc_raw_top<k>`), x on the SAE's scale (docs/method.md sec. 4);
- `latents_firing`: latents non-zero on any row of the balanced set (a narrow set lighting
  few latents caps what a probe on latents can do), and `rows`, the set's size.
A latent that fires on no row is a zero column: its weight stays 0 under L2, so the
all-latents probe is fitted on the firing ones only, with the same result.
Metrics: `probe/<task>/<name>`. A task whose smaller class has fewer than MIN_PER_CLASS
rows yields nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gsae_pl.eval.base import EVALUATORS, Evaluator, Settings
from gsae_pl.seeds import stream_seed

TOP_K = (1, 2, 5)  # SAEBench's sparse probing
C = 1.0  # inverse L2 strength, sklearn's and SAEBench's default
MIN_PER_CLASS = 10  # rows of the smaller class a task needs (5 train, 5 test)
_ENCODE_ROWS = 4096  # rows per SAE forward pass


@dataclass
class ProbeSettings(Settings):
    enabled: bool = False  # a research measurement, not a training metric: off by default
    rows: int = 4096  # labelled held-out rows (tokens) the source makes per slice


def _provider(source):
    """What makes the labelled rows: the source, or the LM behind it (an activation cache)."""
    for candidate in (source, getattr(source, "lm", None)):
        if hasattr(candidate, "probe_sets"):
            return candidate
    return None


@EVALUATORS.register("probes")
class Probes(Evaluator):
    Settings = ProbeSettings

    @classmethod
    def applies(cls, settings, source) -> bool:
        return settings.rows > 0 and _provider(source) is not None

    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.provider, self.seed = _provider(source), int(cfg.seed)
        self.sets: dict[str, tuple[Tensor, Tensor]] | None = None  # made at first use

    def compute(self, ctx) -> dict:
        if self.sets is None:  # the source's LM is on this process's device by now
            self.sets = self.provider.probe_sets(self.settings.rows)
        out = {}
        for task, (rows, labels) in self.sets.items():
            gen = torch.Generator().manual_seed(stream_seed(self.seed, f"probe-{task}", 0))
            split = balanced_split(labels, gen)
            if split is None:
                continue
            index = torch.cat(split)  # train rows, then test rows
            x = rows[index] * float(ctx.norm_scale)  # on the SAE's scale
            metrics = probe_metrics(x, latents(ctx, x), labels[index], len(split[0]))
            out.update({f"probe/{task}/{name}": value for name, value in metrics.items()})
        return out


@torch.no_grad()
def latents(ctx, x: Tensor) -> Tensor:
    """The SAE's codes f of rows x (on its scale), dense float32 on the CPU."""
    chunks, dtype = [], ctx.sae.W_dec.dtype  # bf16-true runs hold bf16 weights
    for chunk in x.split(_ENCODE_ROWS):
        f = ctx.sae.encode(chunk.to(ctx.device, dtype)).f
        chunks.append((f if isinstance(f, Tensor) else f.csr().to_dense()).float().cpu())
    return torch.cat(chunks)


def balanced_split(labels: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor] | None:
    """(train, test) row indices: m positives and m negatives (m the smaller class's size),
    drawn by `gen`, each class halved; train and test alike hold both classes equally.
    None when m < MIN_PER_CLASS."""
    pos, neg = labels.nonzero().flatten(), (~labels).nonzero().flatten()
    m = min(len(pos), len(neg))
    if m < MIN_PER_CLASS:
        return None
    pos = pos[torch.randperm(len(pos), generator=gen)[:m]]
    neg = neg[torch.randperm(len(neg), generator=gen)[:m]]
    half = m // 2
    return torch.cat([pos[:half], neg[:half]]), torch.cat([pos[half:], neg[half:]])


def probe_metrics(x: Tensor, f: Tensor, y: Tensor, n_train: int) -> dict[str, float]:
    """Test accuracies on latents f and raw rows x (rows [0, n_train) train, the rest test)
    of the balanced set with labels y, and the count of latents firing on it."""
    firing = (f != 0).any(0)
    out = {"rows": float(len(y)), "latents_firing": float(firing.sum())}
    for prefix, features in (("acc", f[:, firing]), ("acc_raw", x)):
        train, test = features[:n_train], features[n_train:]
        y_train, y_test = y[:n_train], y[n_train:]
        out[f"{prefix}_all" if prefix == "acc" else prefix] = \
            probe_accuracy(train, y_train, test, y_test)
        for k in TOP_K:
            keep = top_k_by_mean_difference(train, y_train, k)
            out[f"{prefix}_top{k}"] = probe_accuracy(train[:, keep], y_train,
                                                     test[:, keep], y_test)
    return out


def top_k_by_mean_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """Indices of the k columns of largest |mean over positives - mean over negatives|
    (all of them when there are fewer), largest first; ties to the lower index."""
    score = (x[y].double().mean(0) - x[~y].double().mean(0)).abs()
    return torch.sort(score, descending=True, stable=True).indices[:k]


def probe_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> float:
    """Test accuracy of an L2 logistic regression (C) fitted on the train rows."""
    w, b = fit_logistic(x_train, y_train)
    predicted = x_test.double() @ w + b > 0
    return float((predicted == y_test).double().mean())


def fit_logistic(x: Tensor, y: Tensor, c: float = C, max_iter: int = 300) -> tuple[Tensor, Tensor]:
    """w [d], b: argmin sum_i log(1 + exp(-s_i (x_i.w + b))) + ||w||^2 / (2c), s_i = +-1.

    LBFGS from zero in float64, on the CPU, on the objective divided by n (the same
    minimiser), stopping when no gradient entry exceeds 1e-6: stricter than sklearn's
    lbfgs (1e-4), and on ~2000 tokens x ~900 latents 3x faster than 1e-10 with the same
    test accuracy. Evaluations run in inference mode: leave it to differentiate.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().double().cpu().clone()  # an inference tensor cannot be saved for grad
        s = y.detach().cpu().double().clone() * 2 - 1
        n, d = x.shape
        params = torch.zeros(d + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def objective() -> Tensor:
            opt.zero_grad()
            w, b = params[:d], params[d]
            loss = (F.softplus(-s * (x @ w + b)).sum() + w.dot(w) / (2 * c)) / n
            loss.backward()
            return loss

        opt.step(objective)
        return params[:d].detach().clone(), params[d].detach().clone()
