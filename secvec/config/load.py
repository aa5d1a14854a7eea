"""Loading configs from YAML (errors name file, line and field) and where a config may read and write."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from secvec.data.schema import format_loc
from secvec.paths import PROJECT_ROOT, readable_roots, resolve_path

M = TypeVar("M", bound=BaseModel)

PRESETS_DIR = PROJECT_ROOT / "configs"


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names file, line and field."""


# ---- paths: where a config may read and write ----------------------------------------------------------


def check_path(value: str | Path, config_file: Path, node: yaml.Node | None, loc: tuple[str | int, ...],
               root: Path | None = None, *, output: bool = False, allow_outside: bool = False) -> Path:
    """Resolve a path named by a config and refuse it if it escapes the project.

    Inputs may lie in the project, the shared datasets folder (`../shared/datasets` or $SECVEC_SHARED_DATASETS)
    or the config file's own folder; anywhere else needs `allow_outside`. Outputs (folders that get
    replaced) must lie strictly inside the project, always. Symlinks and `..` are resolved before comparing.

    Returns:
        The path as `resolve_path` gives it (relative paths from the project root).

    Raises:
        ConfigError: `file:line: field 'x': /resolved/path is outside the project (...)`.
    """
    path = resolve_path(value, root)
    real, project = path.resolve(), (root or PROJECT_ROOT).resolve()
    if output:
        if real == project or not real.is_relative_to(project):
            raise ConfigError(f"{config_file}:{yaml_line(node, loc)}: field '{format_loc(loc)}': {real} is not "
                              f"inside the project ({project}): outputs are written and replaced only there")
        return path
    readable = readable_roots(config_file, root)
    if not allow_outside and not any(real.is_relative_to(folder.resolve()) for folder in readable):
        raise ConfigError(f"{config_file}:{yaml_line(node, loc)}: field '{format_loc(loc)}': {real} is outside "
                          f"the project ({project}), the shared datasets and the config's folder; set "
                          "allow_outside_project: true to read it anyway")
    return path


# ---- loading ----------------------------------------------------------------------------------------------


def yaml_line(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int:
    """1-based line of the deepest YAML node on the path `loc` (the key's line for mapping entries)."""
    line = node.start_mark.line + 1 if node else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def read_yaml(path: Path) -> tuple[dict[str, Any] | None, yaml.Node | None]:
    """The mapping a YAML file holds (None when empty) and its node tree, for `yaml_line`.

    Raises:
        ConfigError: `file:line: ...` for a missing file, invalid UTF-8, bad YAML or a non-mapping.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: invalid UTF-8") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else 1
        raise ConfigError(f"{path}:{line}: invalid YAML: {err.problem}") from None
    if not isinstance(data, dict | None):
        raise ConfigError(f"{path}:1: expected a mapping of fields, got {type(data).__name__}")
    return data, node


def load_yaml_node(path: Path, model: type[M]) -> tuple[M, yaml.Node | None]:
    """Validate a YAML file against `model`; also return its node tree, for `yaml_line` and `check_path`."""
    data, node = read_yaml(path)
    try:
        return model.model_validate(data or {}), node
    except ValidationError as err:
        errors = err.errors()
        first = errors[0]
        got = f" (got {first['input']!r})" if isinstance(first["input"], str | int | float | bool) else ""
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}:{yaml_line(node, first['loc'])}: field '{format_loc(first['loc'])}': "
                          f"{msg}{got}{more}") from None


def load_yaml_config(path: str | Path, model: type[M]) -> M:
    """Validate a YAML file against `model`.

    Raises:
        ConfigError: `file:line: field 'a.b[0].c': message` for a missing file, bad YAML or an invalid field.
    """
    return load_yaml_node(Path(path), model)[0]


def preset_path(name_or_path: str | Path, folder: Path) -> Path:
    """A YAML file (from here or the project root), or the preset of that name in `folder`."""
    path = Path(name_or_path)
    path = resolve_path(path) if path.suffix in (".yaml", ".yml") else folder / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"{path}: no such config file (presets: {presets})")
    return path
