"""Exit 0 when DIR holds a complete, current model build (no torch, no GGUF needed): `make model`'s fast path.

usage: python -m services.model.cache_check DIR [--int8]
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.model.convert import cached_build


def is_cached(model_dir: Path, *, int8: bool = False) -> bool:
    variants = [False, True] if int8 else [False]
    return all(cached_build(model_dir, None, int8=variant) is not None for variant in variants)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if is_cached(Path(argv[0]), int8="--int8" in argv[1:]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
