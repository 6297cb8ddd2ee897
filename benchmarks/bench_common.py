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
