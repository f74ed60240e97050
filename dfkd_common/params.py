"""Parameter checking: every component's params are validated once, against its declared defaults.

Stages, synthesizers, online feeds and student losses each declare a ``defaults`` dict. Params come from YAML
and ``--set key=value`` (parsed as YAML), so a typo or a wrong value would otherwise surface deep inside a run
as ``ValueError: could not convert string to float`` with a traceback, or, for an unknown key, not at all.
:func:`check_params` turns both into one :class:`~dfkd_common.errors.DfkdError` line before any work starts.

The type a value must have is the type of its default: a bool default takes only booleans, an int default
integers, a float default any number, a str default strings, a list default lists, a dict default mappings
(whose keys with defaults are checked in turn). A ``None`` default accepts anything unless ``types`` names the
expected type for that key (``{"kd_steps": int}``; ``object``: anything). ``types`` may also give a tuple of the
allowed values (``{"amp": ("auto", True, False)}``): a closed choice, checked whatever the default is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dfkd_common.errors import DfkdError

#: where params came from, said once by the stage (see :func:`read_section`)
log = logging.getLogger("dfkd.params")

_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a mapping"}


def _kind(default: Any) -> type | None:
    for t in (bool, int, float, str):  # bool before int: bool is a subclass of int
        if isinstance(default, t):
            return t
    if isinstance(default, list | tuple):
        return list
    if isinstance(default, Mapping):
        return dict
    return None


def _number(value: Any, kind: type) -> bool:
    """YAML 1.1 reads ``4e-3`` as a string; accept any string the consumer's int()/float() will parse."""
    try:
        kind(value)
    except ValueError:
        return False
    return True


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, str) and kind in (int, float):
        return _number(value, kind)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is list:
        return isinstance(value, list | tuple)
    if kind is dict:
        return isinstance(value, Mapping)
    return True


def check_params(
    cfg: Mapping[str, Any],
    defaults: Mapping[str, Any],
    where: str,
    *,
    types: Mapping[str, type | tuple[Any, ...]] | None = None,
    unknown: bool = True,
    prefix: str = "",
) -> None:
    """Raise :class:`DfkdError` (one line) for an unknown key (when ``unknown``) or a value of the wrong type.

    ``where`` names the component in the message (``cpnet``, ``distill``); ``prefix`` is prepended to key names
    in messages (``weights.``). Nested mappings are checked against the nested defaults for type only: their
    key sets are open (a method may add a loss-term weight its parent lacks).
    """
    types = types or {}
    if unknown:
        known = set(defaults) | set(types)
        bad = sorted(set(cfg) - known)
        if bad:  # a typo in params.yaml must not silently run the defaults
            raise DfkdError(f"{where}: unknown param(s) {', '.join(prefix + k for k in bad)} "
                            f"(known: {', '.join(sorted(known))})")
    for key, value in cfg.items():
        if value is None:
            continue  # None means "the default behaviour" everywhere params allow it
        choice = types.get(key)
        if isinstance(choice, tuple):
            if not any(value == c and type(value) is type(c) for c in choice):
                shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choice)
                raise DfkdError(f"{where}: param {prefix}{key} must be one of {shown}, got {value!r}")
            continue
        kind = choice or (_kind(defaults[key]) if key in defaults else None)
        if kind is None:
            continue
        if not _fits(value, kind):
            raise DfkdError(f"{where}: param {prefix}{key} must be {_NAMES[kind]}, got {value!r}")
        if kind is dict and isinstance(defaults.get(key), Mapping):
            check_params(value, defaults[key], where, unknown=False, prefix=f"{prefix}{key}.")


def merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Recursive dict merge (params override defaults; nested dicts such as ``weights`` merge key by key)."""
    out = copy.deepcopy(dict(defaults))
    for k, v in (overrides or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """A short, stable digest of a run's params: the key that tells a resume whether saved work is this run's."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_weighted_terms(
    where: str,
    weights: Mapping[str, Any],
    options: Mapping[str, Any],
    kind: str,
    names: list[str],
    option_defaults: Callable[[str], tuple[Mapping[str, Any], Mapping[str, Any]]],
) -> dict[str, float]:
    """Check an objective given as ``weights: {term: w}`` and ``terms: {term: {option: value}}`` (both sides).

    ``names`` are the registered ``kind`` terms; ``option_defaults(name)`` gives a term's option defaults and
    option types. Unknown terms or options, non-numeric weights and non-mapping options are one error line.
    Returns every weight as a float.
    """
    check_params(dict(weights), dict.fromkeys(weights, 0.0), where, prefix="weights.")
    for key, given in (("weights", weights), ("terms", options)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise DfkdError(f"{where}: {key}.{unknown[0]}: no such {kind} (known: {', '.join(names)})")
    for name, opts in options.items():
        if not isinstance(opts, Mapping):
            raise DfkdError(f"{where}: terms.{name} must be a mapping of the term's options")
        defaults, types = option_defaults(name)
        check_params(dict(opts), defaults, where, types=types, prefix=f"terms.{name}.")
    return {k: float(v) for k, v in weights.items()}


def read_section(path: Path, section: str, profile: str | None = None, seed_from: str | None = None,
                 profile_required: bool = True) -> dict[str, Any]:
    """``section.common`` merged with ``section.<profile>`` of a params file (or the flat section when it has no
    ``common``). A missing ``params.yaml`` in the working directory is an empty file; any other missing file is
    an error. ``seed_from``: the top-level key whose value a section without ``seed`` takes.

    A ``profile`` is a name the user chose (``--name``): in a params file that does not have it, it is one error
    line listing the sections there are, never a silent fall-back to ``common`` (``profile_required=False``: a
    profile that may be absent, such as a synthesis method that keeps its defaults). Where the params came from
    is logged (``dfkd.params``), so a stage can say it once: a run on built-in defaults must not pass unnoticed.
    """
    if not path.exists():
        if path == Path("params.yaml"):
            log.info("params: built-in defaults (no params.yaml in %s)", Path.cwd())
            return {}
        raise DfkdError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DfkdError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DfkdError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    sec = data.get(section) or {}
    if not isinstance(sec, dict):
        raise DfkdError(f"{path}: section {section!r} must be a mapping")
    profiles = sorted(k for k, v in sec.items() if k != "common" and isinstance(v, dict)) if "common" in sec else []
    if profile and profile_required and profile not in profiles:
        raise DfkdError(f"{path}: no section {section}.{profile} (--name names one of: "
                        f"{', '.join(profiles) or f'none; {section} has no named sections'})")
    out = dict(sec.get("common", {})) if "common" in sec else dict(sec)
    used = ["common"] if "common" in sec else ([section] if sec else [])
    if profile and profile in profiles:
        out = merge(out, sec[profile])
        used.append(profile)
    if seed_from and "seed" not in out and seed_from in data:
        out["seed"] = data[seed_from]
    log.info("params: %s", f"{path}, section {section} ({' + '.join(used)})" if used
             else f"{path} has no {section} section: built-in defaults")
    return out


def read_trust(path: Path) -> list[str]:
    """The params file's top-level ``trust_code``: the modules whose model code a pipeline's stages may import
    (:mod:`dfkd_common.models.user_code`); none where the file or the key is absent."""
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DfkdError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    trusted = data.get("trust_code", []) if isinstance(data, dict) else []
    if isinstance(trusted, str):
        trusted = [trusted]
    if not isinstance(trusted, list) or not all(isinstance(t, str) for t in trusted):
        raise DfkdError(f"{path}: trust_code must be a list of module names, got {trusted!r}")
    return list(trusted)


def set_pairs(sets: list[str] | None, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--set dotted.key=value`` pairs (values parsed as YAML) assigned into ``into`` (a copy): the leaf given is
    set as it is (``--set weights={kd: 1}`` gives exactly that objective)."""
    out = copy.deepcopy(into or {})
    for item in sets or []:
        if "=" not in item:
            raise DfkdError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DfkdError(f"--set {key}: {p} is not a mapping")
        node[parts[-1]] = value
    return out
