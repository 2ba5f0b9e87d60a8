"""Prompt compositions: the original KSI's GET_COMPOSITIONS, GET_COMPOSITION,
VALIDATE_COMPOSITION, LIST_COMPONENTS and COMPOSE_PROMPT, plus SAVE_COMPOSITION and
REMOVE_COMPOSITION for recipes kept in the state database.

A composition comes from one of two places: a YAML file in the prompts directory
(``<prompts_dir>/compositions/<name>.yaml``, read when asked, so an edited file counts at
once) or the ``compositions`` table (SAVE_COMPOSITION; survives restarts). A saved one
shadows a file of the same name until it is removed. The format, the rendering and the
path rules are daemon/compositions.py's.

The results carry the shapes KSI's handlers answered (``items`` + ``total`` + ``metadata``;
``valid`` + ``issues`` + ``context_validation``; ``prompt`` + ``prompt_analysis``, ...).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from pydantic import Field, field_validator

from daemon.commands.registry import Context, Params, Registry, Result
from daemon.compositions import (
    COMPONENTS,
    NAME_PATTERN,
    PREVIEW_CHARS,
    MissingVariables,
    PromptsDir,
    Recipe,
    analyse,
    check_relative,
    not_found,
    render,
    structure,
)
from daemon.errors import (
    CompositionInvalid,
    Conflict,
    DaemonError,
    ErrorCode,
    InvalidParameters,
    NotFound,
)
from daemon.state.db import Store

Origin = Literal["file", "store"]
NameField = Field(pattern=NAME_PATTERN, description="letters, digits, _ . - (at most 128)")
_CONTEXT = "the variables: required_context's and any others"


# -- results ---------------------------------------------------------------------------------


class CompositionItem(Result):
    name: str
    origin: Origin = Field(description="file (the prompts directory) or store (SAVE_COMPOSITION)")
    version: str
    description: str
    author: str
    component_count: int
    required_context: dict[str, str] | None = Field(description="null without include_metadata")
    metadata: dict[str, Any] | None = Field(description="null without include_metadata")


class FailedComposition(Result):
    name: str
    error: str


class ListMetadata(Result):
    include_metadata: bool
    category_filter: str | None
    total_found: int = Field(description="compositions found before the category filter")
    filtered_count: int
    failed_to_load: int
    prompts_dir: str


class ListResult(Result):
    items: list[CompositionItem] = Field(description="sorted by name")
    total: int
    failed: list[FailedComposition] = Field(description="recipe files that could not be read")
    metadata: ListMetadata


class ComponentInfo(Result):
    name: str
    source: str | None
    content: str | None = Field(description="inline markdown (saved compositions)")
    vars: dict[str, Any]
    condition: str | None
    has_condition: bool


class Summary(Result):
    component_count: int
    conditional_components: int
    required_context_count: int
    category: str = Field(description='metadata.category, or "unknown"')
    capabilities: list[Any] = Field(description="metadata.capabilities")


class StructureCheck(Result):
    has_issues: bool
    issues: list[str]
    structural_issues: dict[str, list[str]] = Field(
        description="missing_components, invalid_conditions, template_errors (those with any)"
    )
    message: str


class CompositionDetail(Result):
    status: Literal["composition_found"]
    name: str
    origin: Origin
    shadows_file: bool = Field(description="a saved composition hides a file of this name")
    version: str
    description: str
    author: str
    components: list[ComponentInfo]
    required_context: dict[str, str]
    metadata: dict[str, Any]
    sharing: dict[str, Any] | None
    summary: Summary
    validation: StructureCheck


class ContextCheck(Result):
    required_context: list[str]
    provided_context: list[str]
    missing_context: list[str] = Field(description="required_context names not given")
    missing_variables: dict[str, list[str]] = Field(
        description="every variable the composition needs and the context lacks -> what "
        'needs it (component names, or "required_context")'
    )
    extra_context: list[str]
    context_complete: bool


class CompositionCheck(Result):
    exists: bool
    loaded: bool
    origin: Origin
    structure_valid: bool
    structural_issues: dict[str, list[str]]


class TestComposition(Result):
    composition_successful: bool
    prompt_length: int | None
    component_count: int
    components_included: list[str]
    components_skipped: list[str] = Field(description="those whose condition was false")
    composition_error: str | None


class ValidationSummary(Result):
    overall_valid: bool
    composition_exists: bool
    structure_valid: bool
    context_complete: bool
    test_passed: bool
    issue_count: int
    warning_count: int


class ValidateResult(Result):
    composition: str
    valid: bool
    issues: list[str]
    warnings: list[str]
    context_validation: ContextCheck
    composition_validation: CompositionCheck
    test_composition: TestComposition
    summary: ValidationSummary
    suggestions: list[str]


class ComponentItem(Result):
    path: str = Field(description="relative to components/")
    name: str
    directory: str = Field(description='"" for one directly in components/')
    filename: str
    exists: bool
    size_bytes: int
    preview: str = Field(description=f"the first {PREVIEW_CHARS} characters, on one line")


class DirectorySummary(Result):
    component_count: int
    total_size: int
    components: list[str]


class ComponentsMetadata(Result):
    directory_filter: str | None
    total_directories: int
    total_size_bytes: int
    components_base_path: str
    directory_summary: dict[str, DirectorySummary] = Field(description='"root" for components/')


class ComponentsResult(Result):
    items: list[ComponentItem]
    total: int
    by_directory: dict[str, list[ComponentItem]]
    root_components: list[ComponentItem]
    metadata: ComponentsMetadata


class PromptAnalysis(Result):
    length_chars: int
    length_words: int
    length_lines: int
    non_empty_lines: int
    estimated_tokens: float = Field(description="words x 1.3")
    has_variables: bool = Field(description="the prompt still contains {{ and }}")


class ComposedMetadata(Result):
    name: str
    origin: Origin
    version: str
    description: str
    author: str
    component_count: int
    metadata: dict[str, Any]


class ComposeResult(Result):
    prompt: str
    composition_used: str
    context_provided: dict[str, Any]
    composition_metadata: ComposedMetadata
    prompt_analysis: PromptAnalysis
    components_included: list[str]
    components_skipped: list[str] = Field(description="those whose condition was false")
    warnings: list[str]
    composed_successfully: Literal[True]


class SaveResult(Result):
    status: Literal["composition_saved"]
    name: str
    created: bool = Field(description="false when it replaced a saved one (overwrite)")
    shadows_file: bool
    composition: Recipe


class RemoveResult(Result):
    status: Literal["composition_removed"]
    deleted: Literal[True]
    name: str
    composition: Recipe = Field(description="the removed recipe (for an undo)")
    file_remains: bool = Field(description="a file of this name is visible again")


# -- parameters ------------------------------------------------------------------------------


class ListParams(Params):
    include_metadata: bool = Field(
        default=True, strict=True, description="required_context and metadata per item"
    )
    category: str | None = Field(
        default=None, min_length=1, max_length=256, description="only metadata.category == this"
    )


class NameParams(Params):
    name: str = NameField


class ValidateParams(Params):
    name: str = NameField
    context: dict[str, Any] = Field(default_factory=dict, description=_CONTEXT)


class ComponentsParams(Params):
    directory: str | None = Field(
        default=None,
        max_length=1024,
        description="only those under components/<directory>/ (relative; no '..')",
    )

    @field_validator("directory")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return check_relative(value if value.startswith("/") else value.rstrip("/"), "directory")


class ComposeParams(Params):
    composition: str = NameField
    context: dict[str, Any] = Field(default_factory=dict, description=_CONTEXT)


class SaveParams(Params):
    composition: Recipe = Field(
        description="the recipe: name, version, description, author, components "
        "[{name, source | content, vars, condition}], required_context, metadata"
    )
    overwrite: bool = Field(default=False, strict=True, description="replace a saved one")


# -- the commands ----------------------------------------------------------------------------


class _Found:
    __slots__ = ("origin", "recipe", "shadows_file")

    def __init__(self, recipe: Recipe, origin: Origin, shadows_file: bool) -> None:
        self.recipe = recipe
        self.origin: Origin = origin
        self.shadows_file = shadows_file


def register(r: Registry) -> None:
    @r.command("GET_COMPOSITIONS", params=ListParams, result=ListResult)
    async def get_compositions(ctx: Context, p: ListParams) -> ListResult:
        """Every prompt composition, from the prompts directory's compositions/*.yaml and
        those saved with SAVE_COMPOSITION (a saved one shadows a file of its name), sorted
        by name: version, description, author, component_count and (include_metadata,
        default true) required_context and metadata; ``category`` keeps only those whose
        metadata.category is it. Files that cannot be read are listed under ``failed``."""
        prompts = _prompts(ctx)
        found, failed = await asyncio.to_thread(_load_files, prompts)
        for recipe in await _stored(ctx.services.store):
            found[recipe.name] = (recipe, "store")
        failed = [f for f in failed if f.name not in found]
        items = [
            CompositionItem(
                name=name,
                origin=origin,
                version=recipe.version,
                description=recipe.description,
                author=recipe.author,
                component_count=len(recipe.components),
                required_context=recipe.required_context if p.include_metadata else None,
                metadata=recipe.metadata if p.include_metadata else None,
            )
            for name, (recipe, origin) in sorted(found.items())
            if p.category is None or recipe.metadata.get("category") == p.category
        ]
        return ListResult(
            items=items,
            total=len(items),
            failed=failed,
            metadata=ListMetadata(
                include_metadata=p.include_metadata,
                category_filter=p.category,
                total_found=len(found),
                filtered_count=len(items),
                failed_to_load=len(failed),
                prompts_dir=str(prompts.root),
            ),
        )

    @r.command("GET_COMPOSITION", params=NameParams, result=CompositionDetail)
    async def get_composition(ctx: Context, p: NameParams) -> CompositionDetail:
        """One composition in full: its components (name, source or inline content, vars,
        condition), required_context, metadata, a summary, and ``validation``: whether
        every component can be read and parsed and every condition is an expression.
        COMPOSITION_NOT_FOUND (naming similar ones) if there is none; COMPOSITION_INVALID
        if its file cannot be read."""
        prompts = _prompts(ctx)
        found = await _find(ctx, p.name)
        recipe = found.recipe
        problems = await asyncio.to_thread(structure, recipe, prompts)
        issues = problems.issues()
        category = recipe.metadata.get("category")
        capabilities = recipe.metadata.get("capabilities")
        return CompositionDetail(
            status="composition_found",
            name=recipe.name,
            origin=found.origin,
            shadows_file=found.shadows_file,
            version=recipe.version,
            description=recipe.description,
            author=recipe.author,
            components=[
                ComponentInfo(
                    name=c.name,
                    source=c.source,
                    content=c.content,
                    vars=c.vars,
                    condition=c.condition,
                    has_condition=c.condition is not None,
                )
                for c in recipe.components
            ],
            required_context=recipe.required_context,
            metadata=recipe.metadata,
            sharing=recipe.sharing,
            summary=Summary(
                component_count=len(recipe.components),
                conditional_components=sum(1 for c in recipe.components if c.condition),
                required_context_count=len(recipe.required_context),
                category=category if isinstance(category, str) else "unknown",
                capabilities=capabilities if isinstance(capabilities, list) else [],
            ),
            validation=StructureCheck(
                has_issues=bool(issues),
                issues=issues,
                structural_issues=problems.as_dict(),
                message=f"{len(issues)} issue(s): {'; '.join(issues)}"
                if issues
                else "Composition is valid and all components are accessible",
            ),
        )

    @r.command("VALIDATE_COMPOSITION", params=ValidateParams, result=ValidateResult)
    async def validate_composition(ctx: Context, p: ValidateParams) -> ValidateResult:
        """Check a composition against a ``context`` without using it: its structure (as
        GET_COMPOSITION's validation), which required_context names the context lacks,
        and a trial render naming every variable still missing (``missing_variables``, with
        the components that need each). ``valid: false`` with ``issues`` is a success
        reply; COMPOSITION_NOT_FOUND if there is no such composition."""
        prompts = _prompts(ctx)
        found = await _find(ctx, p.name)
        recipe = found.recipe
        problems = await asyncio.to_thread(structure, recipe, prompts)
        issues = problems.issues()
        warnings: list[str] = []
        required = list(recipe.required_context)
        missing_required = [k for k in required if k not in p.context]
        extra = [k for k in p.context if k not in recipe.required_context]
        if extra:
            warnings.append(f"Extra context provided (not required): {', '.join(extra)}")
        missing: dict[str, list[str]] = {}
        rendered = None
        error: str | None = None
        if not issues:
            try:
                rendered = await asyncio.to_thread(render, recipe, p.context, prompts)
            except MissingVariables as exc:
                missing = exc.missing
                error = f"missing variables: {', '.join(missing)}"
            except CompositionInvalid as exc:
                error = exc.message
                issues.append(exc.message)
        else:
            missing = {k: ["required_context"] for k in missing_required}
            error = "not attempted: the composition has structural issues"
        if missing:
            issues.append(f"Missing required context: {', '.join(missing)}")
        complete = not missing
        valid = not issues
        suggestions: list[str] = []
        if missing:
            suggestions.append(f"Provide missing context: {', '.join(missing)}")
        if problems.as_dict():
            suggestions.append("Fix the composition's structural issues before using it")
        if valid:
            suggestions.append("Composition is valid and ready to use with COMPOSE_PROMPT")
        if rendered is not None and not rendered.prompt:
            warnings.append("Composed prompt is empty")
        return ValidateResult(
            composition=p.name,
            valid=valid,
            issues=issues,
            warnings=warnings,
            context_validation=ContextCheck(
                required_context=required,
                provided_context=list(p.context),
                missing_context=missing_required,
                missing_variables=missing,
                extra_context=extra,
                context_complete=complete,
            ),
            composition_validation=CompositionCheck(
                exists=True,
                loaded=True,
                origin=found.origin,
                structure_valid=not problems.as_dict(),
                structural_issues=problems.as_dict(),
            ),
            test_composition=TestComposition(
                composition_successful=rendered is not None,
                prompt_length=len(rendered.prompt) if rendered is not None else None,
                component_count=len(recipe.components),
                components_included=rendered.included if rendered is not None else [],
                components_skipped=rendered.skipped if rendered is not None else [],
                composition_error=error,
            ),
            summary=ValidationSummary(
                overall_valid=valid,
                composition_exists=True,
                structure_valid=not problems.as_dict(),
                context_complete=complete,
                test_passed=rendered is not None,
                issue_count=len(issues),
                warning_count=len(warnings),
            ),
            suggestions=suggestions,
        )

    @r.command("LIST_COMPONENTS", params=ComponentsParams, result=ComponentsResult)
    async def list_components(ctx: Context, p: ComponentsParams) -> ComponentsResult:
        """The markdown components under the prompts directory's components/ (recursively;
        symlinks leading outside it are skipped), each with its size and a preview, also
        grouped by directory; ``directory`` keeps those under components/<directory>/.
        DIRECTORY_NOT_FOUND (naming those that exist) if it holds none; a directory with
        '..' or an absolute one is INVALID_PARAMETERS, one that leads outside through a
        symlink PERMISSION_DENIED."""
        prompts = _prompts(ctx)
        if p.directory is not None:
            prompts.inside(f"{COMPONENTS}/{p.directory}", "directory")
        items = await asyncio.to_thread(_component_items, prompts)
        if p.directory is not None:
            prefix = p.directory.rstrip("/") + "/"
            chosen = [i for i in items if i.path.startswith(prefix)]
            if not chosen:
                dirs = sorted({i.directory for i in items if i.directory})
                raise NotFound(
                    f"no components in directory {p.directory!r}: "
                    + (f"directories: {', '.join(dirs)}" if dirs else "there are none")
                    + "; LIST_COMPONENTS without a directory lists every component",
                    code=ErrorCode.DIRECTORY_NOT_FOUND,
                    details={"directory": p.directory, "directories": dirs},
                )
            items = chosen
        by_directory: dict[str, list[ComponentItem]] = {}
        root: list[ComponentItem] = []
        for item in items:
            (by_directory.setdefault(item.directory, []) if item.directory else root).append(item)
        summary = {
            d: DirectorySummary(
                component_count=len(group),
                total_size=sum(i.size_bytes for i in group),
                components=[i.name for i in group],
            )
            for d, group in [*by_directory.items(), *([("root", root)] if root else [])]
        }
        return ComponentsResult(
            items=items,
            total=len(items),
            by_directory=by_directory,
            root_components=root,
            metadata=ComponentsMetadata(
                directory_filter=p.directory,
                total_directories=len(summary),
                total_size_bytes=sum(i.size_bytes for i in items),
                components_base_path=str(prompts.root / COMPONENTS),
                directory_summary=summary,
            ),
        )

    @r.command("COMPOSE_PROMPT", params=ComposeParams, result=ComposeResult)
    async def compose_prompt(ctx: Context, p: ComposeParams) -> ComposeResult:
        """Render a composition with a ``context``: each component whose condition holds,
        in order, its variables filled (jinja2, sandboxed; a component's vars override the
        context), joined by blank lines; with the prompt's length, words, lines and an
        estimate of its tokens. CONTEXT_VALIDATION_ERROR naming every missing variable
        (``details.missing``); COMPOSITION_NOT_FOUND; COMPOSITION_INVALID if a component
        cannot be read or rendered."""
        prompts = _prompts(ctx)
        found = await _find(ctx, p.composition)
        recipe = found.recipe
        try:
            rendered = await asyncio.to_thread(render, recipe, p.context, prompts)
        except MissingVariables as exc:
            names = list(exc.missing)
            raise InvalidParameters(
                f"composition {recipe.name!r} needs variables the context lacks: "
                f"{', '.join(names)} (required: {', '.join(recipe.required_context) or 'none'}; "
                "VALIDATE_COMPOSITION checks a context)",
                code=ErrorCode.CONTEXT_VALIDATION_ERROR,
                details={
                    "composition": recipe.name,
                    "missing": names,
                    "needed_by": exc.missing,
                    "required_context": list(recipe.required_context),
                    "provided_context": list(p.context),
                },
            ) from None
        analysis = analyse(rendered.prompt)
        warnings: list[str] = []
        if analysis["has_variables"]:
            warnings.append("The prompt contains '{{' and '}}' (literal or unresolved)")
        if not rendered.prompt:
            warnings.append("Composed prompt is empty")
        elif len(rendered.prompt) > 100_000:
            warnings.append("Composed prompt is very long (>100 KB)")
        return ComposeResult(
            prompt=rendered.prompt,
            composition_used=recipe.name,
            context_provided=p.context,
            composition_metadata=ComposedMetadata(
                name=recipe.name,
                origin=found.origin,
                version=recipe.version,
                description=recipe.description,
                author=recipe.author,
                component_count=len(recipe.components),
                metadata=recipe.metadata,
            ),
            prompt_analysis=PromptAnalysis(**analysis),
            components_included=rendered.included,
            components_skipped=rendered.skipped,
            warnings=warnings,
            composed_successfully=True,
        )

    @r.command("SAVE_COMPOSITION", params=SaveParams, result=SaveResult)
    async def save_composition(ctx: Context, p: SaveParams) -> SaveResult:
        """Keep a composition in the state database (it survives restarts): a recipe as a
        YAML file would hold it, its components files of the prompts directory
        (``source``) or inline markdown (``content``). It is checked first: a component
        that cannot be read or parsed is COMPOSITION_INVALID. COMPOSITION_EXISTS if one of
        its name is saved, unless ``overwrite``; a file of its name is shadowed. Publishes
        COMPOSITION_SAVED."""
        store = ctx.services.store
        prompts = _prompts(ctx)
        recipe = p.composition
        problems = await asyncio.to_thread(structure, recipe, prompts)
        if problems.as_dict():
            issues = problems.issues()
            raise CompositionInvalid(
                f"composition {recipe.name!r} cannot be used: {'; '.join(issues)}",
                details={"name": recipe.name, "structural_issues": problems.as_dict()},
            )
        file_exists = recipe.name in await asyncio.to_thread(prompts.composition_names)
        async with store.section("compositions"):
            rows = await store.query(
                "SELECT created_at FROM compositions WHERE name=?", (recipe.name,)
            )
            if rows and not p.overwrite:
                raise Conflict(
                    f"a composition {recipe.name!r} is already saved; overwrite: true "
                    "replaces it, REMOVE_COMPOSITION removes it",
                    code=ErrorCode.COMPOSITION_EXISTS,
                    details={"name": recipe.name},
                )
            now = time.time()
            created_at = rows[0]["created_at"] if rows else now
            await store.write(
                "INSERT OR REPLACE INTO compositions(name, record, created_at, updated_at) "
                "VALUES(?,?,?,?)",
                (recipe.name, recipe.model_dump_json().encode(), created_at, now),
            )
        ctx.publish(
            "COMPOSITION_SAVED",
            {"name": recipe.name, "created": not rows, "shadows_file": file_exists},
        )
        return SaveResult(
            status="composition_saved",
            name=recipe.name,
            created=not rows,
            shadows_file=file_exists,
            composition=recipe,
        )

    @r.command("REMOVE_COMPOSITION", params=NameParams, result=RemoveResult)
    async def remove_composition(ctx: Context, p: NameParams) -> RemoveResult:
        """Delete a saved composition; the reply carries the recipe. A file of its name is
        visible again. COMPOSITION_READ_ONLY for one that is only a file (remove the file
        instead); COMPOSITION_NOT_FOUND if there is none. Publishes COMPOSITION_REMOVED."""
        store = ctx.services.store
        prompts = _prompts(ctx)
        file_exists = p.name in await asyncio.to_thread(prompts.composition_names)
        async with store.section("compositions"):
            recipe = await _load_stored(store, p.name)
            if recipe is None:
                if file_exists:
                    raise Conflict(
                        f"composition {p.name!r} is a file of the prompts directory, not a "
                        "saved one: remove the file to remove it",
                        code=ErrorCode.COMPOSITION_READ_ONLY,
                        details={"name": p.name, "prompts_dir": str(prompts.root)},
                    )
                raise not_found(p.name, await _names(ctx))
            await store.write("DELETE FROM compositions WHERE name=?", (p.name,))
        ctx.publish("COMPOSITION_REMOVED", {"name": p.name, "file_remains": file_exists})
        return RemoveResult(
            status="composition_removed",
            deleted=True,
            name=p.name,
            composition=recipe,
            file_remains=file_exists,
        )


# -- helpers ---------------------------------------------------------------------------------


def _prompts(ctx: Context) -> PromptsDir:
    return PromptsDir(ctx.services.settings.prompts_path)


Loaded = dict[str, tuple[Recipe, Origin]]


def _load_files(prompts: PromptsDir) -> tuple[Loaded, list[FailedComposition]]:
    found: Loaded = {}
    failed: list[FailedComposition] = []
    for name in prompts.composition_names():
        try:
            recipe = prompts.load(name)
        except DaemonError as exc:
            failed.append(FailedComposition(name=name, error=exc.message))
            continue
        if recipe is not None:
            found[name] = (recipe, "file")
    return found, failed


def _component_items(prompts: PromptsDir) -> list[ComponentItem]:
    items: list[ComponentItem] = []
    for rel, path in prompts.components():
        directory, _, filename = rel.rpartition("/")
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(PREVIEW_CHARS * 4).decode("utf-8", errors="replace")
        except OSError:
            continue
        preview = " ".join(head[:PREVIEW_CHARS].split())
        if size > PREVIEW_CHARS:
            preview += "..."
        items.append(
            ComponentItem(
                path=rel,
                name=filename.removesuffix(".md"),
                directory=directory,
                filename=filename,
                exists=True,
                size_bytes=size,
                preview=preview,
            )
        )
    return items


async def _stored(store: Store) -> list[Recipe]:
    rows = await store.query("SELECT record FROM compositions ORDER BY name")
    return [Recipe.model_validate_json(row["record"]) for row in rows]


async def _load_stored(store: Store, name: str) -> Recipe | None:
    rows = await store.query("SELECT record FROM compositions WHERE name=?", (name,))
    return Recipe.model_validate_json(rows[0]["record"]) if rows else None


async def _names(ctx: Context) -> list[str]:
    files = await asyncio.to_thread(_prompts(ctx).composition_names)
    rows = await ctx.services.store.query("SELECT name FROM compositions")
    return sorted({*files, *(row["name"] for row in rows)})


async def _find(ctx: Context, name: str) -> _Found:
    prompts = _prompts(ctx)
    stored = await _load_stored(ctx.services.store, name)
    if stored is not None:
        shadows = name in await asyncio.to_thread(prompts.composition_names)
        return _Found(stored, "store", shadows)
    recipe = await asyncio.to_thread(prompts.load, name)
    if recipe is not None:
        return _Found(recipe, "file", False)
    raise not_found(name, await _names(ctx))
