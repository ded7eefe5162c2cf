"""The component kinds, each declared once: its name, plural and Protocol.

Everything else about a kind is derived from its declaration: the registry's table and entry-point
group (``ibcore.<plural>``), the ``register`` decorator (:meth:`Kind.register`), the check of what a
factory built (the Protocol's methods and attributes), ``ib list``, and, through the config spec
class that names it (``component_kind``), the JSON Schema and the config walk of validation and
preflight. A plugin that brings a new kind declares it with :func:`declare_kind`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ibcore import protocols
from ibcore.errors import ProtocolError, RegistryError

T = TypeVar("T")

# Callables a Protocol may require besides ordinary methods (``__call__``, ``__len__``, ...).
_DUNDER_METHODS = ("__call__", "__len__", "__getitem__", "__iter__")


def _protocol_members(protocol: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The methods and the data attributes a Protocol class declares (its bases' included)."""
    methods: list[str] = []
    attributes: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or klass.__module__ == "typing":
            continue
        for name in getattr(klass, "__annotations__", {}):
            if name not in attributes and not name.startswith("_"):
                attributes.append(name)
        for name, value in vars(klass).items():
            if callable(value) and (not name.startswith("_") or name in _DUNDER_METHODS) and name not in methods:
                methods.append(name)
    return tuple(methods), tuple(a for a in attributes if a not in methods)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One component kind. ``plural`` names the entry-point group ``ibcore.<plural>`` and ``ib list``'s table."""

    name: str
    protocol: type
    plural: str = ""

    def __post_init__(self) -> None:
        if not self.plural:
            object.__setattr__(self, "plural", self.name + "s")

    @property
    def entry_point_group(self) -> str:
        return f"ibcore.{self.plural}"

    @property
    def methods(self) -> tuple[str, ...]:
        return _protocol_members(self.protocol)[0]

    @property
    def attributes(self) -> tuple[str, ...]:
        return _protocol_members(self.protocol)[1]

    def register(
        self,
        name: str,
        params: type[Any] | None = None,
        *,
        description: str | None = None,
        citation: str | None = None,
        replace: bool = False,
    ) -> Callable[[T], T]:
        """Decorator: register a factory ``f(params, context)`` (or a class) as the component ``name`` of this kind."""
        from ibcore.registry import NoParams, decorator  # the registry imports this module

        chosen = NoParams if params is None else params
        return decorator(self.name)(name, chosen, description=description, citation=citation, replace=replace)


_KINDS: dict[str, Kind] = {}


def declare_kind(kind: Kind) -> Kind:
    """Add a kind (for a plugin that brings one). Declaring the same kind again is harmless."""
    existing = _KINDS.get(kind.name)
    if existing is not None and existing != kind:
        raise RegistryError(f"the component kind {kind.name!r} is already declared ({existing}); choose another name")
    plurals = {k.plural: k.name for k in _KINDS.values()}
    if plurals.get(kind.plural, kind.name) != kind.name or kind.plural in _KINDS:
        raise RegistryError(f"the plural {kind.plural!r} of kind {kind.name!r} is already taken")
    _KINDS[kind.name] = kind
    return kind


def forget_kind(name: str) -> None:
    """Remove a kind declared by :func:`declare_kind` (tests restore the declarations they change)."""
    _KINDS.pop(name, None)


def kind_names() -> tuple[str, ...]:
    """Every declared kind, in declaration order (the order of ``ib list``)."""
    return tuple(_KINDS)


def get_kind(name: str) -> Kind:
    """The kind named ``name`` or by its plural (``losses``)."""
    kind = _KINDS.get(name)
    if kind is None:
        kind = next((k for k in _KINDS.values() if k.plural == name), None)
    if kind is None:
        raise RegistryError(f"Unknown component kind {name!r}; kinds are: {', '.join(_KINDS)}.")
    return kind


def missing_members(kind: str, component: Any) -> list[str]:
    """Names the ``kind``'s Protocol requires that ``component`` lacks (methods must be callable)."""
    declared = get_kind(kind)
    missing = [m for m in declared.methods if not callable(getattr(component, m, None))]
    missing += [a for a in declared.attributes if not hasattr(component, a)]
    return missing


def check(kind: str, name: str, component: Any) -> Any:
    """Return ``component`` if it follows the ``kind``'s Protocol, else raise :class:`ProtocolError`."""
    missing = missing_members(kind, component)
    if missing:
        raise ProtocolError(
            f"{kind} {name!r} built {type(component).__name__} that does not follow the {kind} protocol; "
            f"missing: {', '.join(missing)}."
        )
    return component


DATASET = declare_kind(Kind("dataset", protocols.Dataset))
SAMPLER = declare_kind(Kind("sampler", protocols.Sampler))
LOSS = declare_kind(Kind("loss", protocols.Loss, plural="losses"))
BACKBONE = declare_kind(Kind("backbone", protocols.Backbone))
OPTIMIZER = declare_kind(Kind("optimizer", protocols.Optimizer))
EVALUATOR = declare_kind(Kind("evaluator", protocols.Evaluator))
MIXER = declare_kind(Kind("mixer", protocols.Mixer))
ADJUSTMENT = declare_kind(Kind("adjustment", protocols.Adjustment))
STEP = declare_kind(Kind("step", protocols.TrainingStep))
AUGMENTATION = declare_kind(Kind("augmentation", protocols.Augmentation))
LOGGER = declare_kind(Kind("logger", protocols.Logger))
