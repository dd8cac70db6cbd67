"""The hierarchy: a base causal LM plus an ordered list of PEFT stages, trained one at a time.

Adding a stage freezes everything before it. A finished LoRA stage is merged into the base
weights (by default) so later stages run at base-model cost; ReFT stages stay as hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import peft
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Cache

from heft.config import StageConfig, blocked_merge, resolve_merge
from heft.fused_llama import fusable_layers, fused_decoder_layers
from heft.methods.lora import LoraAdapters, to_peft_config
from heft.methods.lora.fused import fused_lora_training
from heft.methods.reft import PositionState, ReftModel
from heft.models import LoadedModel, decoder_layers, hidden_size, load_model
from heft.quantize import QuantizeConfig
from heft.quantize import problems as quantize_problems
from heft.sharding import add_to_shards, is_sharded

SHORT_CPU_SEQUENCE = 128
"""Up to this many positions, training on the CPU runs SDPA's math kernel instead of its flash
kernel (see `attention_kernel`)."""


def attention_kernel(device: torch.device, width: int, keep_default: bool = False) -> contextlib.AbstractContextManager:
    """SDPA's math kernel for short sequences trained on the CPU, the default choice otherwise.

    The CPU flash kernel's backward has a high fixed cost: at the multiple-choice tasks' lengths
    (16 × 64, one thread) a LoReFT step ran 1.18× faster with the math kernel and a LoRA step
    1.04–1.11×, and the math kernel is as accurate in bf16 (same error against a float64
    reference). Without gradients (scoring) flash stays faster, as it is for training from about
    150 positions on (`docs/results/bench/README.md`, `profile-cpu.md`). `keep_default` under activation
    checkpointing, whose recompute in the backward pass runs outside this context and must take
    the kernel the forward took, and with compiled layers, whose graphs keep the kernel they were
    traced with whatever the width.
    """
    if device.type == "cpu" and width <= SHORT_CPU_SEQUENCE and torch.is_grad_enabled() and not keep_default:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


COMPILED_GRAPHS_LIMIT = 64
"""Compiled versions of the decoder layers' code kept at once (torch's default, 8, is reached by a
few stages or arms in one process, after which the layers silently run eagerly)."""


@dataclass
class Stage:
    """A stage of the hierarchy as it exists in the model."""

    index: int
    config: StageConfig
    trainable_params: int = 0
    finished: bool = False
    lora_state: dict[str, torch.Tensor] | None = None
    """Adapter weights captured when the stage finished (before any merge), for saving."""
    peft_config: peft.LoraConfig | None = field(default=None, repr=False)
    """The peft config the adapter was built with (saved as `adapter_config.json`)."""
    reft: ReftModel | None = field(default=None, repr=False)
    rolled_back: bool = False
    """The stage gate (`keep: if_better`) removed it: the model is as it was before the stage."""

    @property
    def name(self) -> str:
        return self.config.name or f"{self.index}-{self.config.method}"

    @property
    def adapter_name(self) -> str:
        return f"stage{self.index}"

    @property
    def merges(self) -> bool:
        """Whether finishing the stage folds its LoRA adapter into the base weights."""
        return bool(self.config.uses_lora and self.config.lora.merge)

    @property
    def merged(self) -> bool:
        return self.finished and self.merges and not self.rolled_back


@dataclass
class HeftOutput:
    loss: torch.Tensor | None
    hidden_states: torch.Tensor
    target_tokens: int


class HeftModel(nn.Module):
    """A causal LM with stacked LoRA/ReFT stages; `forward` returns a masked LM loss when given labels."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.weights_sha256 = loaded.weights_sha256
        self.quantize = loaded.quantize
        self.reft = nn.ModuleList()
        self.stages: list[Stage] = []
        self.positions = PositionState()
        self._lora = LoraAdapters()
        self._layers = decoder_layers(self.model)
        self.hidden_size = hidden_size(self.model)
        self.model.base_model.register_forward_pre_hook(self._count_forward)
        self.requires_grad_(False)
        self._head_bf16: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._frozen_bf16_active = False
        self._checkpointing = False
        self._compiled = False
        # eval mode, as from_pretrained leaves the model inside: a wrapper in train mode would switch
        # that model's dropout on at the next `train(was_training)`
        self.eval()

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: str = "float32", quantize: QuantizeConfig | None = None
    ) -> HeftModel:
        return cls(load_model(name_or_path, dtype, quantize))

    # ----------------------------------------------------------------- stages
    def add_stage(self, config: StageConfig, seed: int | None = None) -> Stage:
        """Freeze everything so far, then inject the new stage's trainable modules."""
        if self.stages and not self.stages[-1].finished:
            self.finish_stage()
        config = resolve_merge(config, self.quantize is not None)
        if seed is not None:
            torch.manual_seed(seed)
        self.requires_grad_(False)
        self._check_on_quantized_base(config)
        stage = Stage(index=len(self.stages), config=config)
        params: list[nn.Parameter] = []
        if config.uses_lora:
            stage.peft_config = to_peft_config(config.lora, self.model)
            params += self._lora.add(self.model, stage.adapter_name, stage.peft_config, config.lora.fast_dropout)
        if config.uses_reft:
            reft = ReftModel(config.reft, self.hidden_size, len(self._layers)).to(self.device)
            reft.attach(self._layers, self.positions)
            self.reft.append(reft)
            stage.reft = reft
            reft.requires_grad_(True)
            params += list(reft.parameters())
        stage.trainable_params = sum(p.numel() for p in params)
        self.stages.append(stage)
        return stage

    def check_stage(self, config: StageConfig) -> None:
        """Raise what `add_stage(config)` would raise on this model, changing nothing: a run checks every
        stage before the first one trains, not hours later when the bad one starts."""
        if config.uses_lora and isinstance(config.lora.target_modules, list):
            names = [n for n, _ in self.model.named_modules()]
            missing = [t for t in config.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
            if missing:
                linear = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
                )
                raise ValueError(
                    f"lora.target_modules {missing} match no module of this model (its linear layers: {linear})"
                )
        self._check_on_quantized_base(config)
        layers = config.lora.layers_to_transform if config.uses_lora else None
        if layers and not all(0 <= i < len(self._layers) for i in layers):
            raise ValueError(f"lora.layers_to_transform {layers}: this model has layers 0..{len(self._layers) - 1}")
        if config.uses_reft:
            with torch.random.fork_rng(devices=[]):  # a throwaway copy (small), leaving the RNG as it was
                ReftModel(config.reft, self.hidden_size, len(self._layers))

    def _check_on_quantized_base(self, config: StageConfig) -> None:
        """What the quantized base cannot do for this stage (e.g. DoRA over 8 bits), as a config would be refused."""
        if self.quantize is None or not config.uses_lora:
            return
        config = resolve_merge(config, quantized=True)
        merging, dora = [0] if config.lora.merge else [], [0] if config.lora.use_dora else []
        found = quantize_problems(self.quantize, self.device.type, merging, dora)
        if found:
            raise ValueError(f"{found[0].problem}; {found[0].hint}")

    def check_stages(self, configs: Sequence[StageConfig], first_index: int = 0) -> None:
        """`check_stage` for stages to be added in this order, plus what only finishing them would find:
        a LoRA stage cannot merge while an earlier adapter stays unmerged (peft merges them in order)."""
        configs = [resolve_merge(config, self.quantize is not None) for config in configs]
        for i, config in enumerate(configs, start=first_index):
            try:
                self.check_stage(config)
            except ValueError as err:
                raise ValueError(f"stage {i} ({config.method}): {err}") from err
        kept = any(s.config.uses_lora and not s.config.lora.merge and not s.rolled_back for s in self.stages)
        blocked = blocked_merge(configs, earlier_unmerged=kept)
        if blocked is not None:
            raise ValueError(
                f"stage {first_index + blocked} ({configs[blocked].method}): its LoRA adapter cannot merge while an "
                "earlier one stays unmerged; set lora.merge: false on it too, or true on the earlier LoRA stage"
            )

    def finish_stage(self) -> None:
        """Freeze the current stage; capture and (if configured) merge its LoRA adapter, fix its ReFT rotations."""
        stage = self.stages[-1]
        if stage.config.uses_lora:
            stage.lora_state = self._lora.state_dict(stage.adapter_name)
            if stage.config.lora.merge:
                self.model = self._merge(stage.adapter_name)
        if stage.reft is not None:
            stage.reft.freeze_()
        stage.finished = True
        self.requires_grad_(False)
        self.eval()

    def _merge(self, name: str) -> nn.Module:
        """Fold adapter `name` into the base weights; under FSDP into each process's rows of them
        (`heft.sharding.add_to_shards`), peft's merge writing into whole weights only."""
        if not is_sharded(self.model):
            return self._lora.merge(name)
        if self._lora.unmerged != [name]:
            raise ValueError(f"cannot merge LoRA stage {name!r} while earlier adapters stay unmerged")
        model, deltas = self._lora.unload_with_deltas()
        add_to_shards(model, deltas)
        return model

    def roll_back_stage(self) -> None:
        """Remove the unfinished last stage's modules without merging anything, so the model computes
        what it computed before the stage; the stage stays listed, marked rolled back."""
        stage = self.stages[-1]
        if stage.finished:
            raise ValueError(
                f"stage {stage.name} is finished (and maybe merged); only the training stage can be rolled back"
            )
        if stage.config.uses_lora:
            self.model = self._lora.discard(stage.adapter_name)
        if stage.reft is not None:
            stage.reft.detach()
            self.reft = nn.ModuleList([r for r in self.reft if r is not stage.reft])
            stage.reft = None
        stage.finished = stage.rolled_back = True
        self.requires_grad_(False)
        self.eval()

    def enable_activation_checkpointing(self) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations:
        about one more forward of compute for a fraction of the memory (what large GPU batches need).
        Non-reentrant checkpointing restores the RNG, so dropout masks and gradients are unchanged;
        ReFT's hooks stay outside the checkpoint (transformers checkpoints `forward`, not `__call__`)."""
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self._checkpointing = True

    @contextlib.contextmanager
    def compiled_layers(self, mode: str | None) -> Iterator[None]:
        """Run every decoder layer's `forward` through `torch.compile` while the block runs (`None`: eager).

        Per layer, because ReFT's interventions are forward hooks on the layers: they stay eager
        outside the compiled code. (transformers' activation checkpointing replaces the layers'
        `forward`, so it is traced inside.) The layers run the same code, so they share compiled
        graphs, their weights being inputs; shapes are dynamic, so new sequence lengths do not
        recompile. A new stage's adapters, the first layer's input (no gradient) and a dtype change
        (the bf16 copies) add graphs; all of them count against one limit per code object, raised
        here so that several stages and arms in one process stay compiled. Modules, parameters and
        state-dict keys are untouched; the layers' own `forward` is back on exit.
        """
        if mode is None:
            yield
            return
        layers = decoder_layers(self.model)
        options = {} if mode == "default" else {"mode": mode}
        saved = [layer.__dict__.get("forward") for layer in layers]
        try:
            with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS_LIMIT):
                for layer, own in zip(layers, saved):
                    layer.forward = torch.compile(own or type(layer).forward.__get__(layer), dynamic=True, **options)
                self._compiled = True
                yield
        finally:
            self._compiled = False
            for layer, own in zip(layers, saved):
                if own is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = own

    def merge_adapters(self) -> None:
        """Fold the LoRA adapters kept unmerged (`merge: false`) into the base weights, e.g. for export."""
        if self._lora.unmerged:  # not the stages' flags: a rolled-back stage is unmerged but left nothing
            self.model = self._lora.merge()

    def dequantize(self) -> None:
        """Replace a quantized base by its float values (in the loaded `dtype`) and add the unmerged LoRA
        updates in float32: nothing is requantized, so the weights are those the quantized model computed
        with (stages merged in training are already in them, rounded as they were then). For export;
        the model is a full-precision one afterwards."""
        if self.quantize is None:
            return
        deltas: dict[str, torch.Tensor] = {}
        if self._lora.unmerged:
            self.model, deltas = self._lora.unload_with_deltas()
        self.model = self.model.dequantize()
        for name, delta in deltas.items():
            weight = self.model.get_submodule(name).weight
            weight.data = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
        self.quantize = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def lora_state_dict(self, stage: Stage) -> dict[str, torch.Tensor]:
        """Adapter weights of a LoRA stage, finished (captured) or still training (live)."""
        return stage.lora_state if stage.lora_state is not None else self._lora.state_dict(stage.adapter_name)

    def load_lora_state_dict(self, stage: Stage, state: dict[str, torch.Tensor]) -> None:
        self._lora.load_state_dict(stage.adapter_name, state)

    # ---------------------------------------------------------------- compute
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def frozen_weights_bf16(self, enabled: bool = True) -> Iterator[None]:
        """Hold bf16 copies of the frozen float32 linear weights (decoder blocks and LM head) while
        the block runs, for forwards under bf16 autocast.

        Autocast casts a frozen float32 weight to bf16 at every forward (it caches only weights that
        require grad), which costs a read and a write of every weight per micro-batch. Casting once
        here computes exactly the same: autocast's cast and this one round identically, and the
        GEMMs then see the same bf16 tensors. The float32 tensors are kept and put back on exit, so
        merging, saving and exporting never see the copies; trainable parameters (LoRA A/B, ReFT)
        and optimizer state stay float32. DoRA's base weights are left alone (peft computes their
        column norms outside autocast). Inside the block, forwards must run under bf16 autocast.
        Re-entering while active does nothing.
        """
        if not enabled or self._frozen_bf16_active:
            yield
            return
        skip = {
            id(m.get_base_layer())
            for m in self.model.modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and getattr(m, "lora_variant", None)
        }
        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        head = self.model.get_output_embeddings()
        try:
            self._frozen_bf16_active = True
            for layer in decoder_layers(self.model):
                for name, module in layer.named_modules():
                    if not isinstance(module, nn.Linear) or "lora_" in name or id(module) in skip:
                        continue
                    for param in (module.weight, module.bias):
                        if (
                            param is not None
                            and param.dtype == torch.float32
                            and not param.requires_grad
                            and not isinstance(param, DTensor)  # FSDP's shard: it gathers its own storage
                        ):
                            swapped.append((param, param.data))
                            param.data = param.data.to(torch.bfloat16)
            if type(head) is nn.Linear and not any(
                p.requires_grad for p in head.parameters()
            ):  # not a peft-wrapped or trained head
                self._head_bf16 = (
                    head.weight.detach().to(torch.bfloat16),
                    None if head.bias is None else head.bias.detach().to(torch.bfloat16),
                )
            yield
        finally:
            for param, original in swapped:
                param.data = original
            self._head_bf16, self._frozen_bf16_active = None, False

    def _count_forward(self, module: nn.Module, args: tuple) -> None:
        self.positions.forward_calls += 1

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> HeftOutput:
        """Run the backbone with interventions at `prompt_mask` positions (default: all real tokens).

        With `labels` (-100 where no loss), the LM head is applied only at target positions.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_mask is None:
            prompt_mask = attention_mask.bool()
        # Right padding under a causal mask needs no padding mask: a real token attends only to positions
        # before it, all real, and nothing reads the padded positions' states (the loss skips them). Without
        # a 4-D mask SDPA may take its flash kernel, and transformers builds no mask.
        causal_only = labels is not None and right_padded(attention_mask)
        with (
            self._editing(prompt_mask),
            attention_kernel(input_ids.device, input_ids.shape[1], self._checkpointing or self._compiled),
            self._training_kernels(causal_only),
        ):
            hidden = self.model.base_model(
                input_ids=input_ids,
                attention_mask=None if causal_only else attention_mask,
                position_ids=None if causal_only else position_ids(attention_mask),
                use_cache=False,
            ).last_hidden_state
        if labels is None:
            return HeftOutput(None, hidden, 0)
        shift_labels = labels[:, 1:]
        selected = shift_labels != -100
        logits = self.lm_head(hidden[:, :-1][selected]).float()
        loss = F.cross_entropy(logits, shift_labels[selected], reduction="mean")
        return HeftOutput(loss, hidden, int(selected.sum()))

    @contextlib.contextmanager
    def _training_kernels(self, causal_only: bool) -> Iterator[None]:
        """For forwards with gradients in training mode: the training stage's LoRA layers as one autograd
        function each (`fused_lora_training`) and, for a causal batch (`causal_only`), Llama decoder layers
        in fewer ops (`fused_decoder_layers`). Neither under activation checkpointing, whose recompute runs
        outside this block and must repeat the forward's ops, nor in compiled layers (traced as they are)."""
        if not (self.training and torch.is_grad_enabled()) or self._checkpointing or self._compiled:
            yield
            return
        with contextlib.ExitStack() as stack:
            stage = self.stages[-1] if self.stages else None
            if stage is not None and not stage.finished and stage.config.uses_lora:
                stack.enter_context(
                    fused_lora_training(self._lora.layers.get(stage.adapter_name, ()), stage.adapter_name)
                )
            layers = decoder_layers(self.model)
            if causal_only and fusable_layers(layers):
                stack.enter_context(fused_decoder_layers(layers))
            yield

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        if (
            self._head_bf16 is not None
            and torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.bfloat16
        ):  # what autocast computes, without the cast
            return F.linear(hidden.to(torch.bfloat16), *self._head_bf16)
        return self.model.get_output_embeddings()(hidden)

    @torch.no_grad()
    def next_token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, V) of the token following each sequence's last real token."""
        return self.last_token_logprobs(self(input_ids, attention_mask).hidden_states, attention_mask)

    def last_token_logprobs(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, V) that `hidden` (B, T, H) gives the token after each row's last real one."""
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return torch.log_softmax(self.lm_head(final).float(), dim=-1)

    @torch.no_grad()
    def encode_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Cache]:
        """Hidden states and key/value cache of a prompt batch (either padding side), edited by every
        stage exactly as in training, where the interventions sit on prompt tokens only."""
        with self._editing(attention_mask.bool()):
            out = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=True,
            )
        return out.last_hidden_state, out.cache

    @torch.no_grad()
    def continue_prompts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """Hidden states of tokens appended to cached prompts (`attention_mask` spans cache + new
        tokens). No intervention runs: continuation tokens are never edited, in training either."""
        return self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        ).last_hidden_state

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        """HF `generate` with interventions on the prompt only. Batches must be left-padded."""
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left-padded batches (tokenizer.padding_side = 'left')")
        with self._editing(attention_mask.bool(), generation=True):
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @contextlib.contextmanager
    def _editing(self, prompt_mask: torch.Tensor, generation: bool = False) -> Iterator[None]:
        """The interventions edit the `prompt_mask` positions of the forward passes inside (with
        `generation`, those of HF generate's first pass, the prompt, only)."""
        self.positions.prompt_mask, self.positions.generation, self.positions.forward_calls = prompt_mask, generation, 0
        self.positions.prepared.clear()
        try:
            yield
        finally:
            self.positions.prompt_mask, self.positions.generation = None, False
            self.positions.prepared.clear()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row starts at 0 like a right-padded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is its real tokens followed by padding (or no padding at all)."""
    return bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(dim=1)
