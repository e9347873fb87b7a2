"""YAML reading that refuses a mapping with the same key twice.

PyYAML's `safe_load` keeps the last of two equal keys without a word, so a config that
sets `sae.d_sae` twice trains with whichever came last. `safe_load_unique_keys` is
`yaml.safe_load` that raises `DuplicateKeyError` instead (a `yaml.YAMLError`, so callers'
existing YAML error handling catches it). gsae_pl/config.py reads config files with it.
"""

from __future__ import annotations

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping repeats a key; `key`, `line` and `first_line` (1-based) say where."""

    def __init__(self, key, node: yaml.Node, first: yaml.Node):
        self.key, self.line = key, node.start_mark.line + 1
        self.first_line = first.start_mark.line + 1
        super().__init__(None, None, f"duplicate key {key!r}", node.start_mark)


class UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merge keys may repeat legitimately
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(key, key_node, first)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique_keys(text: str):
    """`yaml.safe_load(text)`, but a repeated mapping key raises `DuplicateKeyError`."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
