from .helpers import checkpoint, varlen_op_on_cpu  # noqa: F401  (the session fixtures for tests/models)
