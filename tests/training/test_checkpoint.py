"""Resume refuses a run whose settings would not continue the saved one (the CLI cases are in test_train_cli.py)."""

from __future__ import annotations

import os

import pytest
import torch

from moetune.training.checkpoint import RESUME_KEYS, load_checkpoint


def test_resume_refuses_another_optimizer(tmp_path):
    """AdamW and 8-bit AdamW states do not load into each other: a changed --optim is refused up front."""
    assert "optim" in RESUME_KEYS
    torch.save({"settings": {"optim": "adamw", "r": 16}}, os.path.join(tmp_path, "state.pt"))
    with pytest.raises(ValueError, match="was trained with --optim 'adamw', this run has 'adamw_8bit'"):
        load_checkpoint(str(tmp_path), None, None, None, {"optim": "adamw_8bit", "r": 16})
