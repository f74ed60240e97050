"""check_params: the one place a component's params are checked against its defaults."""

from __future__ import annotations

import pytest

from dfkd_common.errors import DfkdError
from dfkd_common.params import check_params

DEFAULTS = {"lr": 0.1, "steps": 10, "amp": True, "name": "x", "betas": [0.5, 0.9], "weights": {"bn": 1.0},
            "chunk": None}


def test_accepts_values_of_the_defaults_types() -> None:
    check_params({"lr": 1, "steps": 3, "amp": False, "name": "y", "betas": (0.1, 0.2), "weights": {"bn": 2},
                  "chunk": "anything"}, DEFAULTS, "m")
    check_params({"lr": "4e-3"}, DEFAULTS, "m")  # YAML 1.1 reads 4e-3 as a string; float() parses it


@pytest.mark.parametrize(("cfg", "message"), [
    ({"lr": "fast"}, "m: param lr must be a number, got 'fast'"),
    ({"steps": 2.5}, "m: param steps must be an integer, got 2.5"),
    ({"steps": True}, "m: param steps must be an integer"),  # bool is an int in Python, not here
    ({"amp": "yes"}, "m: param amp must be a boolean"),
    ({"betas": 0.5}, "m: param betas must be a list"),
    ({"weights": {"bn": "x"}}, "m: param weights.bn must be a number"),
    ({"lrr": 0.1}, "m: unknown param(s) lrr"),
    ({"chunk": "x"}, "m: param chunk must be an integer"),
])
def test_rejects_with_one_line(cfg: dict, message: str) -> None:
    with pytest.raises(DfkdError) as err:
        check_params(cfg, DEFAULTS, "m", types={"chunk": int} if "chunk" in cfg else None)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_nested_keys_are_open_and_unknown_can_be_allowed() -> None:
    check_params({"weights": {"adv": 1.0}}, DEFAULTS, "m")  # a method may add a term its parent lacks
    check_params({"other": 1}, DEFAULTS, "m", unknown=False)
