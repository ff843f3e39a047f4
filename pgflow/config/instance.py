"""One PostgreSQL server to watch: an entry of ``instances``, or the one ``DATABASE_URL`` names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pgflow.config.dsn import _check_dsn, redact_dsn
from pgflow.config.secrets import _instance_dsn_from_file


class InstanceConfig(BaseModel):
    """One PostgreSQL server to watch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1, max_length=200, description="The instance's name: `service.instance.id` and `postgresql.instance.name`."
    )
    database_url: SecretStr = Field(description="Its DSN; required unless `database_url_file` is given.")
    database_url_file: Path | None = Field(  # issue 15: the DSN read from this file instead
        default=None, description="Read `database_url` from this file instead."
    )

    @model_validator(mode="before")
    @classmethod
    def _dsn_from_file(cls, data: Any) -> Any:
        return _instance_dsn_from_file(data)  # issue 15

    @field_validator("database_url")
    @classmethod
    def _valid_dsn(cls, value: SecretStr) -> SecretStr:
        return SecretStr(_check_dsn(value.get_secret_value()))

    @property
    def dsn(self) -> str:
        return self.database_url.get_secret_value()

    def __repr__(self) -> str:
        return f"InstanceConfig(name={self.name!r}, database_url={redact_dsn(self.dsn)!r})"
