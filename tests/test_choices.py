"""String options are checked against their ``Literal`` type with one message naming the field and every value."""

from typing import Literal

import pytest

from neat_lightning.choices import check_choice, one_of

Colour = Literal["red", "green", "blue"]


def test_one_of_lists_every_value():
    assert one_of(("a",)) == "'a'"
    assert one_of(("a", "b")) == "'a' or 'b'"
    assert one_of(["a", "b", "c"]) == "'a', 'b' or 'c'"


def test_check_choice_accepts_the_literal_values_and_names_the_field_otherwise():
    for value in ("red", "green", "blue"):
        check_choice("colour", value, Colour)
    with pytest.raises(ValueError, match=r"^colour='teal' must be 'red', 'green' or 'blue'$"):
        check_choice("colour", "teal", Colour)
    with pytest.raises(ValueError, match=r"^Config.n=3 must be 1 or 2$"):
        check_choice("Config.n", 3, (1, 2))
