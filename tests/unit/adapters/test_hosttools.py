"""executor.adapters.hosttools: host tools run as subprocesses, their failures as project errors."""

from __future__ import annotations

import pytest

from executor.adapters import hosttools
from executor.errors import ImageBuildError


def test_a_failing_tool_is_an_image_build_error_with_its_stderr_tail():
    with pytest.raises(ImageBuildError) as info:
        hosttools.run_tool(["sh", "-c", "echo first >&2; echo last words >&2; exit 3"], what="the step")
    message = str(info.value)
    assert message.startswith("the step failed (exit 3):") and message.endswith("first\nlast words")


def test_a_missing_tool_is_an_image_build_error_too():
    with pytest.raises(ImageBuildError, match="cannot start /nonexistent/tool"):
        hosttools.run_tool(["/nonexistent/tool"], what="x")


def test_captured_output_is_returned():
    assert hosttools.run_tool(["sh", "-c", "echo out; echo err >&2"], what="x", capture=True) == "out\n"


def test_safe_rmtree_removes_a_tree_without_mounts(tmp_path):
    (tmp_path / "build/a/b").mkdir(parents=True)
    (tmp_path / "build/a/b/f").write_text("x")
    hosttools.safe_rmtree(tmp_path / "build")
    assert not (tmp_path / "build").exists()
    hosttools.safe_rmtree(tmp_path / "build")  # nothing there: nothing to do
