"""lmesh-tokenizer: text to token ids and back, for every registered model."""
