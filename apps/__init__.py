"""The applications built on cotmon: `cotmon demo`, `cotmon eval` and the work behind them.

They compose the monitor (through `monitor.build`), the probe plugin and the HTTP server; no
plugin imports them. Their commands are found through the `cotmon.commands` entry point group.
"""
