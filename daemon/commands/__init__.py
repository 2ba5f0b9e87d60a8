"""Every command the daemon understands, registered into one :class:`Registry`.

One module per family; each handler's docstring is its ``GET_COMMANDS`` description.
"""

from __future__ import annotations

from daemon.commands.registry import Registry


def build_registry() -> Registry:
    from daemon.commands import (
        agents,
        budgets,
        compositions,
        events,
        identities,
        maintenance,
        pauses,
        permissions,
        processes,
        shared,
        system,
        tasks,
    )

    registry = Registry()
    for module in (
        system,
        shared,
        agents,
        identities,
        compositions,
        events,
        processes,
        permissions,
        budgets,
        pauses,
        maintenance,
        tasks,
    ):
        module.register(registry)
    return registry
