"""Which models an API key's patterns allow: one rule for the policy service (Authorize) and the gateway
(ListModels), so what a key is shown is exactly what it may use."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence


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
