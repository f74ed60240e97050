"""Typed configs: every component's params are one frozen dataclass, parsed strictly from a mapping.

Why one style: params come from YAML sections and ``--set key=value`` (parsed as YAML). Each component (a stage, a
loop, a synthesis method, an online feed, a student term) declares its params once, as the fields of a
dataclass: their defaults and their types. :func:`parse` turns a mapping into that dataclass over its defaults
(or over a parent's values, so a method's params section only names what differs): an unknown key or a value of
the wrong type is one :class:`~dfkd_common.errors.DfkdError` line naming it (the rules of
:func:`dfkd_common.params.check_params`, which this reads its checks from), and numbers given as strings
(YAML 1.1 reads ``4e-3`` as one) become numbers. What the types mean:

* ``bool``, ``int``, ``float``, ``str``: that type (an ``int`` is a ``float``; a ``bool`` is never an ``int``);
* ``X | None`` with default ``None``: ``None`` means "the default behaviour", else an ``X``;
* ``Literal["a", "b"]``: a closed choice;
* ``list[...]`` / ``tuple[...]``: a list (or tuple) of any length;
* ``dict[...]``: a mapping merged key by key over the default (``weights: {bn: 10}`` keeps the other weights),
  whose values are checked against the default's where it has them, its keys open; a field declared with
  ``field(metadata=REPLACES)`` is replaced whole instead (the student's objective: a params section that gives
  ``weights`` states the whole objective);
* a nested config dataclass (``augment``): parsed strictly in turn, over the default's values.

:func:`resolve` reads a stage's section of a params file (``common`` + the run's subsection), the options given on
the command line and ``--set`` pairs, and parses them over the stage's config.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union

from dfkd_common.errors import DfkdError
from dfkd_common.params import check_params, merge, read_section, set_pairs

T = TypeVar("T")

#: field metadata: a mapping given for this field replaces the default instead of merging into it
REPLACES = {"replaces": True}


def _inner(hint: Any) -> Any:
    """``X`` of ``X | None`` (else the hint itself)."""
    if typing.get_origin(hint) in (Union, UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else object
    return hint


def _nullable(hint: Any) -> bool:
    """Whether None is a value of the field (``X | None``, or untyped)."""
    if hint is Any or hint is object:
        return True
    return typing.get_origin(hint) in (Union, UnionType) and type(None) in typing.get_args(hint)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _check_type(hint: Any) -> Any:
    """What :func:`check_params` is told of a field whose default cannot say it (None, or a closed choice)."""
    hint = _inner(hint)
    if typing.get_origin(hint) is Literal:
        return tuple(typing.get_args(hint))
    origin = typing.get_origin(hint) or hint
    if origin in (bool, int, float, str):
        return origin
    if origin in (list, tuple):
        return list
    if origin in (dict, Mapping):
        return dict
    return object


def values(cfg: Any) -> dict[str, Any]:
    """A config as plain values (nested configs as mappings): for provenance, hashes and params files."""
    return dataclasses.asdict(cfg)


def parse(cls: type[T], given: Mapping[str, Any] | None, where: str, base: T | None = None) -> T:
    """``cls`` from ``given`` over ``base`` (default: ``cls()``), checked (see the module docstring)."""
    base = base if base is not None else cls()
    given = dict(given or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    defaults = {name: values(getattr(base, name)) if _is_config(hints[name]) else getattr(base, name)
                for name in fields}
    types: dict[str, Any] = {}
    for name in fields:
        hint = hints[name]
        if _is_config(hint):
            types[name] = dict  # its keys are checked by its own parse below
        elif defaults[name] is None or typing.get_origin(_inner(hint)) is Literal:
            types[name] = _check_type(hint)
    check_params(given, defaults, where, types=types)
    out: dict[str, Any] = {}
    for name, value in given.items():
        hint, current = hints[name], getattr(base, name)
        if value is None:
            if not _nullable(hint):
                raise DfkdError(f"{where}: param {name} cannot be null (give a value, or leave it out for the "
                                f"default {values(current) if _is_config(hint) else current!r})")
            out[name] = None
        elif _is_config(hint):
            out[name] = parse(hint, value, where, base=current)
        else:
            out[name] = _convert(value, _inner(hint), None if fields[name].metadata.get("replaces") else current)
    return dataclasses.replace(base, **out)  # type: ignore[type-var]


def spec(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """A config's defaults and the types :func:`~dfkd_common.params.check_params` cannot read from them (for
    listings and for checks of options given apart from their component, such as terms' options)."""
    base = cls()
    hints = _hints(cls)
    defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init}
    types = {name: _check_type(hints[name]) for name, value in defaults.items()
             if value is None or typing.get_origin(_inner(hints[name])) is Literal}
    return {k: values(v) if _is_config(hints[k]) else v for k, v in defaults.items()}, types


def given(path: Path, section: str, profile: str | None = None, sets: list[str] | None = None,
          seed_from: str | None = None, seeded: Mapping[str, Any] | None = None, profile_required: bool = True,
          **cli: Any) -> dict[str, Any]:
    """What a run was given, unparsed: the params file's section (``common`` + ``profile``), then the options
    given on the command line (None: not given), then ``--set`` pairs (``seeded``: values a ``--set`` into a
    mapping the file does not give starts from).

    ``seed_from`` names the top-level key a section without its own ``seed`` takes it from (``seed`` for the
    teacher and the pool, ``method_seed`` for the method stages): said by each stage, never copied silently.
    ``profile_required``: see :func:`~dfkd_common.params.read_section`.
    """
    out = merge(read_section(path, section, profile, seed_from, profile_required),
                {k: v for k, v in cli.items() if v is not None})
    for name, value in (seeded or {}).items():
        out.setdefault(name, copy.deepcopy(value))
    return set_pairs(sets, out)


def resolve(cls: type[T], path: Path, section: str, profile: str | None = None, sets: list[str] | None = None,
            where: str | None = None, seed_from: str | None = None, base: T | None = None, **cli: Any) -> T:
    """A stage's config: its defaults (or ``base``), then :func:`given`; checked and typed. A ``--set`` into a
    field that replaces (``--set weights.na=1``) adds to the default's mapping, as into any other."""
    base = base if base is not None else cls()
    seeded = {f.name: values(getattr(base, f.name)) if _is_config(_hints(cls)[f.name]) else getattr(base, f.name)
              for f in dataclasses.fields(cls) if f.metadata.get("replaces")}  # type: ignore[arg-type]
    return parse(cls, given(path, section, profile, sets, seed_from, seeded, **cli), where or section, base=base)


def _convert(value: Any, hint: Any, current: Any) -> Any:
    origin = typing.get_origin(hint) or hint
    if origin is bool or typing.get_origin(hint) is Literal:
        return value
    if origin is int:
        return int(value)
    if origin is float:
        return float(value)
    if origin is list:
        return list(value)
    if origin is tuple:
        return tuple(value)
    if origin in (dict, Mapping) and isinstance(current, Mapping):
        return merge(current, value)
    return value
