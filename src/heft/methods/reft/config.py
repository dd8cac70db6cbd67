"""Configuration of a representation-space stage (LoReFT / DiReFT)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_POSITIONS = re.compile(r"f([1-9]\d*)(?:\+l([1-9]\d*))?|l([1-9]\d*)")


def parse_positions(spec: str) -> tuple[int, int]:
    """`f7+l7` → (7, 7); `l1` → (0, 1); `f3` → (3, 0). The one definition of the syntax, for the
    config check and the interventions alike."""
    match = _POSITIONS.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"positions must look like f7, l1 or f7+l7 (counts of at least 1), got {spec!r}")
    first, last, last_only = match.groups()
    return int(first or 0), int(last or last_only or 0)


@dataclass
class ReftConfig:
    """Where and how hidden representations are edited.

    Interventions sit on the residual stream: the output of each chosen decoder layer, at the
    chosen prompt positions only (never padding, never target or generated tokens).
    """

    kind: str = "loreft"
    """`loreft`: h + R^T(W h + b - R h), R with orthonormal rows. `direft`: h + W2^T(W1 h + b)."""
    rank: int = 4
    """Rank r of the edit subspace."""
    layers: str | list[int] = "all"
    """Decoder layers to intervene on: `all`, a list of indices, or a range string `2:10` / `2:10:2`."""
    positions: str = "f7+l7"
    """Prompt positions: first-k (`f7`), last-k (`l1`), or both (`f7+l7`)."""
    share_weights: bool = False
    """Share one intervention between first and last positions of a layer (pyreft's `share_weights`)."""
    dropout: float = 0.0
    """Dropout on the edit term during training."""
    init: str = "identity"
    """`identity`: the edit is exactly zero at step 0 (LoReFT W = R, b = 0; DiReFT up-projection 0),
    so a refinement stage starts from the model it receives. `random`: pyreft's initialisation
    (W, b random), which perturbs the model before any training; kept for the paper's setting."""
