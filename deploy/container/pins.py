"""The image's pinned wheels, from a `pip install --dry-run --report` that ran under another Python than the image's.

pip's --python-version chooses wheels for the image's Python but evaluates markers with the running interpreter's
full version, so a dependency such as redis' `async-timeout; python_full_version < "3.11.3"` is left out when this
machine's Python is newer than the image's. This re-evaluates every resolved requirement for the image's version,
writes the pins, and prints the requirements still missing (one a line; none when the resolution is complete) for
build.sh to add to the next resolution.

usage: python pins.py REPORT_JSON IMAGE_PYTHON_VERSION PINS_OUT
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # an interpreter without packaging still has pip's copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_requirements(report: dict, image_python: str) -> list[str]:
    """Requirements of the resolved distributions that hold on the image's Python and that the resolution does not
    satisfy, without their markers."""
    environment = {**default_environment(), "python_full_version": image_python,
                   "implementation_version": image_python,
                   "python_version": ".".join(image_python.split(".")[:2])}
    resolved = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    missing = []
    for item in report["install"]:
        extras = ["", *item.get("requested_extras", [])]
        for text in item["metadata"].get("requires_dist", []):
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({**environment, "extra": e}) for e in extras):
                continue
            version = resolved.get(canonical(requirement.name))
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                requirement.marker = None
                missing.append(str(requirement))
    return sorted(set(missing))


def main(argv: list[str]) -> int:
    report_path, image_python, pins_path = argv
    report = json.loads(Path(report_path).read_text())
    pins = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}" for item in report["install"]
                  if canonical(item["metadata"]["name"]) != "lmesh")
    Path(pins_path).write_text("\n".join(pins) + "\n")
    for requirement in missing_requirements(report, image_python):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
