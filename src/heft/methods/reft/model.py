"""Attach ReFT interventions to a causal LM with forward hooks on its decoder layers.

Positions are computed from a boolean *prompt mask* (B, T) with gather/scatter, so left- and
right-padded batches give the same edits and pad, target and generated tokens are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    prepared: dict[int, tuple[torch.Tensor, torch.Tensor, SlotWeights]] = field(default_factory=dict)
    """Per ReFT stage (by id), its positions and slot weights in the pass in flight: computed by the first
    layer that edits, used by all; emptied when the pass ends."""

    def active_mask(self, seq_len: int) -> torch.Tensor | None:
        if self.prompt_mask is None:
            return None
        if self.generation and self.forward_calls > 1 and seq_len == 1:
            return None  # incremental decoding step with a KV cache
        if seq_len < self.prompt_mask.shape[1]:
            return None
        return self.prompt_mask


@dataclass
class SlotWeights:
    """The edit at each (intervened layer, position slot) as (h downᵀ + bias) up, for all slots of a layer
    in two batched GEMMs: down and up (layers, slots, r, d), bias (layers, slots, 1, r)."""

    down: torch.Tensor
    bias: torch.Tensor
    up: torch.Tensor


class ReftModel(nn.Module):
    """The interventions of one ReFT stage, hooked onto the residual stream of chosen layers.

    Each layer edits its first-k and last-k prompt positions together: one gather, two batched GEMMs
    and one scatter-add per layer, the intervention of each position slot picked by `slot_weights`,
    which stacks every intervention's parameters once per forward pass (one Householder product for all
    rotations). At small batches a GPU step is bound by the number of ops it dispatches, not their size.
    """

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
            cls.zero_edits_(list(self.interventions.values()))
        slot_groups = ["shared"] * (self.first + self.last) if config.share_weights else []
        slot_groups = slot_groups or ["first"] * self.first + ["last"] * self.last
        keys = list(self.interventions)
        self.register_buffer(
            "slot_index",
            torch.tensor([keys.index(f"{layer}_{group}") for layer in self.layers for group in slot_groups]),
            persistent=False,
        )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def freeze_(self) -> None:
        """Freeze every intervention; LoReFT's R becomes a plain tensor (exact on save and load)."""
        modules = list(self.interventions.values())
        if isinstance(modules[0], LoReFT):
            LoReFT.freeze_rotations_(modules)
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

    def slot_weights(self) -> SlotWeights:
        """Every intervention's (down, bias, up) stacked and laid out per (layer, slot), in float32 whatever
        the autocast: the edits are small GEMMs, and LoReFT's identity start needs W − R exactly 0."""
        modules = list(self.interventions.values())
        with torch.autocast(self.slot_index.device.type, enabled=False):
            down, bias, up = type(modules[0]).stacked(modules)
        shape = (len(self.layers), -1)
        return SlotWeights(
            down[self.slot_index].view(*shape, *down.shape[1:]),
            bias[self.slot_index].view(*shape, 1, bias.shape[-1]),
            up[self.slot_index].view(*shape, *up.shape[1:]),
        )

    def _make_hook(self, layer: int, state: PositionState):
        def hook(module: nn.Module, args: tuple, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mask = state.active_mask(hidden.shape[1])
            if mask is None:
                return None
            if id(self) not in state.prepared:
                state.prepared[id(self)] = (
                    *intervention_positions(mask, self.first, self.last),
                    self.slot_weights(),
                )
            edited = self.edit(layer, hidden, *state.prepared[id(self)])
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    def edit(
        self,
        layer: int,
        hidden: torch.Tensor,
        index: torch.Tensor,
        valid: torch.Tensor,
        weights: SlotWeights | None = None,
    ) -> torch.Tensor:
        """Add layer `layer`'s edits at its slots (`index`, those `valid`): gather → (h downᵀ + bias) up for
        every slot at once → scatter_add (out of place). `weights`: this pass's `slot_weights()`."""
        weights = weights if weights is not None else self.slot_weights()
        position = self.layers.index(layer)
        gather_index = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.gather(1, gather_index).to(weights.down.dtype).transpose(0, 1)  # (slots, batch, d)
            edits = torch.baddbmm(weights.bias[position], h, weights.down[position].mT) @ weights.up[position]
            if self.training and self.config.dropout > 0:
                edits = torch.native_dropout(edits, self.config.dropout, True)[0]
            edits = edits * valid.mT.unsqueeze(-1)
        return hidden.scatter_add(1, gather_index, edits.transpose(0, 1).to(hidden.dtype))
