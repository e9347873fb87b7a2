"""Held-out evaluations (docs/method.md sec. 6), one file each in this package.

An evaluation is a subclass of `Evaluator` (eval/base.py) registered in `EVALUATORS` under
its name; its settings are the block `eval.<name>` of the config, which the schema takes
from the registry. So adding an evaluation edits no other file.
"""

from gsae_pl.eval.base import EVALUATORS, Evaluator, Settings, build_evaluators, eval_schema

__all__ = ["EVALUATORS", "Evaluator", "Settings", "build_evaluators", "eval_schema"]
