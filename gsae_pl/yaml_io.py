"""YAML reading that refuses a mapping with the same key twice, and reads only true/false
as booleans.

PyYAML's `safe_load` keeps the last of two equal keys without a word, so a config that
sets `sae.d_sae` twice trains with whichever came last. `safe_load_unique_keys` is
`yaml.safe_load` that raises `DuplicateKeyError` instead (a `yaml.YAMLError`, so callers'
existing YAML error handling catches it). gsae_pl/config.py reads config files with it.

PyYAML also follows YAML 1.1, where on/off/yes/no are booleans: `name: on` would become
the run name "True". Here they stay the words written (YAML 1.2's rule); a boolean setting
still takes them, since OmegaConf reads on/off/yes/no into a bool field.
"""

from __future__ import annotations

import copy
import functools
import re

import yaml

BOOL_TAG = "tag:yaml.org,2002:bool"
YAML_11_ONLY_BOOLEANS = ("on", "off", "yes", "no")  # lower case; true/false stay booleans


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


# SafeLoader's implicit resolvers, its boolean one narrowed to true/false (module docstring).
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
UniqueKeyLoader.add_implicit_resolver(
    BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def safe_load_unique_keys(text: str):
    """`yaml.safe_load(text)`, but a repeated mapping key raises `DuplicateKeyError`.

    A suite composes configs/base.yaml and its recipes once per run (hundreds of parses of
    the same few texts), so parses are kept by text; each caller gets its own copy."""
    return copy.deepcopy(_parse(text))


@functools.lru_cache(maxsize=128)
def _parse(text: str):
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
