"""The training loop's own pieces (the CLI runs of it are in test_train_cli.py)."""

from __future__ import annotations

import gc
import weakref

from moetune.training import loop
from moetune.training.metrics import MetricsLog

from .helpers import run_cli


def test_collector_frozen_holds_what_is_alive_and_lets_go_after():
    before = gc.get_freeze_count()
    alive = [[i] for i in range(1000)]  # tracked containers, alive when the block starts
    with loop.collector_frozen():
        assert gc.get_freeze_count() >= before + len(alive)
        made_inside = {"x": []}  # objects made in the block stay collectable
        assert gc.is_tracked(made_inside)
    assert gc.get_freeze_count() == 0


def test_collector_frozen_unfreezes_on_error():
    try:
        with loop.collector_frozen():
            raise RuntimeError("a failed step")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0


def test_collector_frozen_lets_the_blocks_cycles_go_when_the_process_had_frozen_objects():
    """A process that starts with frozen objects (the lent GPU machines' Python: 375): the objects frozen by the
    block must still be collectable after it, or a deleted model's cycles keep their GPU memory (run 53)."""

    class Node:  # a reference cycle, as a model's modules and hooks make
        def __init__(self):
            self.me = self

    gc.freeze()  # someone else's freeze, before the block
    try:
        model = Node()
        gone = weakref.ref(model)
        with loop.collector_frozen():
            pass
        del model
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


def test_a_nested_collector_frozen_block_leaves_the_freeze_to_the_outer_one():
    with loop.collector_frozen():
        frozen = gc.get_freeze_count()
        with loop.collector_frozen():
            pass
        assert gc.get_freeze_count() == frozen  # still frozen for the rest of the outer block
    assert gc.get_freeze_count() == 0


def test_the_training_steps_run_with_the_collector_frozen(tmp_path, capsys, monkeypatch):
    frozen_at_write = []
    write = MetricsLog.write

    def recording_write(self, row):
        frozen_at_write.append(gc.get_freeze_count())
        return write(self, row)

    monkeypatch.setattr(MetricsLog, "write", recording_write)
    code, _, stderr = run_cli(capsys, "train", "--output-dir", tmp_path / "out", "--max-steps", 2)
    assert code == 0, stderr
    assert len(frozen_at_write) == 2 and all(n > 0 for n in frozen_at_write)
    assert gc.get_freeze_count() == 0
