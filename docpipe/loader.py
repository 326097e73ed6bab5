"""YAML files validated by pydantic models, with errors that name the file, the key and the problem.

``load_model`` merges files in order (later ones override keys of earlier ones), then a run's
overrides, and validates the result; a duplicate key, a file that is not a mapping or a value
that does not validate is a ``ConfigError`` naming the file that set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration file cannot be read or does not validate."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML file into a mapping, with errors that name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _leaves(value: Any, path: tuple) -> list[tuple]:
    """Key paths of the scalars (and empty mappings) inside ``value``."""
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items() for leaf in _leaves(item, (*path, key))]
    return [path]


def _merge(base: dict, override: dict, source: Path, origin: dict, prefix: tuple = ()) -> dict:
    """Deep-merge ``override`` into ``base``; record in ``origin`` which file set each key."""
    merged = dict(base)
    for key, value in override.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, source, origin, path)
        else:
            merged[key] = value
            for leaf in _leaves(value, path):
                origin.pop(leaf, None)  # re-insert: the latest file to touch a key comes last
                origin[leaf] = source
    return merged


def _format_validation_error(exc: ValidationError, origin: dict[tuple, Path], default: Path) -> str:
    """One line per problem: ``file: dotted.key: message``."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        source = _source_of(loc, origin, default)
        key = ".".join(str(part) for part in loc) or "(top level)"
        lines.append(f"{source}: {key}: {error['msg']}")
    return "\n".join(lines)


def _source_of(loc: tuple, origin: dict[tuple, Path], default: Path) -> Path:
    """The file that set ``loc`` (or a parent of it, or else a key below it)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in origin:
            return origin[loc[:n]]
    below = [source for key, source in origin.items() if key[: len(loc)] == loc]
    return below[-1] if below else default


Model = TypeVar("Model", bound=BaseModel)


OVERRIDES_SOURCE = Path("--overrides")


def load_model(model: type[Model], paths: list[Path], overrides: dict[str, Any] | None = None) -> Model:
    """Merge the YAML files in order, then ``overrides`` (a run's settings, such as the Airflow
    form's; errors name them ``--overrides``), and validate the result as ``model``."""
    if not paths:
        raise ConfigError("no configuration file given")
    origin: dict[tuple, Path] = {}
    data: dict[str, Any] = {}
    for path in paths:
        data = _merge(data, read_yaml(Path(path)), Path(path), origin)
    if overrides:
        data = _merge(data, overrides, OVERRIDES_SOURCE, origin)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin, Path(paths[0]))) from None
