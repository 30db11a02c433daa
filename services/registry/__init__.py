"""lmesh-registry: model versions, aliases and their artifacts (SQLite plus content-addressed blobs)."""
