"""Load YAML configs onto the typed :class:`kd.config.Config` (validated by :mod:`kd.config_checks`).

Resolution order (later wins): dataclass defaults → the ``base:`` chain (outermost base first) → the named
file → ``key.sub=value`` overrides from the command line. A config name is a path, or a bare name (with or
without ``.yaml``) looked up in ``configs/``. ``${asset:tiny/teacher}`` expands to a path inside the shipped
assets (``pipeline/assets``) so configs work from any directory.

Every failure becomes a one-line :class:`kd.errors.ConfigError` naming the file and key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd.config import Config
from kd.config_checks import validate_config
from kd.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_ROOT / "assets"
REPO_CONFIGS_DIR = PACKAGE_ROOT.parent / "configs"


def _asset_path(rel: str) -> str:
    return str(ASSETS_DIR / rel)


def _register_resolvers() -> None:
    OmegaConf.register_resolver("asset", _asset_path, replace=True)


_register_resolvers()


def config_search_dirs() -> list[Path]:
    """Directories searched for bare config names: $PIPELINE_CONFIG_DIR, ./configs, the repo's configs/."""
    dirs = [Path(p) for p in os.environ.get("PIPELINE_CONFIG_DIR", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "configs", REPO_CONFIGS_DIR]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available_configs() -> list[str]:
    names = {p.name for d in config_search_dirs() if d.is_dir() for p in d.glob("*.yaml")}
    return sorted(names)


def resolve_config_path(name: str, relative_to: Path | None = None) -> Path:
    """A path as given (or relative to ``relative_to``), else ``NAME`` / ``NAME.yaml`` in the config dirs."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    for d in config_search_dirs():
        candidates += [d / name, d / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = ", ".join(available_configs()) or "none"
    raise ConfigError(name, None, f"no such config file; give a path or one of: {known}")


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep only the last)."""

    def construct_mapping(self, node, deep=False):
        first_lines: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise _DuplicateKey(key, line, first_lines[key])
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except _DuplicateKey as dup:
        raise ConfigError(str(path), str(dup.key), f"duplicate key at line {dup.line} (first at line "
                                                   f"{dup.first_line}); YAML would keep only the last one: merge "
                                                   "the two blocks") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(str(path), None, f"YAML syntax error at {where}{problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), None, "top level must be a mapping of keys to values")
    return data


def _base_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """[(file, mapping without 'base')] from the outermost base to ``path`` itself."""
    if path in seen:
        cycle = " -> ".join(p.name for p in (*seen, path))
        raise ConfigError(str(path), "base", f"circular base chain: {cycle}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str):
        raise ConfigError(str(path), "base", "must be a config name or path (a string)")
    try:
        base_path = resolve_config_path(base, relative_to=path.parent)
    except ConfigError:
        raise ConfigError(str(path), "base", f"base config {base!r} not found") from None
    return _base_chain(base_path, (*seen, path)) + [(path, data)]


def _omegaconf_problem(exc: OmegaConfBaseException) -> tuple[str | None, str]:
    key = getattr(exc, "full_key", None) or None
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in" in message and "Key '" in message:
        message = "unknown key; check the spelling against `pipeline show-config` or configs/README"
    return key, message


def _merge_step(merged: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as exc:
        key, problem = _omegaconf_problem(exc)
        raise ConfigError(source, key, problem) from None


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, DictConfig]]:
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}", None, "expected key.sub=value")
        try:
            parsed.append((item, OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}", item.split("=", 1)[0], _omegaconf_problem(exc)[1]) from None
    return parsed


def load_config(name: str, overrides: Iterable[str] = ()) -> Config:
    """Load, merge, type-check and validate a config. Raises ConfigError with one clear line."""
    path = resolve_config_path(name)
    merged = OmegaConf.structured(Config)
    for layer_path, data in _base_chain(path):
        merged = _merge_step(merged, data, str(layer_path))
    for text, layer in _parse_overrides(list(overrides)):
        merged = _merge_step(merged, layer, f"override {text!r}")
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        also = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(str(path), missing[0], f"required key is missing; set it in the file or pass "
                                                 f"{missing[0]}=VALUE{also}")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key, problem = _omegaconf_problem(exc)
        raise ConfigError(str(path), key, problem) from None
    assert isinstance(cfg, Config)
    return validate_config(cfg, source=str(path))


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
