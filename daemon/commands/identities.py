"""Agent identities: the original KSI's persona records (a display name, a role, personality
traits, an appearance, preferences and counters per agent), kept in the state database.

An identity is independent of the agent registry: any agent id may have one, registered or
not. Each is one JSON record in the ``identities`` table; commands read the table (there is
no copy in memory) and await every write, so a reply means the change is durable.

The results carry the shapes both generations of KSI's clients read: ``status``
(``identity_created``, ``identity_found``, ...) and ``identity`` as its command handlers
answered, and ``created`` / ``updated`` + ``changes`` / ``items`` + ``metadata`` /
``deleted`` as its later command classes did (GET_IDENTITY's result is also the identity's
own fields, as those answered).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from daemon.commands.registry import Context, Params, Registry, Result, comma_list
from daemon.errors import Conflict, ErrorCode, NotFound
from daemon.protocol import iso_from_epoch
from daemon.state.db import Store

AgentId = Field(min_length=1, max_length=256)
Name = Annotated[str, Field(min_length=1, max_length=256)]
Traits = Annotated[list[Name], Field(max_length=64)]

# Set by the daemon, never by UPDATE_IDENTITY.
PROTECTED = ("identity_uuid", "agent_id", "created_at", "updated_at")
# LIST_IDENTITIES' filter_active: active means seen within this long.
ACTIVE_WINDOW = timedelta(hours=24)
DEFAULT_ROLE = "general"

# role -> (personality traits, avatar style, colour theme, icon): the defaults of a new
# identity that does not name its own.
_ROLE_DEFAULTS: dict[str, tuple[list[str], str, str, str]] = {
    "general": (["helpful", "adaptable", "friendly"], "circle", "blue", "🤖"),
    "researcher": (["curious", "methodical", "evidence-driven"], "lens", "teal", "🔬"),
    "analyst": (["precise", "systematic", "data-minded"], "chart", "indigo", "📊"),
    "developer": (["pragmatic", "detail-oriented", "inventive"], "terminal", "green", "💻"),
    "writer": (["articulate", "imaginative", "clear"], "quill", "amber", "✍️"),
    "reviewer": (["critical", "fair", "careful"], "checklist", "slate", "🧐"),
    "coordinator": (["organised", "communicative", "decisive"], "compass", "orange", "🧭"),
    "teacher": (["patient", "encouraging", "structured"], "book", "yellow", "📚"),
}
_ROLE_DEFAULTS["coder"] = _ROLE_DEFAULTS["developer"]
_ROLE_DEFAULTS["orchestrator"] = _ROLE_DEFAULTS["coordinator"]


class Identity(Result):
    identity_uuid: str = Field(description="a uuid4, fixed at creation")
    agent_id: str
    display_name: str
    role: str
    personality_traits: list[str]
    appearance: dict[str, Any] = Field(description="avatar_style, color_theme, icon, ...")
    created_at: str
    updated_at: str
    last_active: str
    conversation_count: int
    sessions: list[dict[str, Any]] = Field(description="KSI's shape: {session_id, started_at}")
    preferences: dict[str, Any] = Field(
        description="communication_style, verbosity, formality, ..."
    )
    stats: dict[str, Any] = Field(
        description="messages_sent, conversations_participated, tasks_completed, tools_used"
    )


def _split_traits(value: Any) -> Any:
    # As REGISTER_AGENT's capabilities: a list, or a comma-separated string; KSI's
    # DaemonClient sent an object of traits (e.g. {"curious": 0.9}): its names are kept.
    if isinstance(value, dict):
        return [str(name) for name, on in value.items() if on]
    return comma_list(value)


def _normalise_time(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value)
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)  # KSI's timestamps are all UTC
        return iso_from_epoch(ts.timestamp())
    except (ValueError, OverflowError):
        raise ValueError(f"{value!r} is not an ISO-8601 timestamp in years 1-9999") from None


class AgentIdParams(Params):
    agent_id: str = AgentId


class CreateParams(Params):
    agent_id: str = AgentId
    display_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description='default "<Role>-<last 4 characters of agent_id>"',
    )
    role: str | None = Field(default=None, min_length=1, max_length=256, description="general")
    personality_traits: Traits | None = Field(
        default=None, description="a list (or a comma-separated string); default by role"
    )
    appearance: dict[str, Any] | None = Field(
        default=None, description="merged over the role's avatar_style, color_theme, icon"
    )

    _traits = field_validator("personality_traits", mode="before")(_split_traits)


class CreateResult(Result):
    status: Literal["identity_created"]
    created: Literal[True]
    identity: Identity


class IdentityFound(Identity):
    """GET_IDENTITY: the identity's own fields, plus ``status`` and ``identity``."""

    status: Literal["identity_found"]
    identity: Identity


class Updates(Params):
    display_name: Name | None = None
    role: Name | None = None
    personality_traits: Traits | None = None
    appearance: dict[str, Any] | None = None
    last_active: str | None = Field(default=None, description="ISO-8601 (UTC if no offset)")
    conversation_count: int | None = Field(default=None, ge=0, strict=True)
    sessions: list[dict[str, Any]] | None = None
    preferences: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None

    _traits = field_validator("personality_traits", mode="before")(_split_traits)
    _time = field_validator("last_active")(_normalise_time)

    @model_validator(mode="before")
    @classmethod
    def _settable(cls, value: Any) -> Any:
        if isinstance(value, dict):
            protected = [k for k in PROTECTED if k in value]
            if protected:
                raise ValueError(
                    f"{', '.join(protected)} cannot be updated: the daemon sets "
                    f"{', '.join(PROTECTED)}"
                )
            nulls = [k for k, v in value.items() if v is None]
            if nulls:
                raise ValueError(f"{', '.join(nulls)} may not be null")
        return value


class UpdateParams(Params):
    agent_id: str = AgentId
    updates: Updates = Field(
        description="fields to set (each replaces the whole field); "
        f"{', '.join(PROTECTED)} are refused"
    )


class UpdateResult(Result):
    status: Literal["identity_updated"]
    updated: bool = Field(description="false if no field changed (nothing was written)")
    changes: list[str] = Field(description="the fields whose value changed")
    identity: Identity


class ListParams(Params):
    sort_by: Literal["created_at", "last_active", "display_name"] = "created_at"
    order: Literal["asc", "desc"] = "desc"
    filter_role: str | None = Field(default=None, min_length=1, max_length=256)
    filter_active: bool | None = Field(
        default=None,
        strict=True,
        description=f"only those active (or not) within {ACTIVE_WINDOW.total_seconds() / 3600:g} "
        "h (by last_active)",
    )


class ListMetadata(Result):
    filtered: bool
    sort: str
    order: str
    filters_applied: dict[str, Any] = Field(description="role and active, those given")


class ListResult(Result):
    status: Literal["identities_listed"]
    items: list[Identity]
    identities: list[Identity] = Field(description="the same list (KSI's older clients read it)")
    total: int
    count: int = Field(description="the same as total")
    metadata: ListMetadata


class RemoveResult(Result):
    status: Literal["identity_removed"]
    deleted: Literal[True]
    agent_id: str
    identity: Identity = Field(description="the removed identity (for an undo)")


def register(r: Registry) -> None:
    @r.command("CREATE_IDENTITY", params=CreateParams, result=CreateResult)
    async def create_identity(ctx: Context, p: CreateParams) -> CreateResult:
        """Create an agent's identity: display name, role, personality traits and appearance
        (defaults from the role), counters, preferences. Persisted; publishes
        IDENTITY_CREATED. IDENTITY_EXISTS if the agent has one (UPDATE_IDENTITY changes it)."""
        store = ctx.services.store
        async with store.section("identities"):
            existing = await _load(store, p.agent_id)
            if existing is not None:
                raise Conflict(
                    f"agent {p.agent_id!r} already has an identity "
                    f"({existing.display_name!r}); UPDATE_IDENTITY changes it",
                    code=ErrorCode.IDENTITY_EXISTS,
                    details={"agent_id": p.agent_id, "identity_uuid": existing.identity_uuid},
                )
            identity = _new_identity(p)
            now = time.time()
            await store.write(
                "INSERT INTO identities(agent_id, record, created_at, updated_at) VALUES(?,?,?,?)",
                (p.agent_id, identity.model_dump_json().encode(), now, now),
            )
        ctx.publish(
            "IDENTITY_CREATED",
            {
                "agent_id": identity.agent_id,
                "identity_uuid": identity.identity_uuid,
                "display_name": identity.display_name,
                "role": identity.role,
            },
        )
        return CreateResult(status="identity_created", created=True, identity=identity)

    @r.command("GET_IDENTITY", params=AgentIdParams, result=IdentityFound)
    async def get_identity(ctx: Context, p: AgentIdParams) -> IdentityFound:
        """An agent's identity: its fields, and the same under ``identity`` with
        ``status: identity_found``. IDENTITY_NOT_FOUND (naming some that exist) if none."""
        identity = await _require(ctx.services.store, p.agent_id)
        return IdentityFound(**identity.model_dump(), status="identity_found", identity=identity)

    @r.command("UPDATE_IDENTITY", params=UpdateParams, result=UpdateResult)
    async def update_identity(ctx: Context, p: UpdateParams) -> UpdateResult:
        """Set fields of an agent's identity (``updates``: display_name, role,
        personality_traits, appearance, last_active, conversation_count, sessions,
        preferences, stats). identity_uuid, agent_id, created_at and updated_at are refused
        (INVALID_PARAMETERS). Publishes IDENTITY_UPDATED with the changed fields.
        IDENTITY_NOT_FOUND if the agent has none."""
        store = ctx.services.store
        updates = p.updates.model_dump(exclude_unset=True)
        async with store.section("identities"):
            current = await _require(store, p.agent_id)
            old = current.model_dump()
            changes = [k for k, v in updates.items() if old[k] != v]
            if not changes:
                return UpdateResult(
                    status="identity_updated", updated=False, changes=[], identity=current
                )
            now = time.time()
            identity = Identity.model_validate(
                {**old, **updates, "updated_at": iso_from_epoch(now)}
            )
            await store.write(
                "UPDATE identities SET record=?, updated_at=? WHERE agent_id=?",
                (identity.model_dump_json().encode(), now, p.agent_id),
            )
        ctx.publish(
            "IDENTITY_UPDATED",
            {
                "agent_id": identity.agent_id,
                "identity_uuid": identity.identity_uuid,
                "changes": changes,
            },
        )
        return UpdateResult(
            status="identity_updated", updated=True, changes=changes, identity=identity
        )

    @r.command("LIST_IDENTITIES", params=ListParams, result=ListResult)
    async def list_identities(ctx: Context, p: ListParams) -> ListResult:
        """Every identity (full records) under ``items`` (and ``identities``), sorted by
        created_at (default), last_active or display_name, ``order`` desc (default) or asc;
        optionally only one ``filter_role``, or only those active (``filter_active``: seen
        within 24 hours, by last_active) or not."""
        rows = await ctx.services.store.query("SELECT record FROM identities")
        items = [Identity.model_validate_json(row["record"]) for row in rows]
        if p.filter_role is not None:
            items = [i for i in items if i.role == p.filter_role]
        if p.filter_active is not None:
            since = iso_from_epoch(time.time() - ACTIVE_WINDOW.total_seconds())
            items = [i for i in items if (i.last_active >= since) == p.filter_active]
        if p.sort_by == "display_name":
            items.sort(key=lambda i: (i.display_name.casefold(), i.agent_id))
        else:
            # Both are the daemon's own fixed-width ISO-8601 Z strings: they sort as times.
            items.sort(key=lambda i: (getattr(i, p.sort_by), i.agent_id))
        if p.order == "desc":
            items.reverse()
        applied = {
            k: v for k, v in (("role", p.filter_role), ("active", p.filter_active)) if v is not None
        }
        return ListResult(
            status="identities_listed",
            items=items,
            identities=items,
            total=len(items),
            count=len(items),
            metadata=ListMetadata(
                filtered=bool(applied), sort=p.sort_by, order=p.order, filters_applied=applied
            ),
        )

    @r.command("REMOVE_IDENTITY", params=AgentIdParams, result=RemoveResult)
    async def remove_identity(ctx: Context, p: AgentIdParams) -> RemoveResult:
        """Delete an agent's identity; the reply carries what was removed. Publishes
        IDENTITY_REMOVED. IDENTITY_NOT_FOUND if the agent has none."""
        store = ctx.services.store
        async with store.section("identities"):
            identity = await _require(store, p.agent_id)
            await store.write("DELETE FROM identities WHERE agent_id=?", (p.agent_id,))
        ctx.publish(
            "IDENTITY_REMOVED",
            {"agent_id": identity.agent_id, "identity_uuid": identity.identity_uuid},
        )
        return RemoveResult(
            status="identity_removed", deleted=True, agent_id=p.agent_id, identity=identity
        )


def _new_identity(p: CreateParams) -> Identity:
    role = p.role or DEFAULT_ROLE
    traits, avatar, colour, icon = _ROLE_DEFAULTS.get(role.lower(), _ROLE_DEFAULTS[DEFAULT_ROLE])
    now = iso_from_epoch(time.time())
    return Identity(
        identity_uuid=str(uuid.uuid4()),
        agent_id=p.agent_id,
        display_name=p.display_name or f"{role.title()}-{p.agent_id[-4:]}",
        role=role,
        personality_traits=list(traits) if p.personality_traits is None else p.personality_traits,
        appearance={
            "avatar_style": avatar,
            "color_theme": colour,
            "icon": icon,
            **(p.appearance or {}),
        },
        created_at=now,
        updated_at=now,
        last_active=now,
        conversation_count=0,
        sessions=[],
        preferences={
            "communication_style": "professional",
            "verbosity": "moderate",
            "formality": "balanced",
        },
        stats={
            "messages_sent": 0,
            "conversations_participated": 0,
            "tasks_completed": 0,
            "tools_used": [],
        },
    )


async def _load(store: Store, agent_id: str) -> Identity | None:
    rows = await store.query("SELECT record FROM identities WHERE agent_id=?", (agent_id,))
    return Identity.model_validate_json(rows[0]["record"]) if rows else None


async def _require(store: Store, agent_id: str) -> Identity:
    identity = await _load(store, agent_id)
    if identity is not None:
        return identity
    rows = await store.query(
        "SELECT agent_id, COUNT(*) OVER () AS n FROM identities ORDER BY agent_id LIMIT 5"
    )
    known = [row["agent_id"] for row in rows]
    if known:
        more = rows[0]["n"] - len(known)
        some = ", ".join(known) + (f" (and {more} more)" if more else "")
        hint = f"identities exist for {some}; LIST_IDENTITIES lists them"
    else:
        hint = "no identities exist yet"
    raise NotFound(
        f"no identity for agent {agent_id!r}: {hint}; CREATE_IDENTITY creates one",
        code=ErrorCode.IDENTITY_NOT_FOUND,
        details={"agent_id": agent_id, "known_identities": known},
    )
