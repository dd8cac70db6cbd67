"""Representation fine-tuning (LoReFT, DiReFT), implemented on forward hooks."""

from heft.methods.reft.config import ReftConfig
from heft.methods.reft.layer import INTERVENTIONS, DiReFT, LoReFT
from heft.methods.reft.model import PositionState, ReftModel, intervention_positions, parse_layers, parse_positions

__all__ = [
    "INTERVENTIONS",
    "DiReFT",
    "LoReFT",
    "PositionState",
    "ReftConfig",
    "ReftModel",
    "intervention_positions",
    "parse_layers",
    "parse_positions",
]
