"""Settings: environment variables over a JSON file over defaults, validated and redacted.

Environment names keep the seed's: ``DATABASE_URL``, ``NEW_RELIC_API_KEY``, and
``PGFLOW_<FIELD>`` for everything else. The standard ``OTEL_EXPORTER_OTLP_*`` variables
are honoured as fallbacks. Bad settings raise :class:`ConfigError` with one line that
names the setting and what is expected, and never echoes a secret.

One idea per module: :mod:`.settings` (the fields, each described once: docs/configuration.md is
generated from them), :mod:`.loading` (the JSON file, error messages, unknown variables),
:mod:`.dsn` (connection strings), :mod:`.instance` (one server to watch), :mod:`.secrets` (secrets
from files, redaction) and :mod:`.network` (the export's TLS files, proxy, timeout, compression).
"""

from __future__ import annotations

from pgflow.config.dsn import dsn_host_port, dsn_instance_name, is_local_address, redact_dsn
from pgflow.config.instance import InstanceConfig
from pgflow.config.secrets import read_secret_file
from pgflow.config.settings import NEW_RELIC_ENDPOINTS, Settings
from pgflow.errors import ConfigError

__all__ = [
    "NEW_RELIC_ENDPOINTS",
    "ConfigError",
    "InstanceConfig",
    "Settings",
    "dsn_host_port",
    "dsn_instance_name",
    "is_local_address",
    "read_secret_file",
    "redact_dsn",
]
