"""Model artifacts: the GGUF -> ONNX converter, the model manifest and the greedy reference loop.

Importing this package is cheap; torch and transformers load only inside the converter's build.
"""

from services.model.manifest import CONVERTER_VERSION, ManifestError, ModelManifest, ModelSource

__all__ = ["CONVERTER_VERSION", "ManifestError", "ModelManifest", "ModelSource"]
