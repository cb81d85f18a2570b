"""The one way rsjax turns a `--config` argument into a locked ConfigDict.

A config is named or given as a file, each optionally with an argument after
a colon (big_vision's convention):

    fusion                      rsjax.configs.fusion.get_config(None)
    fusion:demo,sources=lulc+s1 rsjax.configs.fusion.get_config("demo,sources=lulc+s1")
    path/to/my_config.py:demo   that file's get_config("demo")

Overrides follow as `--config.a.b=value` (or `--config.a.b value`), typed by
the field they replace; an unknown key is an error that names the closest
known key, so a typo never silently trains the default. A training run's own
`config.json` (in its workdir) loads with `config_from_workdir`.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import os
import pkgutil
from typing import Any, Iterable, Optional, Sequence

import ml_collections

from rsjax.errors import ConfigError

CONFIG_FILE = "config.json"     # what a training run saves in its workdir
OVERRIDE_PREFIX = "--config."


def config_names() -> list[str]:
    """The configs shipped with rsjax (`rsjax/configs/*.py`, without helpers)."""
    from rsjax import configs

    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                  if not m.name.startswith("_") and m.name != "common")


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """'fusion:demo,sources=s1' -> ('fusion', 'demo,sources=s1'); 'a.py' -> ('a.py', None).

    The colon that separates the argument is the first one after the file or
    module part, so Windows drive letters ('C:\\x.py:demo') survive.
    """
    head, arg = spec, None
    start = 2 if len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/" else 0
    colon = spec.find(":", start)
    if colon >= 0:
        head, arg = spec[:colon], spec[colon + 1:]
    return head, (arg or None)


def _module_for(head: str):
    if head.endswith(".py") or os.sep in head or "/" in head:
        path = os.path.abspath(head)
        if not os.path.isfile(path):
            raise ConfigError(f"--config {head}: no such config file. Give a config name "
                              f"({', '.join(config_names())}) or the path of a .py file "
                              "with get_config(arg).")
        name = "rsjax_user_config_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if head not in config_names():
        close = difflib.get_close_matches(head, config_names(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--config {head}: unknown config.{hint} Known configs: "
                          f"{', '.join(config_names())}; or give the path of a .py file.")
    return importlib.import_module(f"rsjax.configs.{head}")


def load_config(spec: str, overrides: Sequence[str] = (), lock: bool = True) -> ml_collections.ConfigDict:
    """The config named by `spec` with `overrides` ('a.b=value' or '--config.a.b=value') applied.

    A `.json` file (a run's saved config.json, relative or absolute) is that
    run's config exactly, with the overrides on top."""
    if spec.endswith(".json"):
        return config_from_file(spec, overrides, lock)
    head, arg = split_spec(spec)
    module = _module_for(head)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {head}: the file has no get_config(arg) function.")
    try:
        config = module.get_config(arg)
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as err:
        # Config files check their own arguments (unknown names, bad values).
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"--config {spec}: {message}") from err
    apply_overrides(config, overrides)
    if lock:
        config.lock()
    return config


def config_from_workdir(workdir: str | os.PathLike, overrides: Sequence[str] = (),
                        lock: bool = True) -> ml_collections.ConfigDict:
    """The config a training run saved (`<workdir>/config.json`), as a ConfigDict."""
    from etils import epath

    text = os.fspath(workdir)
    path = epath.Path(text if "://" in text else os.path.abspath(text))
    if not path.is_dir():
        raise ConfigError(f"{text}: workdir does not exist. Pass the workdir of a training run "
                          "(rsjax train --workdir ...).")
    file = path / CONFIG_FILE
    if not file.exists():
        raise ConfigError(f"{file}: no saved config in the workdir. Pass the workdir of a "
                          "training run, or give the training config with --config.")
    return config_from_file(file, overrides, lock)


def config_from_file(file: str | os.PathLike, overrides: Sequence[str] = (),
                     lock: bool = True) -> ml_collections.ConfigDict:
    """A saved config.json (a run's), as a ConfigDict with `overrides` applied."""
    from etils import epath

    text = os.fspath(file)
    file = epath.Path(text if "://" in text else os.path.abspath(text))
    if not file.is_file():
        raise ConfigError(f"--config {text}: no such file. Give a run's saved config.json "
                          "(<workdir>/config.json), a config name or a .py file.")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{file}: not valid JSON ({err}). Give the training config with "
                          "--config NAME instead.") from err
    if not isinstance(raw, dict) or "trainer" not in raw:
        raise ConfigError(f"{file}: not an rsjax run's config.json (it has no 'trainer'). "
                          "Give the config.json a training run saved in its workdir.")
    config = ml_collections.ConfigDict(_tuples_back(raw))
    apply_overrides(config, overrides)
    if lock:
        config.lock()
    return config


def _tuples_back(raw: dict) -> dict:
    """JSON has no tuples: fields that configs hold as tuples come back as lists."""
    data = raw.get("data")
    if isinstance(data, dict) and "sources" in data:
        data["sources"] = tuple(data.get("sources") or ())
    return raw


# ---------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------
def split_override_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` arguments from the rest.

    Returns (the rest, ['a.b=v', ...]).
    """
    rest, overrides = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith(OVERRIDE_PREFIX):
            key_value = token[len(OVERRIDE_PREFIX):]
            if "=" not in key_value:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{token}: give a value, as {token}=VALUE.")
                key_value = f"{key_value}={argv[i + 1]}"
                i += 1
            overrides.append(key_value)
        else:
            rest.append(token)
        i += 1
    return rest, overrides


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _all_keys(value, prefix + key + ".")
    return keys


def parse_value(text: str, current: Any, key: str) -> Any:
    """`text` as the type of the field's current value."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected true or false.")
    if current is None or isinstance(current, (tuple, list, dict)):
        if text.strip().lower() in ("none", "null"):
            return None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(current, tuple):
            if isinstance(value, str):      # 'a+b' or 'a,b'
                value = tuple(v for v in value.replace("+", ",").split(",") if v)
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if isinstance(current, list):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        return value
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"--config.{key}={text}: expected {type(current).__name__}.") from None
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies 'a.b=value' overrides in place; unknown keys are an error.

    A length named in steps (`total_steps=N`) wins over the scale's length in
    epochs: total_epochs becomes 0 unless the same overrides set it too."""
    given = set()
    for item in overrides:
        item = item[len(OVERRIDE_PREFIX):] if item.startswith(OVERRIDE_PREFIX) else item
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config.{item}: write overrides as --config.KEY=VALUE.")
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                _unknown_key(config, ".".join(parents[:depth + 1]))
            node = node[part]
        if leaf not in node:
            _unknown_key(config, key)
        value = parse_value(text, _current_value(node, leaf), key)
        try:
            node[leaf] = value
        except TypeError as err:
            raise ConfigError(f"--config.{key}={text}: {err}") from err
        given.add(key)
    if "total_steps" in given and "total_epochs" not in given and config.get("total_epochs"):
        config.total_epochs = 0.0


def _current_value(node: ml_collections.ConfigDict, leaf: str) -> Any:
    value = node[leaf]
    if value is None:
        # A FieldReference with a declared type (e.g. an optional string) parses as that type.
        field = node.get_ref(leaf) if hasattr(node, "get_ref") else None
        field_type = getattr(field, "_field_type", None)
        if field_type in (int, float, bool):
            return field_type()
        if field_type is str:
            return ""
    return value


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> None:
    close = difflib.get_close_matches(key, _all_keys(config), n=1)
    hint = f" Did you mean --config.{close[0]}?" if close else ""
    raise ConfigError(f"--config.{key}: no such config key.{hint} "
                      "(rsjax train --config NAME --show_config lists them.)")
