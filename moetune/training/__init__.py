"""`moetune train`: configuration, data, the training loop, checkpoints, metrics and plots."""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, console=None) -> dict:
    """Validate the inputs, fine-tune, write the outputs into config.output_dir; returns the run summary."""
    from .loop import train as _train  # lazy: imports transformers and peft

    return _train(config, console)
