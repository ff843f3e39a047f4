"""The collector flow for `python -m bytewax.run flows.collector:flow` (configured from the environment).

    python -m bytewax.run flows.collector:flow                 # one worker
    python -m bytewax.run flows.collector:flow -w 4            # four workers
    python -m bytewax.run flows.collector:flow -i 0 -a host0:2101 -a host1:2101   # a cluster

Settings come from the environment and PGFLOW_CONFIG, exactly as for `pgflow run`.
"""

from pgflow.cli import load_settings_or_exit
from pgflow.logs import setup
from pgflow.stream.flow import build_flow
from pgflow.stream.runtime import install_signal_handlers

settings = load_settings_or_exit()
setup(settings.log_level, settings.log_format)
install_signal_handlers()
flow = build_flow(settings)
