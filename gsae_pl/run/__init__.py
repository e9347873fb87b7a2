"""One training run: the LightningModule, trainer wiring, checkpoints, faults, resampling."""
