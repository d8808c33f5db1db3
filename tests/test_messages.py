"""moetune/messages.py: the one-line messages moetune prints or raises for an exception it passes on."""

from __future__ import annotations

import shutil

from moetune.messages import os_error_line


def test_a_failed_tree_copy_is_one_line_naming_the_first_file():
    """shutil's copy of a tree (the demo model moved across file systems onto a full disk) raises one error holding
    every failed file: one line names the first and counts the rest."""
    failures = [("/tmp/a/model.safetensors", "out/demo-model/model.safetensors", "[Errno 28] No space left on device"),
                ("/tmp/a/config.json", "out/demo-model/config.json", "[Errno 28] No space left on device")]
    assert os_error_line(shutil.Error(failures)) == ("cannot write out/demo-model/model.safetensors: [Errno 28] No "
                                                      "space left on device (and 1 more)")
    assert os_error_line(shutil.Error(failures[:1])).endswith("left on device")
    assert os_error_line(OSError(28, "No space left on device", "x")) == "[Errno 28] No space left on device: 'x'"
