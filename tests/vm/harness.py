"""The gitlab-runner simulator, for vm tests (it lives in the package for the demo command)."""

from executor.runnersim import RunnerSim, StageResult, kill_group, runner_script, terminate_like_runner

__all__ = ["RunnerSim", "StageResult", "kill_group", "runner_script", "terminate_like_runner"]
