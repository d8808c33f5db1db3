"""moetune: fast, memory-lean LoRA fine-tuning of Mixture-of-Experts LLMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moetune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from . import experts  # noqa: E402

__all__ = ["experts", "__version__"]
