"""moetune: fast, memory-lean LoRA fine-tuning of Mixture-of-Experts LLMs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moetune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from . import experts  # noqa: E402

__all__ = ["experts", "FastMoEModel", "merge", "__version__"]


def __getattr__(name):
    # Lazy: these import transformers and peft (seconds); `import moetune` and moetune.experts stay light.
    if name == "FastMoEModel":
        from .fast_model import FastMoEModel

        return FastMoEModel
    if name == "merge":
        from .adapters import merge

        return merge
    raise AttributeError(f"module 'moetune' has no attribute {name!r}")
