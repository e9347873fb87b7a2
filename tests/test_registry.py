"""The plug-in registry: lookup by name, choices in the message, one name per plug-in."""

from __future__ import annotations

import pytest

from gsae_pl.errors import UserError
from gsae_pl.registry import Registry


def test_lookup_and_the_choices_an_unknown_name_lists():
    reg: Registry[int] = Registry("thing.kind", "gsae_pl.losses")
    reg.register("one")(1)
    reg.register("two")(2)
    assert reg["two"] == 2 and "one" in reg and reg.names()[:2] == ("one", "two")
    with pytest.raises(UserError, match=r"thing.kind=three is not one of: one, two"):
        reg["three"]


def test_two_plugins_cannot_share_a_name():
    reg: Registry[int] = Registry("thing.kind", "gsae_pl.losses")
    reg.register("one")(1)
    with pytest.raises(RuntimeError, match="two plug-ins named 'one'"):
        reg.register("one")(2)
