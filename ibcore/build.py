"""Turn ``(kind, name, params)`` into a component, checked against its kind's protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from ibcore.context import BuildContext
from ibcore.errors import BuildError, ConfigError, ConfigIssue, IbError
from ibcore.kinds import check
from ibcore.registry import describe_plugin_exception, resolve


def validate_params(
    kind: str, name: str, params: Mapping[str, Any] | BaseModel | None, path: str = "params"
) -> BaseModel:
    """Validate ``params`` against the params model of the ``kind`` named ``name``."""
    info = resolve(kind, name)
    assert info.params is not None  # resolve(load=True) guarantees a loaded component
    if isinstance(params, info.params):
        return params
    if isinstance(params, BaseModel):
        params = params.model_dump()
    raw = dict(params or {})
    try:
        return info.params.model_validate(raw)
    except ValidationError as exc:
        from ibcore.config.errors import issues_from_validation_error

        raise ConfigError(issues_from_validation_error(exc, prefix=path, model=info.params, root=raw)) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a validator of a plugin's params model that fails instead of refusing
        message = (
            f"the params model of {info.kind} {name!r} ({info.provider_label}) failed while checking them: "
            f"{describe_plugin_exception(exc)}"
        )
        raise ConfigError([ConfigIssue(path, message)]) from exc


def build(
    kind: str,
    name: str,
    params: Mapping[str, Any] | BaseModel | None = None,
    *,
    context: BuildContext | None = None,
) -> Any:
    """Build the ``kind`` named ``name`` (or ``provider:name``) with ``params`` for ``context``.

    Raises :class:`~ibcore.errors.RegistryError` for an unknown name, :class:`ConfigError` for bad
    params (paths start at ``params``) and :class:`~ibcore.errors.ProtocolError` when the result
    lacks what its kind needs.
    """
    info = resolve(kind, name)
    validated = validate_params(kind, name, params)
    assert info.factory is not None
    try:
        component = info.factory(validated, context if context is not None else BuildContext())
    except (IbError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # a plugin's bug, a resource error, sys.exit(): name the component, keep the cause
        if isinstance(exc, SystemExit):
            reason = describe_plugin_exception(exc)
        else:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reason = type(exc).__name__ + (f": {detail}" if detail else "")
        raise BuildError(f"{info.kind} {name!r} from {info.provider_label} failed while being built: {reason}") from exc
    return check(info.kind, name, component)


__all__ = ["build", "validate_params", "ConfigIssue"]
