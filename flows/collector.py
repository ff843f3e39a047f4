"""The collector flow for `python -m bytewax.run flows.collector:flow` (configured from the environment).

    python -m bytewax.run flows.collector:flow                 # one worker
    python -m bytewax.run flows.collector:flow -w 4            # four workers
    python -m bytewax.run flows.collector:flow -i 0 -a host0:2101 -a host1:2101   # a cluster

Settings come from the environment and PGFLOW_CONFIG, exactly as for `pgflow run`.
"""

from pgflow.cli import lean_allocator, load_settings_or_exit, one_polars_thread

lean_allocator()  # issue 20: as `pgflow run`, before the flow's threads start
one_polars_thread()

from pgflow.logs import setup  # noqa: E402
from pgflow.stream.flow import build_flow  # noqa: E402
from pgflow.stream.runtime import install_signal_handlers  # noqa: E402

settings = load_settings_or_exit()
setup(settings.log_level, settings.log_format)
install_signal_handlers()
flow = build_flow(settings)
