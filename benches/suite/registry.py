"""What the suite runs, in order, and the roles its child processes play.

To add a measurement: a function `(bench: measure.Bench) -> dict | None` (in
`measure.py`, or a module of its own), a section `(results) -> list[str]` in
`report.py`, its sizes in `config.Plan` if it needs any, and one line in
`MEASUREMENTS`; a goal, if it has one, goes in `report.check_goals`. Work it
does in a child process is a role: a function `(spec) -> JSON-able` added to
`ROLES` and run with `procs.run_role`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import inprocess, instructions, load, measure, procs, report, shared, strategies, tls


@dataclass(frozen=True)
class Measurement:
    name: str  # its line in the log and in the report's time per section
    key: str  # where its dict goes in the results (results/latest.json)
    run: Callable[[measure.Bench], dict[str, Any] | None]  # None: no result (a note says why)
    # Its section of results/latest.md; None when another's section shows it.
    render: Callable[[dict[str, Any]], list[str]] | None
    needs_setups: bool = True  # False: runs once the setups and upstreams are stopped


# In the order they run; the report shows their sections in the same order.
MEASUREMENTS: list[Measurement] = [
    Measurement("blocking", "blocking", measure.blocking, report.blocking_section),
    Measurement(
        "native rounds", "native_rounds", shared.native_rounds, report.native_rounds_section
    ),
    Measurement(
        "instructions",
        "instructions",
        instructions.instructions,
        report.instructions_section,
    ),
    Measurement("paced", "paced", measure.paced, report.paced_section),
    Measurement("steady", "steady", measure.steady, report.steady_section),
    Measurement("sse", "sse", measure.sse, report.sse_section),
    Measurement("failover", "failover", measure.failover, report.failover_section),
    # Before the streams (see measure.drift); shown in the memory section.
    Measurement("drift", "drift", measure.drift, None),
    Measurement("streams", "memory", measure.streams, report.memory_section),
    Measurement("sdk", "sdk", measure.sdk, report.sdk_section),
    Measurement("client", "client", measure.client, report.client_section),
    Measurement("state backends", "state", shared.state_throughput, report.state_section),
    Measurement("propagation", "propagation", shared.propagation, report.propagation_section),
    Measurement("serve --workers", "workers", shared.workers, report.workers_section),
    Measurement("upstream over TLS", "tls", tls.upstream_tls, report.tls_section),
    Measurement(
        "strategies",
        "strategies",
        strategies.strategies,
        report.strategies_section,
        needs_setups=False,
    ),
    Measurement("core", "core", measure.core, report.core_section, needs_setups=False),
]

# `python run.py ROLE JSON`: the child processes' jobs; each prints its answer as JSON.
ROLES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "_loadgen": lambda spec: asyncio.run(load.loadgen(spec)),
    "_hold": lambda spec: asyncio.run(load.hold(spec)),
    "_sdk": lambda spec: asyncio.run(inprocess.sdk_role(spec)),
    "_client": lambda spec: asyncio.run(inprocess.client_role(spec)),
    "_mock": procs.mock_role,
    "_watch": shared.watch_role,
    "_mark": shared.mark_role,
    "_subscribe": shared.subscribe_role,
    "_markcost": shared.mark_cost_role,
    "_strategies": lambda spec: asyncio.run(strategies.strategies_role(spec)),
}
