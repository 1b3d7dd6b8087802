"""Typed configs: dataclass defaults <- a TOML file <- ``key.sub=value`` overrides.

Recipes declare their config as (nested) dataclasses; this module fills them and rejects
unknown keys with the list of valid ones, so a typo never silently runs the default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["load_config", "update_config", "config_to_dict", "dump_toml", "preset_path"]

C = TypeVar("C")


def preset_path(recipe: str, name: str) -> Path:
    """Path of a config shipped with the package (``recipes/configs/<recipe>/<name>.toml``)."""
    return Path(str(resources.files("sparsedistill.recipes") / "configs" / recipe / f"{name}.toml"))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings need no quotes on the command line


def _build(base: Any, data: dict[str, Any], where: str) -> Any:
    """``base`` (a dataclass instance) with ``data`` applied; nested tables update nested defaults."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in [{where or 'top level'}]; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        current = getattr(base, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config [{sub}] must be a table")
            kwargs[name] = _build(current, value, sub)
        else:
            kwargs[name] = _coerce(value, hints[name], sub)
    return dataclasses.replace(base, **kwargs)


def update_config(base: C, table: dict[str, Any], where: str = "") -> C:
    """A copy of the config ``base`` with the nested ``table`` applied (as a TOML file would); ``where`` names the
    table in errors. For configs that carry variations of their own sections (e.g. a recipe's named arms)."""
    return _build(base, table, where)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"config key {where} expects a list, e.g. {where}=[{value!r}]")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        coerced = [_coerce(v, item, where) for v in value]
        return coerced if origin is list else tuple(coerced)
    if origin in (typing.Union, types.UnionType):
        return value
    if typ in (int, float) and isinstance(value, bool) or typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ValueError(f"config key {where} expects {typ.__name__}, got {value!r}")
    return value


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def load_config(cls: type[C], source: str | Path | None = None, overrides: list[str] | None = None, recipe: str = "") -> C:
    """Build ``cls`` from its defaults, a TOML file or a ``recipe``'s preset name, then ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if source:
        path = Path(source)
        if not path.exists() and not path.suffix and recipe:
            path = preset_path(recipe, str(source))
        if not path.exists():
            where = f" or a preset in {preset_path(recipe, 'x').parent}" if recipe else ""
            raise FileNotFoundError(f"config {source!r} not found (a TOML path{where})")
        data = tomllib.loads(path.read_text())
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        _set_path(data, key.strip(), _parse_value(text.strip()))
    return _build(cls(), data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_toml(cfg: Any) -> str:
    import tomli_w  # only writers need it (the GPU benchmark machine lacks it)

    return tomli_w.dumps(config_to_dict(cfg))
