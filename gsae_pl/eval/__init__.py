"""Held-out evaluations, one file each; what an evaluation is and their registry:
eval/base.py (docs/method.md sec. 6)."""
