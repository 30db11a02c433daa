"""lmesh-policy: API keys, principals and model authorization."""
