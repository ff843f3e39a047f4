"""Loading settings: overrides over environment over the JSON file over defaults, and the user's
mistakes said once and clearly (issue 19).

Bad settings raise :class:`ConfigError` with one line that names the setting, where its value came
from (``env NAME`` or ``config file PATH``) and what is expected, and never echoes a secret. A
``PGFLOW_`` variable or a file key that names no setting is an error naming the nearest one.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsError

from pgflow.errors import ConfigError

if TYPE_CHECKING:
    from pgflow.config.settings import Settings

_SECRET_FIELDS = {"database_url", "new_relic_api_key", "otlp_headers", "instances", "otlp_proxy"}
_ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "new_relic_api_key": "NEW_RELIC_API_KEY",
    "database_url_file": "DATABASE_URL_FILE",
    "new_relic_api_key_file": "NEW_RELIC_API_KEY_FILE",
}

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("pgflow_config_file", default=None)
_file_keys: contextvars.ContextVar[tuple[Path, frozenset[str]] | None] = contextvars.ContextVar("pgflow_config_file_keys", default=None)
_overrides: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("pgflow_overrides", default=frozenset())
# PGFLOW_ variables that are not settings: the config file's path, and the test and bench tools'.
_OTHER_ENV = ("PGFLOW_CONFIG",)
_OTHER_ENV_PREFIXES = ("PGFLOW_TEST_", "PGFLOW_BENCH_", "PGFLOW_PYTHON")
_said_which_wins = False


class _JsonFileSource(PydanticBaseSettingsSource):
    """Settings from the JSON file given by ``--config`` or ``PGFLOW_CONFIG``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get() or (Path(os.environ["PGFLOW_CONFIG"]) if os.environ.get("PGFLOW_CONFIG") else None)
        if path is None:
            return {}
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read config file {path} ({exc.strerror})", "check the path given to --config or PGFLOW_CONFIG"
            ) from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "encoding"
            raise ConfigError(f"config file {path} is not valid JSON ({where})", "fix the file; it must hold one JSON object") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a JSON {type(data).__name__}", "it must hold one JSON object of settings")
        unknown = sorted(set(data) - set(self.settings_cls.model_fields))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in config file {path}", _nearest(self.settings_cls, unknown[0]))
        _file_keys.set((Path(path), frozenset(data)))
        return data


def load(cls: type[Settings], config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from overrides > environment > JSON file > defaults (``Settings.load``).

    Raises ConfigError (one line, no secret) instead of pydantic's multi-line report.
    """
    _unknown_env(cls)  # issue 19: a misspelled PGFLOW_ variable is an error, as in the file
    token = _config_file.set(Path(config_file) if config_file else None)
    keys = _file_keys.set(None)
    over = _overrides.set(frozenset(overrides))
    try:
        settings = cls(**overrides)
        _say_which_wins(settings)
        return settings
    except ValidationError as exc:
        raise _config_error(cls, exc) from None
    except SettingsError as exc:
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1) if field else "settings"
        raise ConfigError(f"invalid setting {name} ({_source(cls, name)})", "expected a JSON value of the right type") from None
    finally:
        _config_file.reset(token)
        _file_keys.reset(keys)
        _overrides.reset(over)


def _config_error(cls: type[BaseSettings], exc: ValidationError) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = loc[0] if loc else "settings"
    field = {v: k for k, v in _ENV_NAMES.items()}.get(field, field).lower()
    if field.startswith("pgflow_"):
        field = field[len("pgflow_") :]
    where = ".".join([field, *loc[1:]])
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return ConfigError(f"unknown setting {where!r}", _nearest(cls, field))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not loc:  # a rule across settings (unique instance names): named by the setting it is about
        about = "instances" if "instance" in msg else ""
        return ConfigError(f"invalid setting instances ({_source(cls, 'instances')}): {msg}" if about else f"invalid configuration: {msg}")
    shown = ""
    if field not in _SECRET_FIELDS and "input" in err and not isinstance(err["input"], (dict, list)):
        shown = f", got {str(err['input'])[:80]!r}"
    return ConfigError(f"invalid setting {where} ({_source(cls, field)}): {msg}{shown}")


def _env_names(cls: type[BaseSettings], field: str) -> list[str]:
    """Every environment name a setting is read from, the documented one first."""
    info = cls.model_fields[field]
    names = [f"PGFLOW_{field.upper()}"]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(c).upper() for c in alias.choices if str(c).upper() != field.upper()] + names
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def _source(cls: type[BaseSettings], field: str) -> str:
    """Where the value of ``field`` came from, as a person would look for it."""
    if field in _overrides.get():  # given by the program (a command-line option): named by its env name
        return f"env {_ENV_NAMES.get(field, 'PGFLOW_' + field.upper())}"
    env = {k.upper() for k in os.environ}
    if field in cls.model_fields:
        for name in _env_names(cls, field):
            if name in env:
                return f"env {name}"
    keys = _file_keys.get()
    if keys is not None and field in keys[1]:
        return f"config file {keys[0]}"
    return f"env {_ENV_NAMES.get(field, 'PGFLOW_' + field.upper())}"


def _nearest(cls: type[BaseSettings], name: str) -> str:
    """The hint for an unknown setting: the nearest known one, else the list."""
    known = sorted(cls.model_fields)
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known settings: {', '.join(known)}"


def _unknown_env(cls: type[BaseSettings]) -> None:
    """A ``PGFLOW_`` variable that names no setting exits 2, naming the nearest one: a typo must
    not leave the default silently in place (the JSON file already refuses unknown keys)."""
    known = {n for f in cls.model_fields for n in _env_names(cls, f)}
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith("PGFLOW_") or upper in known or upper in _OTHER_ENV or upper.startswith(_OTHER_ENV_PREFIXES):
            continue
        fields = sorted(cls.model_fields)
        close = difflib.get_close_matches(upper[len("PGFLOW_") :].lower(), fields, n=1, cutoff=0.6)
        hint = f"did you mean PGFLOW_{close[0].upper()}?" if close else f"known settings: {', '.join(fields)} (as PGFLOW_<SETTING>)"
        raise ConfigError(f"unknown environment variable {name}", hint)


def _say_which_wins(settings: Settings) -> None:
    """DATABASE_URL and ``instances`` both set: the instances are scraped; said once per process."""
    global _said_which_wins
    if settings.instances and settings.database_url is not None and not _said_which_wins:
        _said_which_wins = True
        logging.getLogger("pgflow.config").warning(
            f"DATABASE_URL ({_source(type(settings), 'database_url')}) is ignored: the {len(settings.instances)} "
            "instance(s) listed in instances are scraped; unset DATABASE_URL, or add it to instances"
        )
