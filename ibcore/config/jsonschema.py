"""JSON Schema of the whole experiment, with every installed component's params (for editors)."""

from __future__ import annotations

from typing import Any

from ibcore.config.schema import Experiment, spec_kinds
from ibcore.registry import list_components


def experiment_json_schema() -> dict[str, Any]:
    """The Experiment schema where each ``<Kind>Spec`` lists the installed components of that kind.

    Each component becomes ``{name: const, params: <its params schema>}``; components whose plugin
    failed to load are left out (``ib plugins`` reports them).
    """
    schema = Experiment.model_json_schema()
    defs = schema.setdefault("$defs", {})
    infos = [info for info in list_components(load=True) if info.params is not None]
    for spec_type, kind in spec_kinds().items():
        # keys a spec takes besides name and params (an adjustment's reference), allowed with every component
        extra = {
            key: value
            for key, value in defs.get(spec_type.__name__, {}).get("properties", {}).items()
            if key not in ("name", "params")
        }
        choices = []
        for info in infos:
            if info.kind != kind:
                continue
            assert info.params is not None
            params_schema = info.params.model_json_schema(ref_template="#/$defs/{model}")
            for name, sub in params_schema.pop("$defs", {}).items():
                defs.setdefault(name, sub)
            choices.append(
                {
                    "type": "object",
                    "title": info.name,
                    "description": info.description,
                    "properties": {
                        "name": {"enum": sorted({info.name, info.qualified_name})},
                        "params": {**params_schema, "type": ["object", "null"]},  # null is the same as {}
                        **extra,
                    },
                    "required": ["name"],
                    "additionalProperties": False,
                }
            )
        if choices:
            defs[spec_type.__name__] = {"description": spec_type.__doc__, "anyOf": choices}
    return schema
