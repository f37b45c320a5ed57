"""Keyword arguments -> the fields of a SWIG params struct.

The field list is never written here: it is whatever the SWIG proxy of pyr_engine_params /
pyr_session_params exposes (pyramid.i hides struct_size and reserved fields), so a field
added to include/pyramid.h becomes a keyword argument on the next build.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple


def field_names(struct_type: type) -> Tuple[str, ...]:
    """The settable fields of a SWIG struct proxy, in declaration order."""
    return tuple(
        name
        for name, attr in vars(struct_type).items()
        if isinstance(attr, property) and attr.fset is not None and name != "thisown"
    )


def fill(struct: Any, values: Dict[str, Any], what: str) -> Any:
    """Sets each value on the struct by name; TypeError for a name the struct lacks."""
    known = field_names(type(struct))
    for name, value in values.items():
        if name not in known:
            raise TypeError(f"unknown {what} parameter {name!r} (known: {', '.join(known)})")
        setattr(struct, name, value)
    return struct


def as_dict(struct: Any) -> Dict[str, Any]:
    return {name: getattr(struct, name) for name in field_names(type(struct))}
