from .helpers import checkpoint  # noqa: F401  (the session fixture for tests/models)
