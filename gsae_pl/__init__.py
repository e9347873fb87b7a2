"""gsae_pl: gated sparse autoencoders in PyTorch Lightning (see README.md).

The package's layout (CONTRIBUTING.md): saes/ (architectures), losses/ (loss terms),
eval/ (held-out evaluations), data/ (activation sources, the tiny LM, the activation cache),
run/ (one training run: the LightningModule, trainer wiring, checkpoints, faults), suite/
(ablation suites: spec, launcher, report), saelens.py (interop), and the entry points
fit.py, ablate.py, report.py, export.py.
"""


def load_sae(path, device="cpu"):
    """An SAE exported in SAELens's format, on raw activations (gsae_pl/saelens.py)."""
    from gsae_pl.saelens import load_sae as load  # here: export's imports bring Lightning

    return load(path, device)


__all__ = ["load_sae"]
