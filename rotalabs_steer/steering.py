"""Steering at inference: add (or ablate) vectors at the output of decoder blocks.

Positions stay right under ``model.generate`` with a KV cache: a pre-hook on the module
that runs the blocks reads each forward's attention mask and cache length, so every hook
knows which of the tokens it sees are real (left padding is never steered), which are
the prompt and which were generated. Strength 0 leaves outputs bit-identical, and on
exit (also after an error) every hook is gone.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping

import torch
from torch import nn

from .layers import DecoderBlocks, find_decoder_blocks, hidden_size_of
from .model_control import HookSet, block_output, real_token_index, with_block_output
from .validation import check_choice, check_strength, layer_in_range
from .vectors import SteeringVector, SteeringVectorSet

InjectionMode = Literal["all", "last", "first"]
ApplyTo = Literal["both", "prompt", "generated"]
Operator = Literal["add", "ablate"]

INJECTION_MODES = ("all", "last", "first")
APPLY_TO = ("both", "prompt", "generated")
OPERATORS = ("add", "ablate")


class _ForwardStep:
    """What the current forward feeds the blocks: which new tokens are real, prompt or not."""

    def __init__(self) -> None:
        self.real: torch.Tensor | None = None  # [batch, new] bool, None = all real
        self.is_prompt = True

    def read(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = ids if isinstance(ids, torch.Tensor) else embeds
        new = int(source.shape[1]) if isinstance(source, torch.Tensor) and source.ndim >= 2 else None
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5
        past = 0
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and new is not None:
            past = int(mask.shape[1]) - new
            self.real = mask[:, -new:].bool()
        else:
            self.real = None
            if cache is not None and hasattr(cache, "get_seq_length"):
                past = int(cache.get_seq_length())
        self.is_prompt = past == 0


class _SteeringTerm:
    """One vector at one block, with a strength read at call time."""

    def __init__(self, vector: SteeringVector, strength_of) -> None:
        self.vector = vector.vector.detach()
        self.strength_of = strength_of
        self._placed: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._placed:
            self._placed[key] = self.vector.to(device=like.device, dtype=like.dtype)
        return self._placed[key]


class _BlockSteerer:
    """The forward hook on one block: applies its terms at the selected positions."""

    def __init__(self, terms: list[_SteeringTerm], step: _ForwardStep, mode: str, apply_to: str,
                 operator: str, keep_norm: bool) -> None:
        self.terms, self.step = terms, step
        self.mode, self.apply_to, self.operator, self.keep_norm = mode, apply_to, operator, keep_norm

    def positions(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[batch, seq] bool of positions to steer; None means every position."""
        step = self.step
        if (self.apply_to == "prompt" and not step.is_prompt) or (
            self.apply_to == "generated" and step.is_prompt
        ):
            return torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        real = step.real
        if real is not None and real.shape != hidden.shape[:2]:
            real = None  # a forward we did not see (e.g. the base model called directly)
        if self.mode == "all":
            return None if real is None or bool(real.all()) else real.to(hidden.device)
        seq = hidden.shape[1]
        if real is None:
            real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        real = real.to(hidden.device)
        if self.mode == "first" and not step.is_prompt:  # the row's first real token is in the prompt
            return torch.zeros_like(real)
        order = torch.arange(seq, device=hidden.device).expand_as(real)
        return order == real_token_index(real, self.mode)[:, None]

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        strengths = [term.strength_of() for term in self.terms]
        if all(s == 0.0 for s in strengths):
            return None  # untouched: bit-identical outputs
        hidden = block_output(output)
        steered = hidden
        for term, strength in zip(self.terms, strengths):
            if strength == 0.0:
                continue
            direction = term.on(hidden)
            if self.operator == "add":
                steered = steered + strength * direction
            else:
                unit = direction / direction.norm()
                steered = steered - strength * (steered @ unit)[..., None] * unit
        if self.keep_norm:
            scale = hidden.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            steered = steered * scale
        where = self.positions(hidden)
        if where is not None:
            steered = torch.where(where[..., None], steered, hidden)
        return with_block_output(output, steered)


class _InjectorBase:
    """Shared attach/detach/context-manager machinery."""

    def __init__(self, model: nn.Module, injection_mode: str, apply_to: str, operator: str,
                 keep_norm: bool, layer_modules) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.injection_mode = check_choice(injection_mode, INJECTION_MODES, "injection_mode")
        self.apply_to = check_choice(apply_to, APPLY_TO, "apply_to")
        self.operator = check_choice(operator, OPERATORS, "operator")
        self.keep_norm = bool(keep_norm)
        self._blocks: DecoderBlocks = find_decoder_blocks(model, layer_modules)
        self._hidden = hidden_size_of(model)
        self._step = _ForwardStep()
        self._hooks: HookSet | None = None

    def _check_vector(self, vector: Any, where: str) -> SteeringVector:
        if not isinstance(vector, SteeringVector):
            raise TypeError(f"{where} must be a SteeringVector, not {type(vector).__name__}")
        layer_in_range(vector.layer_index, len(self._blocks), where)
        if not vector.vector.is_floating_point():
            raise TypeError(f"{where}: vector must be a floating-point tensor, not {vector.vector.dtype}")
        if vector.vector.device.type == "meta":
            raise ValueError(f"{where}: vector is on the 'meta' device (no data); load or compute it first")
        if vector.dim != self._hidden:
            raise ValueError(f"{where}: vector has {vector.dim} dimensions but the model's hidden size is {self._hidden}")
        if not torch.isfinite(vector.vector).all():
            raise ValueError(f"{where}: vector contains NaN or inf")
        if self.operator == "ablate" and vector.norm == 0.0:
            raise ValueError(f"{where}: cannot ablate a zero vector")
        return vector

    def _terms_by_layer(self) -> dict[int, list[_SteeringTerm]]:
        raise NotImplementedError

    def _step_owner(self) -> nn.Module:
        """The module whose forward runs the blocks (sees the mask and the cache)."""
        if self._blocks.path and "." in self._blocks.path:
            return self.model.get_submodule(self._blocks.path.rsplit(".", 1)[0])
        return self.model

    @property
    def is_attached(self) -> bool:
        return self._hooks is not None and self._hooks.attached

    def attach(self):
        """Register the hooks (idempotent)."""
        if self.is_attached:
            return self
        n = len(self._blocks)
        steerers = [
            (self._blocks.modules[layer % n],
             _BlockSteerer(terms, self._step, self.injection_mode, self.apply_to, self.operator, self.keep_norm))
            for layer, terms in self._terms_by_layer().items()
        ]
        # Prepended: the steered output is what every other hook on the block sees, as the
        # next block does. transformers 5 puts permanent output-capturing hooks on decoder
        # blocks the first time a model runs with output_hidden_states=True; appended after
        # those, steering would be missing from the hidden_states it reports.
        self._hooks = HookSet(steerers, prepend=True, pre_hooks=[(self._step_owner(), self._step.read)])
        self._hooks.attach()
        return self

    def detach(self) -> None:
        """Remove every hook this injector registered."""
        if self._hooks is not None:
            self._hooks.remove()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()


class ActivationInjector(_InjectorBase):
    """Add ``strength`` × vector at the output of each vector's block.

    Args:
        model: the HuggingFace model to steer.
        vectors: SteeringVectors (one per layer), or a SteeringVectorSet.
        strength: multiplier; 0 leaves the model's outputs bit-identical. Mutable.
        injection_mode: ``"all"`` real tokens, the ``"last"`` real token of each forward (so
            every generated token, as in the reference), or the ``"first"`` real token.
        apply_to: ``"both"``, ``"prompt"`` only, or ``"generated"`` tokens only.
        operator: ``"add"`` the vector, or ``"ablate"`` its direction (project it out;
            strength 1 removes it entirely).
        keep_norm: rescale each steered position back to its original norm.
        layer_modules: override block discovery, as in extraction.
    """

    def __init__(self, model: nn.Module, vectors: Iterable[SteeringVector] | SteeringVectorSet,
                 strength: float = 1.0, injection_mode: InjectionMode = "all", *, apply_to: ApplyTo = "both",
                 operator: Operator = "add", keep_norm: bool = False, layer_modules=None) -> None:
        super().__init__(model, injection_mode, apply_to, operator, keep_norm, layer_modules)
        if isinstance(vectors, SteeringVector):
            vectors = [vectors]
        if isinstance(vectors, (str, bytes, torch.Tensor)) or not isinstance(vectors, Iterable):
            raise TypeError("vectors must be a SteeringVector, a list of them or a SteeringVectorSet, "
                            f"not {type(vectors).__name__}")
        vector_list = list(vectors)
        if not vector_list:
            raise ValueError("vectors is empty; pass at least one SteeringVector")
        n = len(self._blocks)
        self._vectors: dict[int, SteeringVector] = {}
        for i, vector in enumerate(vector_list):
            self._check_vector(vector, f"vectors[{i}]")
            layer = vector.layer_index % n
            if layer in self._vectors:
                raise ValueError(f"vectors: two vectors for layer {layer}; combine them or use MultiVectorInjector")
            self._vectors[layer] = vector
        self._strength = check_strength(strength)

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        self._strength = check_strength(value)

    def _terms_by_layer(self) -> dict[int, list[_SteeringTerm]]:
        return {layer: [_SteeringTerm(v, lambda: self._strength)] for layer, v in self._vectors.items()}


class MultiVectorInjector(_InjectorBase):
    """Several behaviours at once, each with its own strength.

    Each set contributes its vector at ``default_layer`` (sets without one are skipped),
    or its ``get_best()`` vector when ``default_layer`` is None, as in the reference.
    """

    def __init__(self, model: nn.Module, vector_sets: Mapping[str, SteeringVectorSet],
                 strengths: Mapping[str, float] | None = None, injection_mode: InjectionMode = "all",
                 default_layer: int | None = None, *, apply_to: ApplyTo = "both", operator: Operator = "add",
                 keep_norm: bool = False, layer_modules=None) -> None:
        super().__init__(model, injection_mode, apply_to, operator, keep_norm, layer_modules)
        if not isinstance(vector_sets, Mapping):
            raise TypeError("vector_sets must be a dict of behavior -> SteeringVectorSet")
        if strengths is not None and not isinstance(strengths, Mapping):
            raise TypeError(f"strengths must be a dict of behavior -> float, not {type(strengths).__name__}")
        if default_layer is not None:
            layer_in_range(default_layer, len(self._blocks), "default_layer")
        self.vector_sets = dict(vector_sets)
        self.default_layer = default_layer
        self._strengths = {name: 1.0 for name in self.vector_sets}
        for name, value in (strengths or {}).items():
            if name not in self.vector_sets:
                raise KeyError(f"strengths names {name!r}, which is not in vector_sets")
            self._strengths[name] = check_strength(value, f"strengths[{name!r}]")
        self._chosen: dict[str, SteeringVector] = {}
        for name, vector_set in self.vector_sets.items():
            if not isinstance(vector_set, SteeringVectorSet):
                raise TypeError(f"vector_sets[{name!r}] must be a SteeringVectorSet")
            vector = vector_set.get(default_layer) if default_layer is not None else (
                vector_set.get_best() if len(vector_set) else None)
            if vector is not None:
                self._chosen[name] = self._check_vector(vector, f"vector_sets[{name!r}]")

    def set_strength(self, behavior: str, strength: float) -> None:
        if behavior not in self._strengths:
            raise KeyError(f"no such behavior: {behavior!r}")
        self._strengths[behavior] = check_strength(strength)

    def get_strength(self, behavior: str) -> float:
        return self._strengths.get(behavior, 0.0)

    def _terms_by_layer(self) -> dict[int, list[_SteeringTerm]]:
        n = len(self._blocks)
        terms: dict[int, list[_SteeringTerm]] = {}
        for name, vector in self._chosen.items():
            terms.setdefault(vector.layer_index % n, []).append(
                _SteeringTerm(vector, lambda name=name: self._strengths[name]))
        return terms
