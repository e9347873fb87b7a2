"""What model made a run's activations, in words a reader can find it by: the exact file,
package version, quantisation and instruct-or-base for a named local model; the tiny LM's
directory (its recipe's hash) for the embedded LM; a hub name or path as given otherwise.
Read by the export (SAELens `metadata.model_name`) and the suite report's provenance."""

from __future__ import annotations

import json
from pathlib import Path

from gsae_pl.data.local_models import DONE, MODELS, installed_version

TINY_LM = ("gsae_pl tiny LM {name} (a 2-layer GPT-2 that `python -m gsae_pl.data.tiny_lm` "
           "builds offline from the Python standard library; its recipe: tiny_lm.json there)")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_identity(source: str | None, model: str | None, model_dir: str | None = None) -> \
        str | None:
    """`source`, `model`: data.source and data.model of the run's config; `model_dir`: the
    directory its activations came from (provenance.json's data.model), when known."""
    directory = Path(model_dir) if model_dir else None
    if source == "tiny_lm":
        if directory is None:
            from gsae_pl.data.tiny_lm import model_dir as default_dir

            directory = default_dir()  # the default recipe's, under this Python
        return TINY_LM.format(name=directory.name)
    named = MODELS.get(model or "")
    if named is not None:
        version = (_json(directory / DONE).get("package_version") if directory else None) \
            or installed_version(named) or "(version unknown)"
        return f"{named.gguf_file} from PyPI {named.distribution} {version}: {named.what}"
    return model
