"""Component registries: one per kind, filled by decorators and by entry-point discovery.

The core knows kinds, never component names. Built-in and third-party components arrive the same
way: a distribution declares entry points in the group ``ibcore.<kind>s`` (``ibcore.losses``, ...),
each named after one component and pointing at the module (or decorated object) that registers it.
Discovery reads only metadata; a plugin module is imported the first time one of its components is
described, validated or built, so ``ib list`` and ``ib validate`` stay light.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import difflib
import fnmatch
import inspect
import os
import re
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ibcore import kinds as kinds_module
from ibcore.errors import PluginLoadError, RegistryError
from ibcore.kinds import get_kind, kind_names

# The built-in kinds as declared in ibcore.kinds (a plugin may declare more: use kind_names() for all).
KINDS: tuple[str, ...] = kind_names()
PLURALS: dict[str, str] = {kind: get_kind(kind).plural for kind in KINDS}
ENTRY_POINT_GROUPS: dict[str, str] = {kind: get_kind(kind).entry_point_group for kind in KINDS}

STRICT_ENV = "IB_STRICT_PLUGINS"
DISABLE_ENV = "IB_DISABLE_PLUGINS"


class RegistryWarning(UserWarning):
    """Two providers offer the same component name."""


_ACCEPTS_BOOL: tuple[Any, ...] = (bool, Any, object)
_NOT_A_NUMBER = "a boolean is not a number (YAML reads true/false, yes/no and on/off as booleans)"


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_number(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, (int, float)) and not issubclass(annotation, bool)


def _union_members(annotation: Any) -> list[Any]:
    """The members of a (possibly nested, possibly annotated) union, without ``None``."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) if a is not type(None) for m in _union_members(a)]
    return [annotation]


def _boolean_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` holds a boolean where ``annotation`` wants a number, or None.

    YAML 1.1 reads ``yes``, ``on`` and ``true`` as booleans, and Python's ``True == 1``: without this check
    ``epochs: yes`` would train one epoch. A union that accepts booleans itself (``bool | None``) is left alone.
    """
    members = _union_members(annotation)
    if isinstance(value, bool):
        if any(m in _ACCEPTS_BOOL for m in members):
            return None
        return _NOT_A_NUMBER if any(_is_number(m) for m in members) else None
    if isinstance(value, (list, tuple)):
        for member in members:
            origin, args = typing.get_origin(member), typing.get_args(member)
            if origin in (list, tuple, set, frozenset, Sequence) and args:
                for i, item in enumerate(value):
                    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                        if i >= len(args):
                            break
                        element = args[i]
                    else:
                        element = args[0]
                    problem = _boolean_problem(element, item)
                    if problem is not None:
                        return f"item {i}: {problem}"
                return None
    if isinstance(value, Mapping):
        for member in members:
            if typing.get_origin(member) in (dict, Mapping) and len(typing.get_args(member)) == 2:
                element = typing.get_args(member)[1]
                for key, item in value.items():
                    problem = _boolean_problem(element, item)
                    if problem is not None:
                        return f"{key!r}: {problem}"
                return None
    return None


class NumbersAreNotBooleans(BaseModel):
    """A pydantic model whose int and float fields (and lists, tuples and mappings of them) refuse booleans.

    Pydantic takes ``True`` for the number 1 (``bool`` is an ``int``), so ``lr: true`` would train at lr 1.
    Numbers written as text stay accepted (PyYAML reads ``2e-4`` as a string).
    """

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (bool, list, tuple, Mapping)) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            problem = _boolean_problem(field.annotation, value) if field is not None else None
            if problem is not None:
                raise PydanticCustomError("bool_is_not_a_number", "{problem}", {"problem": problem})
        return value


class Params(NumbersAreNotBooleans):
    """Base class for component params: unknown keys are errors, values are immutable, numbers are finite
    and never booleans."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class NoParams(Params):
    """Params of a component that takes none."""


def _check_per_class(value: Any, info: ValidationInfo) -> Any:
    """Refuse a per-class list whose length is not the class count, when validation knows the count.

    ``ib validate`` passes ``{"num_classes": N, "dataset": NAME}`` as pydantic's validation context when
    the config's dataset can tell its class count from its params (``num_classes_hint``).
    """
    context = info.context if isinstance(info.context, dict) else {}
    expected = context.get("num_classes")
    if isinstance(expected, int) and hasattr(value, "__len__") and len(value) != expected:
        dataset = context.get("dataset")
        owner = f"the dataset {dataset!r}" if isinstance(dataset, str) else "the dataset"
        raise PydanticCustomError(
            "per_class_length",
            "expected {expected} values, one per class ({owner} has {expected} classes), got {got}",
            {"expected": expected, "owner": owner, "got": len(value)},
        )
    return value


PerClass = AfterValidator(_check_per_class)
"""Marks a per-class list param, ``Annotated[tuple[float, ...], PerClass]``: ``ib validate`` checks its length
against the class count whenever the config's dataset can say it without loading data."""


class _DataPath:
    """The type of :data:`DataPath` (a marker: it validates nothing)."""

    def __repr__(self) -> str:
        return "DataPath"


DataPath = _DataPath()
"""Marks a params field holding a file or folder path relative to the working directory,
``Annotated[str, DataPath]``: ``ib run`` stores it resolved (absolute) in the run's config.yaml, so
``ib resume`` from another folder reads the same data."""


Factory = Callable[[Any, Any], Any]


@dataclasses.dataclass
class ComponentInfo:
    """Everything the registry knows about one component of one provider.

    ``factory`` and ``params`` are ``None`` until the provider's module is imported; ``error`` holds
    the reason when that import failed.
    """

    kind: str
    name: str
    provider: str
    version: str | None = None
    factory: Factory | None = None
    params: type[BaseModel] | None = None
    description: str = ""
    citation: str | None = None
    entry_point: str | None = None
    error: PluginLoadError | None = None
    _entry_point_obj: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def loaded(self) -> bool:
        return self.factory is not None

    @property
    def qualified_name(self) -> str:
        return f"{self.provider}:{self.name}"

    @property
    def provider_label(self) -> str:
        return f"{self.provider} {self.version}" if self.version else self.provider


@dataclasses.dataclass
class DistributionStatus:
    """Load status of one distribution that declares ibcore entry points (for ``ib plugins``)."""

    name: str
    version: str | None
    components: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (kind, name)
    errors: list[str] = dataclasses.field(default_factory=list)
    disabled: bool = False

    @property
    def status(self) -> str:
        if self.disabled:
            return "disabled"
        return "failed" if self.errors else "ok"


@dataclasses.dataclass
class _State:
    entries: dict[str, dict[str, dict[str, ComponentInfo]]]  # kind -> name -> provider -> info
    distributions: dict[str, DistributionStatus]
    discovered: bool = False
    scanned: set[str] = dataclasses.field(default_factory=set)  # kinds whose entry-point group was read

    def of(self, kind: str) -> dict[str, dict[str, ComponentInfo]]:
        """The table of ``kind`` (created on first use: a plugin may declare a kind at any time)."""
        return self.entries.setdefault(kind, {})


_state = _State(entries={}, distributions={})
# Set while a distribution's entry point is being imported, so its decorators record that provider.
_loading_provider: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "ibcore_loading_provider", default=None
)


def _normalise_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _check_kind(kind: str) -> str:
    """The kind's name, given its name or its plural; an unknown kind is a RegistryError."""
    return get_kind(kind).name


# --------------------------------------------------------------------------------------------
# Discovery


def _disabled_distributions() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {_normalise_dist(part.strip()) for part in raw.split(",") if part.strip()}


def _entry_points(group: str) -> list[Any]:
    try:
        from importlib_metadata import entry_points
    except ImportError:  # pragma: no cover - the dependency is declared; stdlib has the same API
        from importlib.metadata import entry_points  # type: ignore[assignment]
    return list(entry_points(group=group))


def discover() -> None:
    """Read every ``ibcore.*`` entry point (metadata only). Idempotent; cheap after the first call."""
    kinds = [kind for kind in kind_names() if kind not in _state.scanned]
    if not kinds:
        return
    first = not _state.discovered
    _state.discovered = True
    _state.scanned.update(kinds)
    disabled = _disabled_distributions()
    for kind in kinds:
        for ep in _entry_points(get_kind(kind).entry_point_group):
            dist = getattr(ep, "dist", None)
            dist_name = _normalise_dist(dist.name) if dist is not None else "unknown"
            version = dist.version if dist is not None else None
            status = _state.distributions.setdefault(dist_name, DistributionStatus(dist_name, version))
            status.components.append((kind, ep.name))
            if dist_name in disabled:
                status.disabled = True
                continue
            providers = _state.of(kind).setdefault(ep.name, {})
            if dist_name in providers:
                continue  # the same distribution seen twice on sys.path
            if providers:
                others = ", ".join(sorted(providers))
                warnings.warn(
                    f"{kind} {ep.name!r} is provided by both {others} and {dist_name}; "
                    f"write '{dist_name}:{ep.name}' (or another provider) to choose one.",
                    RegistryWarning,
                    stacklevel=2,
                )
            providers[dist_name] = ComponentInfo(
                kind=kind,
                name=ep.name,
                provider=dist_name,
                version=version,
                entry_point=ep.value,
                _entry_point_obj=ep,
            )
    if first and os.environ.get(STRICT_ENV, "") not in ("", "0"):
        failures = []
        for info in _all_infos():
            _ensure_loaded(info)
            if info.error is not None:
                failures.append(str(info.error))
        if failures:
            raise PluginLoadError(
                f"{STRICT_ENV} is set and {len(failures)} plugin component(s) failed to load:\n  "
                + "\n  ".join(failures)
            )


def _all_infos(kind: str | None = None) -> list[ComponentInfo]:
    kinds = [kind] if kind else list(kind_names())
    return [info for k in kinds for providers in _state.of(k).values() for info in providers.values()]


def describe_plugin_exception(exc: BaseException) -> str:
    """One line for an exception raised by plugin code; ``sys.exit()`` is named as such (its message is a code)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r}); plugin code must raise an exception instead"
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def _record_failure(info: ComponentInfo, message: str, cause: BaseException | None) -> None:
    error = PluginLoadError(message)
    if cause is not None:
        error.__cause__ = cause
    info.error = error
    status = _state.distributions.get(info.provider)
    if status is not None:
        status.errors.append(message)


def _ensure_loaded(info: ComponentInfo) -> None:
    """Import the module behind a discovered entry point; record (never raise) a failure."""
    if info.loaded or info.error is not None or info._entry_point_obj is None:
        return
    where = f"{info.kind} {info.name!r} from {info.provider_label} (entry point {info.entry_point!r})"
    token = _loading_provider.set((info.provider, info.version))
    try:
        obj = info._entry_point_obj.load()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a plugin may raise anything at import, sys.exit() included; record it
        _record_failure(info, f"{where} failed to load: {describe_plugin_exception(exc)}", exc)
        return
    finally:
        _loading_provider.reset(token)
    if isinstance(obj, types.ModuleType):
        if not info.loaded:
            # The module was imported before (directly, or before a registry snapshot was restored),
            # so its decorators did not run again: adopt what they attached to the objects.
            for value in vars(obj).values():
                registered = getattr(value, "__ib_component__", None)
                if isinstance(registered, ComponentInfo) and (registered.kind, registered.name) == (
                    info.kind,
                    info.name,
                ):
                    _adopt(info, registered)
    else:
        registered = getattr(obj, "__ib_component__", None)
        if not isinstance(registered, ComponentInfo):
            _record_failure(
                info,
                f"{where} resolved to {type(obj).__name__} {obj!r}, which is not an ibcore component; "
                f"decorate it with @register_{info.kind}({info.name!r}, ...).",
                None,
            )
            return
        if (registered.kind, registered.name) != (info.kind, info.name):
            _record_failure(
                info,
                f"{where} resolved to the {registered.kind} {registered.name!r}, not a {info.kind} "
                f"named {info.name!r}.",
                None,
            )
            return
        if not info.loaded:
            _adopt(info, registered)
    if not info.loaded and info.error is None:
        _record_failure(info, f"{where} was imported but did not register a {info.kind} named {info.name!r}.", None)


def _adopt(info: ComponentInfo, registered: ComponentInfo) -> None:
    info.factory, info.params = registered.factory, registered.params
    info.description, info.citation = registered.description, registered.citation


def _entry_point_owner(kind: str, name: str, module: str) -> ComponentInfo | None:
    """The discovered, not yet loaded entry point for ``name`` whose module defines ``module``."""
    for info in _state.of(kind).get(name, {}).values():
        if info.entry_point and not info.loaded:
            ep_module = info.entry_point.split(":", 1)[0].strip()
            if module == ep_module or module.startswith(ep_module + "."):
                return info
    return None


# --------------------------------------------------------------------------------------------
# Registration


def register(
    kind: str,
    name: str,
    factory: Factory,
    *,
    params: type[BaseModel] = NoParams,
    description: str | None = None,
    citation: str | None = None,
    replace: bool = False,
) -> ComponentInfo:
    """Register ``factory(params, context) -> component`` as the ``kind`` named ``name``."""
    kind = _check_kind(kind)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise RegistryError(f"Invalid {kind} name {name!r}: use letters, digits, '_', '-' or '.'.")
    if not (inspect.isclass(params) and issubclass(params, BaseModel)):
        raise RegistryError(f"{kind} {name!r}: params must be a pydantic model class, got {params!r}.")
    if params.model_config.get("extra") != "forbid":
        raise RegistryError(
            f"{kind} {name!r}: params model {params.__name__} must forbid unknown keys so typos are caught; "
            "derive it from ibcore.Params or set model_config = ConfigDict(extra='forbid')."
        )
    if not callable(factory):
        raise RegistryError(f"{kind} {name!r}: the registered object {factory!r} is not callable.")
    if inspect.isclass(factory):
        # Look in the class's own MRO: getattr(cls, "__call__") would find type.__call__ on any class.
        defined = {m for k in factory.__mro__ if k is not object for m in vars(k)}
        missing = [m for m in get_kind(kind).methods if m not in defined]
        if missing:
            raise RegistryError(
                f"{kind} {name!r}: class {factory.__name__} does not follow the {kind} protocol; "
                f"missing: {', '.join(missing)}."
            )
    loading = _loading_provider.get()
    if loading is None:
        discover()  # so that replace=True overrides an installed component for good
        module = getattr(factory, "__module__", "?")
        owner = _entry_point_owner(kind, name, module)
        if owner is not None:  # a plugin module imported directly: credit its distribution
            provider, version = owner.provider, owner.version
        else:
            provider, version = f"local:{module}", None
    else:
        provider, version = loading
    doc = (description or inspect.getdoc(factory) or "").strip().splitlines()
    info = ComponentInfo(
        kind=kind,
        name=name,
        provider=provider,
        version=version,
        factory=factory,
        params=params,
        description=doc[0] if doc else "",
        citation=citation,
    )
    providers = _state.of(kind).setdefault(name, {})
    existing = providers.get(provider)
    if replace:
        providers.clear()
    elif existing is not None and existing.loaded and not _same_definition(existing.factory, factory):
        theirs = _definition_label(existing.factory)
        raise RegistryError(
            f"{kind} {name!r} is already registered by {existing.provider_label} ({theirs}); "
            f"{_definition_label(factory)} is another definition: choose another name, or pass replace=True "
            "to register it again."
        )
    elif loading is None and providers and provider not in providers:
        others = ", ".join(sorted(p.provider_label for p in providers.values()))
        raise RegistryError(
            f"{kind} {name!r} is already provided by {others}; choose another name or pass replace=True "
            "to override it in this process."
        )
    if existing is not None and not replace:
        info.entry_point, info._entry_point_obj = existing.entry_point, existing._entry_point_obj
    providers[provider] = info
    return info


def _definition(factory: Any) -> tuple[str, str, int | None]:
    """What identifies a factory across re-runs of its code: module, qualified name, and a lambda's line."""
    module = getattr(factory, "__module__", None) or "?"
    qualname = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    code = getattr(factory, "__code__", None)
    # Every lambda of a module has the qualified name '<lambda>': its first line tells two of them apart.
    line = code.co_firstlineno if "<lambda>" in qualname and code is not None else None
    return module, qualname, line


def _same_definition(old: Any, new: Any) -> bool:
    """``new`` is ``old`` defined again (a re-run notebook cell, a reloaded module), not another factory."""
    return old is new or _definition(old) == _definition(new)


def _definition_label(factory: Any) -> str:
    module, qualname, line = _definition(factory)
    return f"{module}.{qualname}" + (f" at line {line}" if line is not None else "")


T = TypeVar("T")


def decorator(kind: str) -> Callable[..., Callable[[T], T]]:
    """The ``register`` decorator of ``kind`` (``decorator("loss")`` is :func:`register_loss`)."""
    kind = _check_kind(kind)

    def register_kind(
        name: str,
        params: type[BaseModel] = NoParams,
        *,
        description: str | None = None,
        citation: str | None = None,
        replace: bool = False,
    ) -> Callable[[T], T]:
        def wrap(factory: T) -> T:
            info = register(
                kind,
                name,
                factory,  # type: ignore[arg-type]
                params=params,
                description=description,
                citation=citation,
                replace=replace,
            )
            try:
                factory.__ib_component__ = info  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # builtins and slotted objects cannot take attributes
                pass
            return factory

        return wrap

    register_kind.__name__ = f"register_{kind}"
    register_kind.__doc__ = (
        f"Decorator: register a {kind} factory ``f(params, context)`` (or class) under ``name``.\n\n"
        f"``params`` is a pydantic model (derive from ibcore.Params); ``description`` defaults to the\n"
        f"first docstring line; ``citation`` names the paper; ``replace=True`` overrides an existing name."
    )
    return register_kind


# Named decorators of the built-in kinds (a kind declared by a plugin has Kind.register).
register_dataset = decorator("dataset")
register_sampler = decorator("sampler")
register_loss = decorator("loss")
register_backbone = decorator("backbone")
register_optimizer = decorator("optimizer")
register_evaluator = decorator("evaluator")
register_mixer = decorator("mixer")
register_adjustment = decorator("adjustment")
register_step = decorator("step")
register_augmentation = decorator("augmentation")
register_logger = decorator("logger")


# --------------------------------------------------------------------------------------------
# Lookup


def _failed_plugins() -> list[str]:
    return [err for status in _state.distributions.values() for err in status.errors]


def _unknown_name_error(kind: str, name: str) -> RegistryError:
    plural = get_kind(kind).plural
    names = sorted(_state.of(kind))
    disabled = sorted(
        status.name for status in _state.distributions.values() if status.disabled and (kind, name) in status.components
    )
    if disabled:
        return RegistryError(
            f"{kind} {name!r} is provided by {', '.join(disabled)}, which {DISABLE_ENV} switches off in this process."
        )
    lines = [f"Unknown {kind} {name!r}."]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        lines[0] += f" Did you mean: {', '.join(close)}?"
    if names:
        listed = [f"{n} ({', '.join(sorted(p.provider_label for p in _state.of(kind)[n].values()))})" for n in names]
        lines.append(f"Available {plural}: {', '.join(listed)}.")
    else:
        lines.append(f"No {plural} are installed (is ib_plugins_builtin installed, or a plugin missing?).")
    failed = _failed_plugins()
    if failed:
        lines.append("Plugins that failed to load:\n  " + "\n  ".join(failed))
    return RegistryError("\n".join(lines))


def resolve(kind: str, name: str, *, load: bool = True) -> ComponentInfo:
    """Find one component by ``name`` or ``provider:name``; import its module unless ``load=False``.

    Raises :class:`RegistryError` for an unknown or ambiguous name and, with ``load``, for a
    component whose plugin failed to load (chained to the original exception).
    """
    kind = _check_kind(kind)
    discover()
    provider: str | None = None
    base = name
    if ":" in name:
        provider, base = name.rsplit(":", 1)
    providers = _state.of(kind).get(base)
    if not providers:
        raise _unknown_name_error(kind, name)
    if provider is not None:
        wanted = provider if provider.startswith("local:") else _normalise_dist(provider)
        info = providers.get(wanted)
        if info is None:
            raise RegistryError(
                f"{kind} {base!r} has no provider {provider!r}; providers: {', '.join(sorted(providers))}."
            )
    elif len(providers) > 1:
        options = ", ".join(f"'{p}:{base}'" for p in sorted(providers))
        raise RegistryError(
            f"{kind} {base!r} is provided by {len(providers)} plugins; write one of {options} to choose."
        )
    else:
        info = next(iter(providers.values()))
    if load:
        _ensure_loaded(info)
        if info.error is not None:
            raise RegistryError(f"{kind} {name!r} cannot be used: {info.error}") from info.error.__cause__
    return info


def available(kind: str) -> list[str]:
    """Names of every discovered component of ``kind`` (nothing is imported)."""
    kind = _check_kind(kind)
    discover()
    return sorted(_state.of(kind))


def list_components(kind: str | None = None, pattern: str | None = None, *, load: bool = True) -> list[ComponentInfo]:
    """Every component (optionally of one kind, names matching a shell ``pattern``), sorted.

    With ``load`` the plugin modules are imported so descriptions are known; failures are recorded
    on the returned entries (``error``), never raised.
    """
    discover()
    kind = _check_kind(kind) if kind else None
    infos = [info for info in _all_infos(kind) if pattern is None or fnmatch.fnmatchcase(info.name, pattern)]
    if load:
        for info in infos:
            _ensure_loaded(info)
    order = kind_names()
    return sorted(infos, key=lambda i: (order.index(i.kind) if i.kind in order else len(order), i.name, i.provider))


def distributions() -> list[DistributionStatus]:
    """Every distribution that declares ibcore entry points, after trying to load all of them."""
    list_components(load=True)
    return sorted(_state.distributions.values(), key=lambda d: d.name)


@contextlib.contextmanager
def registry_snapshot() -> Iterator[None]:
    """Snapshot every registry (and the declared kinds) and restore it on exit, so a test's registrations do not
    leak."""
    global _state
    declared = dict(kinds_module._KINDS)
    saved = _State(
        entries={
            kind: {name: {p: copy.copy(i) for p, i in providers.items()} for name, providers in names.items()}
            for kind, names in _state.entries.items()
        },
        distributions=copy.deepcopy(_state.distributions),
        discovered=_state.discovered,
        scanned=set(_state.scanned),
    )
    try:
        yield
    finally:
        _state = saved
        kinds_module._KINDS.clear()
        kinds_module._KINDS.update(declared)


def reset_discovery() -> None:
    """Forget every registration and discovery (for tests that change the installed plugins)."""
    global _state
    _state = _State(entries={}, distributions={})
