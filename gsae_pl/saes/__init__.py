"""Architectures, one file each; their interface, registry and builder: saes/base.py."""
