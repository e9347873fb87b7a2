"""Loss terms, one file each; what a term is, their registry and the objective that sums
them: losses/base.py."""
