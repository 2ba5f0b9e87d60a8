"""Cognitive observers: plugins that watch every bus event and may act back.

An observer is named in config as ``package.module:factory`` (or by an entry point in
the ``ksi.observers`` group). ``factory(api)`` returns an object with::

    event_types: list[str]                       # optional, default ["*"]
    async def on_event(self, event: dict) -> None # or a plain def, run in a thread
    async def start(self) / async def stop(self)  # optional

``api.call(command, parameters)`` runs any daemon command in-process (SPAWN a follow-up,
SET_SHARED a finding, PUBLISH an event); ``api.log`` is a bound logger.

Isolation: each observer has its own bounded inbox (overflow loses events for that
observer only, counted and logged) and its own task; every ``on_event`` call is timed
out; exceptions are logged. Publishing never waits for an observer. A plain (non-async)
``on_event`` runs in a worker thread so blocking code cannot stall the daemon; an async
one must not block the event loop, which no framework can enforce.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import structlog

from daemon.commands.registry import Context, Services
from daemon.errors import DaemonError, ErrorCode, NotFound
from daemon.events.subscriber import Subscriber

log = structlog.get_logger("ksi.observers")


class ObserverAPI:
    """What an observer may do: call commands, and log."""

    def __init__(self, services: Services, name: str) -> None:
        self._services = services
        self.name = name
        self.log = structlog.get_logger(f"ksi.observer.{name}")

    async def call(self, command: str, parameters: dict[str, Any] | None = None) -> Any:
        services = self._services
        context = Context(services, caller=f"observer:{self.name}")
        return await services.registry.call(context, command, parameters or {})


@dataclass
class RunningObserver:
    name: str
    plugin: Any
    subscriber: Subscriber
    task: asyncio.Task[None] | None = None
    handled: int = 0
    failures: int = 0
    timeouts: int = 0
    inflight: set[asyncio.Future[Any]] = field(default_factory=set)


class ObserverHost:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.bus = services.bus
        self.running: dict[str, RunningObserver] = {}
        self._tasks: asyncio.TaskGroup | None = None

    async def start(self, tasks: asyncio.TaskGroup) -> None:
        """Load the configured observers; their loops run in ``tasks`` (the daemon's)."""
        self._tasks = tasks
        for spec in self.settings.observers:
            try:
                await self.add(spec, load_factory(spec), tasks)
            except Exception:
                # A broken plugin is the plugin's problem: log it, run without it.
                log.exception("observer.load_failed", observer=spec)

    async def add(self, name: str, factory: Any, tasks: asyncio.TaskGroup) -> RunningObserver:
        plugin = factory(ObserverAPI(self.services, name))
        patterns = list(getattr(plugin, "event_types", None) or ["*"])
        sub = Subscriber(
            f"observer:{name}",
            patterns,
            maxsize=self.settings.observer_queue,
            policy="drop",
            sees_directed=True,
        )
        obs = RunningObserver(name, plugin, sub)
        starter = getattr(plugin, "start", None)
        if starter is not None:
            await asyncio.wait_for(starter(), self.settings.observer_timeout_s)
        self.bus.add(sub)
        obs.task = tasks.create_task(self._loop(obs), name=f"observer-{name}")
        self.running[name] = obs
        log.info("observer.started", observer=name, event_types=patterns)
        return obs

    async def _loop(self, obs: RunningObserver) -> None:
        handler = obs.plugin.on_event
        is_async = inspect.iscoroutinefunction(handler)
        timeout = self.settings.observer_timeout_s
        while True:
            for event in await obs.subscriber.next_batch():
                payload = event.to_dict()
                call = handler(payload) if is_async else asyncio.to_thread(handler, payload)
                try:
                    await asyncio.wait_for(call, timeout)
                    obs.handled += 1
                except TimeoutError:
                    obs.timeouts += 1
                    log.warning(
                        "observer.timed_out",
                        observer=obs.name,
                        seq=event.seq,
                        event_type=event.event_type,
                        timeout_s=timeout,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    obs.failures += 1
                    log.exception(
                        "observer.failed",
                        observer=obs.name,
                        seq=event.seq,
                        event_type=event.event_type,
                    )

    async def reload(self, name: str) -> tuple[str, list[str]]:
        """Re-import the module of the configured observers ``name`` names (a spec, its
        module, or the module's last name) and restart them on the new code. The new code is
        imported and built before the old observers stop: if it fails, they keep running."""
        specs = [s for s in self.settings.observers if name in _names_of(s)]
        if not specs:
            raise NotFound(
                f"no configured observer comes from {name!r}",
                code=ErrorCode.OBSERVER_NOT_FOUND,
                details={"observers": list(self.settings.observers)},
            )
        assert self._tasks is not None, "observers are not started"
        module = _module_of(specs[0])
        try:
            importlib.reload(importlib.import_module(module))
            factories = {spec: load_factory(spec) for spec in specs}
        except Exception as exc:
            log.exception("observer.reload_failed", module=module)
            raise DaemonError(
                f"reloading {module} failed ({type(exc).__name__}: {exc}); the running "
                "observers keep their old code",
                code=ErrorCode.RELOAD_FAILED,
            ) from None
        for spec, factory in factories.items():
            old = self.running.get(spec)
            if old is not None:
                await self._stop_one(old)
            try:
                await self.add(spec, factory, self._tasks)
            except Exception as exc:
                log.exception("observer.reload_failed", observer=spec)
                if old is not None:  # the old plugin object again, as it was
                    await self.add(spec, lambda api, plugin=old.plugin: plugin, self._tasks)
                raise DaemonError(
                    f"observer {spec} failed to start on the new code "
                    f"({type(exc).__name__}: {exc}); the old one runs again",
                    code=ErrorCode.RELOAD_FAILED,
                ) from None
        log.info("observer.reloaded", module=module, observers=specs)
        return module, specs

    async def _stop_one(self, obs: RunningObserver) -> None:
        self.bus.remove(obs.subscriber)
        self.running.pop(obs.name, None)
        if obs.task is not None:
            obs.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await obs.task
        stopper = getattr(obs.plugin, "stop", None)
        if stopper is not None:
            try:
                await asyncio.wait_for(stopper(), self.settings.observer_timeout_s)
            except Exception:
                log.exception("observer.stop_failed", observer=obs.name)

    def stats(self) -> dict[str, int]:
        """HEALTH_CHECK's count of observers (each one's own counters are in its record)."""
        return {"observers": len(self.running)}

    async def stop(self) -> None:
        for obs in list(self.running.values()):
            await self._stop_one(obs)
        self.running.clear()


def _module_of(spec: str) -> str:
    if ":" in spec:
        return spec.partition(":")[0]
    for ep in entry_points(group="ksi.observers"):
        if ep.name == spec:
            return ep.value.partition(":")[0]
    return spec


def _names_of(spec: str) -> set[str]:
    """What RELOAD_MODULE may call an observer by: its spec, its module, the module's last
    name."""
    module = _module_of(spec)
    return {spec, module, module.rsplit(".", 1)[-1]}


def load_factory(spec: str) -> Any:
    """``module:attr`` imports a factory; a bare name is looked up as an entry point."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)
    for ep in entry_points(group="ksi.observers"):
        if ep.name == spec:
            return ep.load()
    raise LookupError(f"observer {spec!r}: not 'module:factory' and no such entry point")
