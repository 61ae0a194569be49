"""`edge-runtime serve`: the device's inference service (see docs/serve.md)."""
