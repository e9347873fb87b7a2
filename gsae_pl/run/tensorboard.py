"""What TensorBoard shows of a run, written from its start so running and killed runs show.

- CUSTOM SCALARS: a pinned layout of the charts a researcher watches (L0, FVU, loss
  recovered or true-feature recovery, gamma and the norm ratio, the dead fractions with
  their windows in tokens, the lr), then the loss terms.
- HPARAMS: the session starts with the run (its config, the keys that tell runs apart
  first: variant, architecture, the swept key (with its value), d_sae, seed) and ends when
  metrics.json is written; its metrics are the held-out `val/*` scalars themselves, so the
  table shows a running run's latest evaluation and a finished run's final one, with no
  duplicate `final/*` charts.
- TEXT: the resolved config, and the window behind each dead fraction.
- SCALARS: Lightning's `epoch` (always 0: training is one endless epoch) is dropped; each
  loss term's coefficient is logged as `schedule/<term>_coefficient` only when it changes
  (warm-ups), out of the way of the metrics.
The relative reconstruction bias is logged as `gamma` (docs/method.md sec. 5); metrics.json
keeps its established key `relative_reconstruction_bias` (METRICS_JSON_NAMES in train.py).
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from gsae_pl.run.progress import dead_windows

# The held-out metrics each evaluation yields that the HParams table compares (a new
# evaluation's metrics join it by a line here); one a run does not yield stays empty.
HPARAMS_METRICS = {
    "reconstruction": ("l0", "fvu", "gamma", "norm_ratio", "dead_fraction", "mse",
                       "dense_fraction"),
    "loss_recovered": ("loss_recovered", "delta_lm_loss"),
    "ground_truth": ("mmcs", "fraction_recovered"),
}
WATCH, LOSSES = "gsae_pl: what to watch", "gsae_pl: loss terms"


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger without the `epoch` scalar; remembers the latest value
    of each scalar (`latest`) for the progress lines (gsae_pl/run/progress.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latest: dict[str, float] = {}

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        self.latest.update({k: float(v) for k, v in metrics.items()})
        super().log_metrics(metrics, step)


def flat_config(cfg) -> dict:
    """Config as flat `a.b.c: value` pairs in the config's order (lists as text)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) \
                    else str(value)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def sparsity_key(cfg) -> str | None:
    """The key that sets the run's sparsity: the penalty's coefficient, or k for the
    architectures that select k features (none for a run with neither)."""
    if cfg.loss.sparsity.enabled:
        return "loss.sparsity.coefficient"
    return "sae.k" if "k" in cfg.sae else None


def distinguishing_keys(cfg) -> list[str]:
    """The keys that tell one run from another, in the order a reader asks: the variant,
    the architecture, the swept key (its column holds its value), the sparsity knob (a
    plain fit has no sweep, and lambda is what a user changes first), d_sae, the seed.
    TensorBoard's HParams table shows its first five columns by default."""
    keys = ["output.variant", "sae.architecture"]
    if cfg.output.sweep:
        keys.append(cfg.output.sweep)
    keys += [*filter(None, [sparsity_key(cfg)]), "sae.d_sae", "seed"]
    return list(dict.fromkeys(keys))


def shown_values(cfg) -> dict:
    """flat_config, with the variant of a run outside a suite (None) shown as its name."""
    flat = flat_config(cfg)
    if cfg.output.variant is None:  # flat_config shows it as "None"
        flat["output.variant"] = f"(no suite) {cfg.output.name}"
    return flat


def hparams_order(cfg) -> list[str]:
    first = distinguishing_keys(cfg)
    return first + [key for key in flat_config(cfg) if key not in first]


# TensorBoard's HParams table ticks only the first five metrics: the ones a researcher
# compares first (loss recovered on LM data, MMCS on synthetic data), then the rest.
HEADLINE = ("l0", "fvu", "loss_recovered", "mmcs", "gamma", "dead_fraction")


def metric_tags(evaluators) -> list[str]:
    """The HParams metrics of a run with these evaluations: HEADLINE's first, then the
    others in HPARAMS_METRICS's order."""
    names = [name for evaluator, names in HPARAMS_METRICS.items()
             if evaluator in evaluators for name in names]
    first = [name for name in HEADLINE if name in names]
    return [f"val/{name}" for name in first + [n for n in names if n not in first]]


def layout(cfg, evaluators) -> dict:
    """The CUSTOM SCALARS layout: {category: {chart title: ["Multiline", [tag regexes]]}}.
    Titles depend only on settings, so the runs of a suite share each chart."""
    w = {k: f"{v:,}" for k, v in dead_windows(cfg).items()}
    charts = {"L0 (active features per token)": [r"^(train|val)/l0$"],
              "FVU (1 - explained variance)": [r"^(train|val)/fvu$"]}
    if "loss_recovered" in evaluators:
        charts["loss recovered"] = [r"^val/loss_recovered$"]
    if "ground_truth" in evaluators:
        charts["true features: MMCS, fraction recovered"] = [r"^val/(mmcs|fraction_recovered)$"]
    charts["gamma and norm ratio (1: no shrinkage)"] = [r"^(train|val)/(gamma|norm_ratio)$"]
    charts[f"dead fraction (val: {w['val']} held-out tokens; train: last {w['train']} tokens;"
           f" resample: last {w['resample']} tokens)"] = [
        r"^(train|val|resample)/dead_fraction$"]
    charts["learning rate"] = [r"^lr$"]
    return {WATCH: {title: ["Multiline", tags] for title, tags in charts.items()},
            LOSSES: {"loss terms": ["Multiline", [r"^loss/"]]}}


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    summary = Summary()
    summary.value.add(tag=tag, metadata=hparams_metadata.create_summary_metadata(data),
                      tensor=hparams_metadata.NULL_TENSOR)
    return summary


def _type_of(value) -> int:
    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL
    return api_pb2.DATA_TYPE_FLOAT64 if isinstance(value, (int, float)) else \
        api_pb2.DATA_TYPE_STRING


def hparams_start(cfg, evaluators) -> list[Summary]:
    """The experiment (hparams in `hparams_order`, the distinguishing ones marked as
    differing: TensorBoard lists those first) and this run's session start."""
    flat = shown_values(cfg)
    first = set(distinguishing_keys(cfg))
    infos = [api_pb2.HParamInfo(name=key, type=_type_of(flat.get(key)), differs=key in first)
             for key in hparams_order(cfg)]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag),
                                  dataset_type=api_pb2.DATASET_VALIDATION)
               for tag in metric_tags(evaluators)]
    experiment = plugin_data_pb2.HParamsPluginData(
        version=hparams_metadata.PLUGIN_DATA_VERSION,
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics))
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key in hparams_order(cfg):
        value = flat.get(key)
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = str(value)
    session = plugin_data_pb2.HParamsPluginData(version=hparams_metadata.PLUGIN_DATA_VERSION,
                                                session_start_info=start)
    return [_hparams_summary(hparams_metadata.EXPERIMENT_TAG, experiment),
            _hparams_summary(hparams_metadata.SESSION_START_INFO_TAG, session)]


def hparams_end(status: int = api_pb2.STATUS_SUCCESS) -> Summary:
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    data = plugin_data_pb2.HParamsPluginData(version=hparams_metadata.PLUGIN_DATA_VERSION,
                                             session_end_info=end)
    return _hparams_summary(hparams_metadata.SESSION_END_INFO_TAG, data)


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # markdown: verbatim


def windows_text(cfg) -> str:
    w = dead_windows(cfg)
    return ("A feature is dead when it fired on no token of the window:\n\n"
            f"- `val/dead_fraction` (metrics.json `dead_fraction`): the {w['val']:,} held-out "
            "tokens (eval.rows)\n"
            f"- `train/dead_fraction`: the last {w['train']:,} training tokens "
            "(log.histogram_every_n_steps x data.batch_size)\n"
            f"- `resample/dead_fraction`: the last {w['resample']:,} training tokens before "
            "a resample (resample.window_steps x data.batch_size)\n")


def write_start(logger: TensorBoardLogger, cfg, evaluators, config_yaml: str,
                step: int) -> None:
    """Layout, HParams session start and texts, once per process start (process 0)."""
    writer = logger.experiment
    writer.add_custom_scalars(layout(cfg, evaluators))
    # torch's SummaryWriter writes protos only through its file writer (as add_hparams does)
    for summary in hparams_start(cfg, evaluators):
        writer._get_file_writer().add_summary(summary, step)
    writer.add_text("config", _indented(config_yaml), step)
    writer.add_text("dead_fraction windows", windows_text(cfg), step)
    writer.flush()


def write_end(logger: TensorBoardLogger, step: int) -> None:
    """The HParams session ends: the run finished (metrics.json written)."""
    writer = logger.experiment
    writer._get_file_writer().add_summary(hparams_end(), step)
    writer.flush()


class RunSummaries(L.Callback):
    """Writes `write_start` when training starts (a resumed run: again, the same)."""

    def __init__(self, cfg, config_yaml: str):
        self.cfg, self.config_yaml = cfg, config_yaml

    def on_fit_start(self, trainer, pl_module) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if trainer.is_global_zero and logger is not None:
            write_start(logger, self.cfg, list(pl_module.evaluators), self.config_yaml,
                        trainer.global_step)


class Coefficients(L.Callback):
    """Each loss term's coefficient at the log interval, only when it changed since its
    last point (so during warm-ups): a constant needs one point, not a flat line."""

    def __init__(self, every_n_steps: int):
        self.every = every_n_steps
        self.shown: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or trainer.logger is None:
            return
        changed = {name: float(c) for name, c in pl_module.objective.coefficients(step).items()
                   if self.shown.get(name) != float(c)}
        if changed:
            self.shown.update(changed)
            trainer.logger.log_metrics({f"schedule/{name}_coefficient": c
                                        for name, c in changed.items()}, max(0, step - 1))
