"""lmesh-embeddings: sentence embeddings (all-MiniLM-L6-v2 on ONNX Runtime) for tool retrieval and clients."""
