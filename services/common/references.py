"""The form of a model reference (`name`, `name:version` or an alias): one rule for the registry, which resolves
references, and the gateway, which refuses a malformed one before it asks anybody anything."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # versions and aliases
# The longest well-formed reference: a name, a colon and a version.
MAX_REFERENCE_CHARS = 128 + 1 + 64


def is_name(value: str) -> bool:
    return NAME_RE.fullmatch(value) is not None


def is_label(value: str) -> bool:
    return LABEL_RE.fullmatch(value) is not None


def check_reference(reference: str, field: str) -> str:
    """`reference` when it is `name:version`, an alias or a name; InvalidArgument naming `field` otherwise."""
    if not reference:
        raise InvalidArgument(field, "is required")
    if ":" in reference:
        name, _, version = reference.partition(":")
        well_formed = is_name(name) and is_label(version)
    else:
        well_formed = is_name(reference) or is_label(reference)
    if not well_formed:
        raise InvalidArgument(field, f"{reference!r} is not `name:version`, an alias or a name")
    return reference
