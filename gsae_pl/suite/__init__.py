"""Ablation suites: the suite file (spec.py), its launcher, rendezvous, report and plots."""
