"""Champion / challenger: who serves which record, and when the evidence says who wins.

Routing is by consistent hashing of the record id (the same record always goes to the
same model, across processes and restarts), or optionally Thompson sampling on the
arms' Beta posteriors, seeded by the record id so it is reproducible too. The decision
is a two-sided two-proportion z-test on feedback outcomes, taken once both arms have
enough labelled records and the difference is significant.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np


def unit_hash(record_id: str, salt: str = "") -> float:
    h = hashlib.sha256(f"{salt}{record_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def route_hash(record_id: str, challenger_share: float) -> str:
    return "challenger" if unit_hash(record_id, "ab:") < challenger_share else "champion"


@dataclass
class Arm:
    successes: int = 0
    trials: int = 0

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else 0.0


def route_thompson(record_id: str, champion: Arm, challenger: Arm) -> str:
    """Sample each arm's Beta(1 + successes, 1 + failures); the higher draw serves."""
    rng = np.random.default_rng(int(unit_hash(record_id, "ts:") * 2**32))
    a = rng.beta(1 + champion.successes, 1 + champion.trials - champion.successes)
    b = rng.beta(1 + challenger.successes, 1 + challenger.trials - challenger.successes)
    return "challenger" if b > a else "champion"


def two_proportion_z(a: Arm, b: Arm) -> tuple[float, float]:
    """z and two-sided p-value for H0: rate(a) == rate(b)."""
    if not a.trials or not b.trials:
        return 0.0, 1.0
    pooled = (a.successes + b.successes) / (a.trials + b.trials)
    se = math.sqrt(pooled * (1 - pooled) * (1 / a.trials + 1 / b.trials))
    if se == 0:
        return 0.0, 1.0
    z = (b.rate - a.rate) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class Decision:
    winner: str | None  # champion | challenger | None (keep testing)
    z: float
    p_value: float
    champion: Arm
    challenger: Arm
    reason: str


def decide(champion: Arm, challenger: Arm, alpha: float = 0.05, min_samples: int = 100,
           max_samples: int = 2000) -> Decision:
    """Group-sequential test: the decision is re-checked after every feedback batch, so a plain
    z-test would find false winners by peeking. An O'Brien-Fleming boundary (Lan-DeMets
    approximation, z_crit = z_(1-alpha/2) / sqrt(t), t = labelled records / (2 x max_samples)) keeps the
    overall false-alarm rate near ``alpha``; at ``max_samples`` without a difference the
    champion stays."""
    from statistics import NormalDist

    z, p = two_proportion_z(champion, challenger)
    n = min(champion.trials, challenger.trials)
    if n < min_samples:
        return Decision(None, z, p, champion, challenger,
                        f"waiting for {min_samples} labelled records per arm ({champion.trials} / {challenger.trials})")
    t = min(1.0, (champion.trials + challenger.trials) / (2 * max_samples))  # information fraction
    z_crit = NormalDist().inv_cdf(1 - alpha / 2) / math.sqrt(t)
    if abs(z) < z_crit:
        if t >= 1.0:
            return Decision("champion", z, p, champion, challenger,
                            f"no significant difference after {champion.trials + challenger.trials} labelled "
                            "records: the champion stays")
        return Decision(None, z, p, champion, challenger,
                        f"no significant difference yet (z={z:+.2f}, boundary {z_crit:.2f} at t={t:.2f})")
    winner = "challenger" if z > 0 else "champion"
    return Decision(winner, z, p, champion, challenger,
                    f"{winner} wins: accuracy {challenger.rate:.3f} vs {champion.rate:.3f}, z={z:+.2f} "
                    f"(boundary {z_crit:.2f}), p={p:.4f}")
