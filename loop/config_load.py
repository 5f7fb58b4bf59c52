"""Load a campaign config: YAML file + dotted command-line overrides → a validated `Config`.

Every user mistake becomes one `ConfigError` whose message names the file, the key and what was
expected; the CLI prints it as is, without a traceback.

>>> cfg = load_config("configs/tiny.yaml", ["ppo.kl.target=3.0"])
>>> cfg.ppo.kl.target
3.0
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from loop.config import Config


class ConfigError(ValueError):
    """A config the user must fix; the message is complete and meant to be printed as is."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-5` as a float (YAML 1.2), not as the string '1e-5'."""


_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; syntax errors become a `ConfigError` with the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def apply_override(tree: dict[str, Any], override: str) -> str:
    """Set `a.b.c=value` in a nested dict in place; returns the dotted key.

    The value is parsed as YAML, so `3`, `3.0`, `1e-5`, `true`, `null`, `[1, 2]` get their types
    and anything else stays a string (which the schema then rejects where it expects a number).
    """
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {override!r}: expected KEY=VALUE with a dotted key, e.g. ppo.kl.target=6.0"
        )
    value = parse_yaml(raw, f"override {override!r}") if raw.strip() else ""
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {override!r}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML campaign file, apply dotted overrides, validate against the schema."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    tree = parse_yaml(text, str(path))
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got "
                          f"{type(tree).__name__}")
    try:
        from_cli = {apply_override(tree, item): item for item in overrides}
    except ConfigError as exc:
        raise ConfigError(f"{path}, {exc}") from None
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, from_cli)) from None


def _describe(exc: ValidationError, path: Path, from_cli: dict[str, str]) -> str:
    """One line per problem: `FILE: KEY: expected …, got …`."""
    lines = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            expected = _unknown_key_hint(err["loc"])
        elif err["type"] == "missing":
            expected = "required key is missing"
        else:
            expected = err["msg"].replace("Input should be", "expected").replace(
                "Value error, ", "")
            if err["type"] not in ("value_error", "assertion_error"):
                expected += f", got {err['input']!r}"
        source = f"{path}, override {from_cli[key]!r}" if key in from_cli else str(path)
        lines.append(f"{source}: {key}: {expected}" if key else f"{source}: {expected}")
    return "\n".join(lines)


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    """Name the keys the section does accept, with the closest match first."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}expected one of: {', '.join(allowed)}"
