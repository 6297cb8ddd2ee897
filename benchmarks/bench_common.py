"""A benchmark target of an issue, read off a measured value: what every bench script prints."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One line of the issue's targets: ``value`` compared with ``threshold``."""

    text: str
    value: float
    threshold: float
    at_least: bool  # True: value >= threshold passes; False: value <= threshold passes

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict}  {self.text}: {self.value:.4g} (target {sign} {self.threshold:g})"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (the architecture where there is none)."""
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(models, platform.machine())


def code_version() -> dict[str, object]:
    """Which ``machex`` was measured: its folder, and that folder's commit and dirty state."""
    import subprocess
    from pathlib import Path

    import machex

    package = Path(machex.__file__).resolve().parent

    def git(*arguments: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(package), *arguments], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):  # no git binary
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {
        "machex": str(package),
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_in_machex": bool(git("status", "--porcelain", "--", ".")),
    }
