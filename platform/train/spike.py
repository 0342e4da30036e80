"""Loss-spike and NaN policy: skip the update or stop the run, and log which loss term caused it.

Losses arrive already reduced over all ranks, so every rank takes the same decision.
"""

import json
import logging
import math
from dataclasses import dataclass

from bagel.platform.config import SpikeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpikeDecision:
    action: str  # "ok", "skip" or "stop"
    reason: str = ""  # e.g. "mse=nan is not finite", empty when ok


class TrainingDiverged(RuntimeError):
    """Exception raised when the spike policy stops the run; `bagel train` exits with ExitCode.DIVERGED."""


class SpikeMonitor:
    """Track a running mean per loss term and classify each step.

    A step is a spike when a term exceeds `factor` times its running mean once
    `warmup_steps` accepted steps have fed the means; a non-finite term or grad
    norm always counts. Skipped steps do not update the means.
    """

    def __init__(self, config: SpikeConfig) -> None:
        self.config = config
        self.means: dict[str, float] = {}
        self.accepted = 0
        self.consecutive = 0
        self.skipped_total = 0

    def check(self, step: int, terms: dict[str, float | None]) -> SpikeDecision:
        """Classify step `step` from its loss terms (None = absent term, e.g. "grad_norm" may be included)."""
        if self.config.policy == "off":
            return SpikeDecision("ok")
        reason = ""
        # The total is checked last: a NaN in ce or mse makes it NaN too, and the
        # reason should name the term that caused it.
        for name, value in sorted(terms.items(), key=lambda item: item[0] == "total"):
            if value is not None and not math.isfinite(value):
                reason = f"{name}={value} is not finite"
                break
        if not reason and self.accepted >= self.config.warmup_steps:
            worst = 0.0
            for name, value in terms.items():
                mean = self.means.get(name)
                if value is None or mean is None or mean <= 0 or name == "grad_norm":
                    continue
                ratio = value / mean
                if ratio > self.config.factor and ratio > worst:
                    worst = ratio
                    reason = f"{name}={value:.4g} is {ratio:.1f}x its running mean {mean:.4g}"
        if not reason:
            self._accept(terms)
            return SpikeDecision("ok")

        self.consecutive += 1
        self.skipped_total += 1
        if self.config.policy == "stop":
            return SpikeDecision("stop", reason)
        if self.consecutive >= self.config.max_consecutive:
            return SpikeDecision("stop", f"{reason}; {self.consecutive} consecutive steps skipped")
        return SpikeDecision("skip", reason)

    def _accept(self, terms: dict[str, float | None]) -> None:
        self.consecutive = 0
        self.accepted += 1
        decay = self.config.ema_decay
        for name, value in terms.items():
            if value is None:
                continue
            previous = self.means.get(name)
            self.means[name] = value if previous is None else decay * previous + (1 - decay) * value

    def state_dict(self) -> dict:
        # The means travel as one JSON string: DCP loads only the keys of the target's
        # state_dict, and a fresh monitor has no per-term keys yet.
        return {
            "means": json.dumps(self.means, sort_keys=True),
            "accepted": self.accepted,
            "consecutive": self.consecutive,
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict) -> None:
        means = state.get("means", {})
        self.means = {name: float(value) for name, value in (json.loads(means) if isinstance(means, str) else means).items()}
        self.accepted = int(state.get("accepted", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
