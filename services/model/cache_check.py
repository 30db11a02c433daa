"""Exit 0 when DIR holds a complete, current model build (no torch, no GGUF needed): `make model`'s fast path.

usage: python -m services.model.cache_check DIR [--int8]
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.model.manifest import CONVERTER_VERSION, ManifestError, ModelManifest


def is_cached(model_dir: Path, *, int8: bool = False) -> bool:
    variants = [False, True] if int8 else [False]
    for variant in variants:
        try:
            manifest = ModelManifest.load(model_dir, int8=variant)
        except ManifestError:
            return False
        if manifest.converter_version != CONVERTER_VERSION:
            return False
        if not (manifest.model_path(model_dir).is_file() and manifest.tokenizer_path(model_dir).is_file()):
            return False
    return True


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if is_cached(Path(argv[0]), int8="--int8" in argv[1:]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
