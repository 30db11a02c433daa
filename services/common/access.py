"""Which models and mesh tools an API key's patterns allow: one rule for the policy service (Authorize, key
grants) and the gateway (ListModels, tool calls), so what a key is shown is exactly what it may use."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

# A mesh tool's name (a gRPC service registered in Consul with the tag `lmesh-tool`).
TOOL_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,47}")
# An entry of a key's tool grant: a tool name, or a glob of the same characters with `*` and `?` (no `[...]`
# classes, whose fnmatch meaning would surprise an operator).
TOOL_GRANT_PATTERN = re.compile(r"[a-z0-9_*?]{1,48}")


def reference_allowed(patterns: Sequence[str], reference: str) -> bool:
    """Whether `reference` (a name, `name:version` or an alias) matches one of the references or globs.

    A pattern also matches a versioned reference through its name: allowing `smollm2` allows `smollm2:3`, while
    allowing `smollm2:1` allows only that version. No patterns allow everything.
    """
    if not patterns:
        return True
    name = reference.split(":", 1)[0]
    return any(fnmatch.fnmatchcase(reference, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def version_allowed(patterns: Sequence[str], name_version: str, aliases: Sequence[str] = ()) -> bool:
    """Whether a concrete model version (`name:version`, with its aliases) is allowed: its name, `name:version`
    or one of its aliases must match, so an alias grants no more and no less than the model behind it."""
    return any(reference_allowed(patterns, n) for n in (name_version, *aliases))


def tool_allowed(patterns: Sequence[str], tool_name: str) -> bool:
    """Whether a key whose tool grant is `patterns` may call the mesh tool `tool_name`.

    Deny by default, unlike models: no patterns allow no tool. A pattern matches the whole name, fnmatch-style
    (`*` any run of characters, `?` one), case-sensitively. A name that is not a valid tool name is never
    allowed, whatever the patterns (`*` included), so a malformed name cannot slip through a wildcard.
    """
    if not patterns or not TOOL_NAME_PATTERN.fullmatch(tool_name):
        return False
    return any(fnmatch.fnmatchcase(tool_name, p) for p in patterns)
