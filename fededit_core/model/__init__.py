"""The model: loading (embedded GGUF, folders, hub ids), architecture families, fingerprint, tokens, forward hooks."""
