"""Exit 0 when DIR holds a complete, current model build (no torch, no GGUF needed): `make model`'s fast path.

usage: python -m services.model.cache_check DIR [--int8] [--fp16]
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.model.convert import cached_build


def is_cached(model_dir: Path, variants: list[str]) -> bool:
    return all(cached_build(model_dir, None, variant=variant) is not None for variant in ["", *variants])


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    variants = [v for v in ("int8", "fp16") if f"--{v}" in argv[1:]]
    return 0 if is_cached(Path(argv[0]), variants) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
