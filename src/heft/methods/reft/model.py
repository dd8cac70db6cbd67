"""Attach ReFT interventions to a causal LM with forward hooks on its decoder layers.

Positions are computed from a boolean *prompt mask* (B, T) with gather/scatter, so left- and
right-padded batches give the same edits and pad, target and generated tokens are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from heft.methods.reft.config import ReftConfig, parse_positions
from heft.methods.reft.layer import INTERVENTIONS, LoReFT


def parse_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """`all`, a list of indices (negative allowed) or a `start:stop[:step]` range → sorted indices."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        try:
            layers = list(range(num_layers))[slice(*(int(p) if p else None for p in spec.split(":")))]
        except ValueError as err:
            raise ValueError(f"layers must be 'all', a list or 'start:stop[:step]', got {spec!r}") from err
    else:
        layers = [i % num_layers if -num_layers <= i < num_layers else i for i in spec]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"layers {spec!r} select {layers or 'nothing'}; the model has {num_layers} layers")
    return sorted(set(layers))


def intervention_positions(prompt_mask: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, first+last) of the first-k and last-k prompt tokens, and which of them exist.

    The prompt is the contiguous run of True in `prompt_mask` (wherever padding puts it). When a
    prompt is shorter than k, the missing slots are marked invalid; first and last slots may
    overlap on short prompts, and each then contributes its own edit (computed from the same h).
    """
    mask = prompt_mask.bool()
    length = mask.sum(dim=1, keepdim=True)
    start = mask.int().argmax(dim=1, keepdim=True)
    device = mask.device
    offsets_first = torch.arange(first, device=device).unsqueeze(0)
    offsets_last = torch.arange(last, device=device).unsqueeze(0) + length - last
    offsets = torch.cat([offsets_first.expand(mask.shape[0], -1), offsets_last], dim=1)
    valid = (offsets >= 0) & (offsets < length)
    index = torch.where(valid, start + offsets, start).clamp(max=mask.shape[1] - 1)
    return index, valid


@dataclass
class PositionState:
    """Prompt mask of the forward pass in flight, shared by every ReFT stage of a model.

    In generation only the first forward (the prompt) is edited; later incremental steps see
    one new token each and are left alone, as are generated tokens.
    """

    prompt_mask: torch.Tensor | None = None
    generation: bool = False
    forward_calls: int = 0

    def active_mask(self, seq_len: int) -> torch.Tensor | None:
        if self.prompt_mask is None:
            return None
        if self.generation and self.forward_calls > 1 and seq_len == 1:
            return None  # incremental decoding step with a KV cache
        if seq_len < self.prompt_mask.shape[1]:
            return None
        return self.prompt_mask


class ReftModel(nn.Module):
    """The interventions of one ReFT stage, hooked onto the residual stream of chosen layers."""

    def __init__(self, config: ReftConfig, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.layers = parse_layers(config.layers, num_layers)
        self.first, self.last = parse_positions(config.positions)
        cls = INTERVENTIONS[config.kind]
        groups = (
            ["shared"] if config.share_weights else [g for g, k in (("first", self.first), ("last", self.last)) if k]
        )
        self.interventions = nn.ModuleDict(
            {
                f"{layer}_{group}": cls(hidden_size, config.rank, config.dropout)
                for layer in self.layers
                for group in groups
            }
        )
        if config.init == "identity":
            for intervention in self.interventions.values():
                intervention.zero_edit_()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def freeze_(self) -> None:
        """Freeze every intervention; LoReFT's R becomes a plain tensor (exact on save and load)."""
        for intervention in self.interventions.values():
            if isinstance(intervention, LoReFT):
                intervention.freeze_rotation_()
        self.requires_grad_(False)

    def attach(self, decoder_layers: nn.ModuleList, state: PositionState) -> None:
        """Register one forward hook per intervened layer; they read positions from `state`."""
        self.detach()
        for layer in self.layers:
            hook = self._make_hook(layer, state)
            self._handles.append(decoder_layers[layer].register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _positions(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] is not mask:
            self._cache = (mask, *intervention_positions(mask, self.first, self.last))
        return self._cache[1], self._cache[2]

    def _make_hook(self, layer: int, state: PositionState):
        def hook(module: nn.Module, args: tuple, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mask = state.active_mask(hidden.shape[1])
            if mask is None:
                return None
            edited = self.edit(layer, hidden, *self._positions(mask))
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    def edit(self, layer: int, hidden: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Add each intervention's edit at its positions: gather → edit → scatter_add (out of place)."""
        gather_index = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        selected = hidden.gather(1, gather_index)
        if self.config.share_weights:
            deltas = self._delta(f"{layer}_shared", selected)
        else:
            parts = []
            if self.first:
                parts.append(self._delta(f"{layer}_first", selected[:, : self.first]))
            if self.last:
                parts.append(self._delta(f"{layer}_last", selected[:, self.first :]))
            deltas = torch.cat(parts, dim=1)
        deltas = deltas * valid.unsqueeze(-1).to(deltas.dtype)
        return hidden.scatter_add(1, gather_index, deltas.to(hidden.dtype))

    def _delta(self, key: str, h: torch.Tensor) -> torch.Tensor:
        module = self.interventions[key]
        weight_dtype = next(module.parameters()).dtype
        return module(h.to(weight_dtype))
