"""Steering at inference: add, ablate or clamp vectors at the output of decoder blocks.

Positions stay right under ``model.generate`` with a KV cache: a pre-hook on the module
that runs the blocks reads each forward's attention mask and cache length, so every hook
knows which of the tokens it sees are real (left padding is never steered), which are
the prompt and which were generated. Strength 0 leaves outputs bit-identical, and on
exit (also after an error) every hook is gone.

Tuning: a strength per batch row (compare strengths in one ``generate``), a
``SteeringCondition`` that steers only the rows whose prompt activates a condition vector
(decided per row on the prompt, kept for the whole generation), and ``relative=True``
strengths in units of the layer's mean activation norm, which mean the same at every layer
and model.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

import torch
from torch import nn

from .conditions import SteeringCondition
from .layers import DecoderBlocks, find_decoder_blocks, hidden_size_of
from .model_control import HookSet, block_output, real_token_index, with_block_output
from .validation import check_choice, check_strength, layer_in_range
from .vectors import SteeringVector, SteeringVectorSet

InjectionMode = Literal["all", "last", "first"]
ApplyTo = Literal["both", "prompt", "generated"]
Operator = Literal["add", "ablate", "clamp"]
Strength = Union[float, Sequence[float], torch.Tensor]

INJECTION_MODES = ("all", "last", "first")
APPLY_TO = ("both", "prompt", "generated")
OPERATORS = ("add", "ablate", "clamp")


def _check_strengths(value: Any, name: str = "strength") -> float | torch.Tensor:
    """A finite number, or a 1-D sequence / tensor of them: one strength per batch row."""
    if isinstance(value, torch.Tensor) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes))):
        try:
            # a copy: the caller's tensor changing later must not change (or unvalidate) the strengths
            rows = torch.as_tensor(value, dtype=torch.float64, device="cpu").detach().clone()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a finite number or a 1-D sequence of them, got {value!r}") from None
        if rows.ndim == 0:
            return check_strength(float(rows), name)
        if rows.ndim != 1 or rows.numel() == 0:
            raise ValueError(f"{name}: per-row strengths must be a non-empty 1-D sequence, got shape {tuple(rows.shape)}")
        if not torch.isfinite(rows).all():
            raise TypeError(f"{name} must contain finite numbers, got {value!r}")
        return rows
    return check_strength(value, name)


def _is_zero(strength: float | torch.Tensor) -> bool:
    return bool((strength == 0).all()) if isinstance(strength, torch.Tensor) else strength == 0.0


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
    """One vector at one block, with a strength read at call time.

    ``direction`` is what ``"add"`` adds per unit of strength: the vector itself, or its unit
    vector times the layer's activation norm when strengths are relative. ``clamp_target`` is
    the projection ``"clamp"`` sets per unit of strength.
    """

    def __init__(self, direction: torch.Tensor, strength_of, clamp_target: float | None = None) -> None:
        self.direction = direction.detach()
        self.strength_of = strength_of
        self.clamp_target = clamp_target
        self._placed: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(direction, unit vector) in ``like``'s device and dtype."""
        key = (like.device, like.dtype)
        if key not in self._placed:
            wide = self.direction.to(device=like.device, dtype=torch.float64)
            unit = wide / wide.norm() if wide.norm() > 0 else wide
            self._placed[key] = (self.direction.to(device=like.device, dtype=like.dtype), unit.to(like.dtype))
        return self._placed[key]


class _ConditionGate:
    """The per-row decision of a SteeringCondition, made on the prompt forward.

    A forward hook on the condition's block: on a prompt forward it scores each row (mean over
    its real tokens, projected on the unit condition vector) and keeps the decision; later
    forwards of the same generation reuse it.
    """

    def __init__(self, condition: SteeringCondition, step: _ForwardStep) -> None:
        self.condition, self.step = condition, step
        unit = condition.vector.vector.detach().to(torch.float32)
        self.unit = unit / unit.norm()
        self.rows: torch.Tensor | None = None  # [batch] bool

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.step.is_prompt:
            return
        hidden = block_output(output)
        real = self.step.real
        if real is None or real.shape != hidden.shape[:2]:
            real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        weights = real.to(device=hidden.device, dtype=torch.float32)
        means = torch.einsum("bs,bsh->bh", weights, hidden.float()) / weights.sum(1, keepdim=True).clamp_min(1)
        self.rows = self.condition.passes(means @ self.unit.to(hidden.device))

    def for_batch(self, batch: int, device: torch.device) -> torch.Tensor:
        if self.rows is None or self.rows.shape[0] != batch:
            raise RuntimeError(
                f"steering condition: the decision was made for "
                f"{'no prompt' if self.rows is None else f'{self.rows.shape[0]} rows'}, but this forward has "
                f"{batch}; run the prompt through the model with the injector attached (as generate does)")
        return self.rows.to(device)


class _BlockSteerer:
    """The forward hook on one block: applies its terms at the selected positions."""

    def __init__(self, terms: list[_SteeringTerm], step: _ForwardStep, mode: str, apply_to: str,
                 operator: str, keep_norm: bool, gate: _ConditionGate | None = None) -> None:
        self.terms, self.step, self.gate = terms, step, gate
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
        if all(_is_zero(s) for s in strengths):
            return None  # untouched: bit-identical outputs
        hidden = block_output(output)
        batch = hidden.shape[0]
        rows = None if self.gate is None else self.gate.for_batch(batch, hidden.device)  # [batch] bool
        steered = hidden
        active: torch.Tensor | None = None  # rows some term steers, when only per-row strengths steer
        every_row = False
        for term, strength in zip(self.terms, strengths):
            if _is_zero(strength):
                continue
            if isinstance(strength, torch.Tensor):
                if strength.shape[0] != batch:
                    raise ValueError(f"strength has {strength.shape[0]} per-row values but this forward has "
                                     f"{batch} rows (num_beams / num_return_sequences multiply the rows)")
                nonzero = (strength != 0).to(hidden.device)
                active = nonzero if active is None else active | nonzero
                strength = strength.to(device=hidden.device, dtype=hidden.dtype)[:, None, None]
            else:
                every_row = True
            direction, unit = term.on(hidden)
            if self.operator == "add":
                steered = steered + strength * direction
            elif self.operator == "ablate":
                steered = steered - strength * (steered @ unit)[..., None] * unit
            else:  # clamp: the projection on the unit vector becomes strength x target
                steered = steered + (strength * term.clamp_target - steered @ unit[:, None]) * unit
        if self.keep_norm:
            scale = hidden.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            steered = steered * scale
        if active is not None and not every_row:  # rows at strength 0 stay bit-identical
            rows = active if rows is None else rows & active
        where = self.positions(hidden)
        if rows is not None:
            where = rows[:, None].expand(hidden.shape[:2]) if where is None else where & rows[:, None]
        if where is not None:
            steered = torch.where(where[..., None], steered, hidden)
        return with_block_output(output, steered)


class _InjectorBase:
    """Shared attach/detach/context-manager machinery."""

    def __init__(self, model: nn.Module, injection_mode: str, apply_to: str, operator: str,
                 keep_norm: bool, layer_modules, relative: bool = False,
                 condition: SteeringCondition | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.injection_mode = check_choice(injection_mode, INJECTION_MODES, "injection_mode")
        self.apply_to = check_choice(apply_to, APPLY_TO, "apply_to")
        self.operator = check_choice(operator, OPERATORS, "operator")
        self.keep_norm = bool(keep_norm)
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {relative!r}")
        self.relative = relative
        if condition is not None and not isinstance(condition, SteeringCondition):
            raise TypeError(f"condition must be a SteeringCondition or None, not {type(condition).__name__}")
        self.condition = condition
        self._blocks: DecoderBlocks = find_decoder_blocks(model, layer_modules)
        self._hidden = hidden_size_of(model)
        if condition is not None:
            self._check_vector(condition.vector, "condition.vector", steering=False)
        self._step = _ForwardStep()
        self._hooks: HookSet | None = None

    def _check_vector(self, vector: Any, where: str, steering: bool = True) -> SteeringVector:
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
        if not steering:
            return vector
        if self.operator in ("ablate", "clamp") and vector.norm == 0.0:
            raise ValueError(f"{where}: cannot {self.operator} a zero vector")
        if self.relative:
            _activation_norm(vector, where)
        elif self.operator == "clamp":
            _mean_positive_projection(vector, where)
        return vector

    def _term(self, vector: SteeringVector, strength_of) -> _SteeringTerm:
        """The term of ``vector``: strengths in its own units, or in activation norms if relative."""
        direction = vector.vector.detach()
        if self.relative:
            norm = _activation_norm(vector, "vector")
            wide = direction.to(torch.float64)
            direction = (wide / wide.norm() * norm).to(direction.dtype) if wide.norm() > 0 else direction
            target = norm
        else:
            target = _mean_positive_projection(vector, "vector") if self.operator == "clamp" else None
        return _SteeringTerm(direction, strength_of, target)

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

    @property
    def _attached(self) -> bool:
        """The reference's name for ``is_attached`` (its own tests read it)."""
        return self.is_attached

    @property
    def _handles(self) -> list:
        """The hooks on decoder blocks (the reference's attribute; our mask-reading pre-hook is not counted)."""
        return [] if self._hooks is None else self._hooks.forward_handles

    def attach(self):
        """Register the hooks (idempotent)."""
        if self.is_attached:
            return self
        n = len(self._blocks)
        terms_by_layer = self._terms_by_layer()
        gate = None if self.condition is None else _ConditionGate(self.condition, self._step)
        hooks = [
            (self._blocks.modules[layer],
             _BlockSteerer(terms, self._step, self.injection_mode, self.apply_to, self.operator, self.keep_norm, gate))
            for layer, terms in terms_by_layer.items()
        ]
        if gate is not None:
            condition_layer = self.condition.vector.layer_index % n
            earlier = sorted(layer for layer in terms_by_layer if layer < condition_layer)
            if earlier:
                raise ValueError(
                    f"condition: its vector is read at layer {condition_layer}, after the steered layer(s) "
                    f"{earlier}: the decision would come after the steering it gates; use a condition "
                    f"vector at a layer <= {min(terms_by_layer)}")
            # Last in the list and prepended: on a shared block it runs first, on the unsteered output.
            hooks.append((self._blocks.modules[condition_layer], gate))
        # Prepended: the steered output is what every other hook on the block sees, as the
        # next block does. transformers 5 puts permanent output-capturing hooks on decoder
        # blocks the first time a model runs with output_hidden_states=True; appended after
        # those, steering would be missing from the hidden_states it reports.
        self._hooks = HookSet(hooks, prepend=True, pre_hooks=[(self._step_owner(), self._step.read)])
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
        operator: ``"add"`` the vector, ``"ablate"`` its direction (project it out; strength 1
            removes it entirely), or ``"clamp"`` each steered position's projection on the unit
            vector to strength × the mean projection of the positive rows at extraction
            (``metadata["pos_mean_projection"]``), or strength × ``activation_norm`` if relative.
        keep_norm: rescale each steered position back to its original norm.
        relative: read ``strength`` in units of the layer's mean activation norm
            (``metadata["activation_norm"]``, recorded at extraction): add strength ×
            activation_norm × v / ‖v‖. 0.1-0.5 is a useful range on most models.
        condition: a ``SteeringCondition``: steer only the rows whose prompt passes it.
        layer_modules: override block discovery, as in extraction.

    ``strength`` may also be a sequence or 1-D tensor, one strength per batch row: one
    ``generate`` call then compares several strengths (rows at 0 are untouched).
    """

    def __init__(self, model: nn.Module, vectors: Iterable[SteeringVector] | SteeringVectorSet,
                 strength: Strength = 1.0, injection_mode: InjectionMode = "all", *, apply_to: ApplyTo = "both",
                 operator: Operator = "add", keep_norm: bool = False, relative: bool = False,
                 condition: SteeringCondition | None = None, layer_modules=None) -> None:
        super().__init__(model, injection_mode, apply_to, operator, keep_norm, layer_modules, relative, condition)
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
        self._strength = _check_strengths(strength)

    @property
    def strength(self) -> float | torch.Tensor:
        return self._strength

    @strength.setter
    def strength(self, value: Strength) -> None:
        self._strength = _check_strengths(value)

    def _terms_by_layer(self) -> dict[int, list[_SteeringTerm]]:
        return {layer: [self._term(v, lambda: self._strength)] for layer, v in self._vectors.items()}


class MultiVectorInjector(_InjectorBase):
    """Several behaviours at once, each with its own strength.

    Each set contributes its vector at ``default_layer`` (sets without one are skipped),
    or its ``get_best()`` vector when ``default_layer`` is None, as in the reference.
    """

    def __init__(self, model: nn.Module, vector_sets: Mapping[str, SteeringVectorSet],
                 strengths: Mapping[str, float] | None = None, injection_mode: InjectionMode = "all",
                 default_layer: int | None = None, *, apply_to: ApplyTo = "both", operator: Operator = "add",
                 keep_norm: bool = False, relative: bool = False, condition: SteeringCondition | None = None,
                 layer_modules=None) -> None:
        super().__init__(model, injection_mode, apply_to, operator, keep_norm, layer_modules, relative, condition)
        if not isinstance(vector_sets, Mapping):
            raise TypeError("vector_sets must be a dict of behavior -> SteeringVectorSet")
        if strengths is not None and not isinstance(strengths, Mapping):
            raise TypeError(f"strengths must be a dict of behavior -> float, not {type(strengths).__name__}")
        if default_layer is not None:
            layer_in_range(default_layer, len(self._blocks), "default_layer")
        self.vector_sets = dict(vector_sets)
        self.default_layer = default_layer
        # As in the reference: no (or an empty) strengths dict steers every set at 1.0; a dict
        # that names some behaviours leaves the others at 0.0, and may name behaviours
        # without a set (they steer nothing until a set is given).
        self._strengths = {name: 0.0 if strengths else 1.0 for name in self.vector_sets}
        for name, value in (strengths or {}).items():
            self._strengths[name] = _check_strengths(value, f"strengths[{name!r}]")
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
        self._strengths[behavior] = _check_strengths(strength)

    def get_strength(self, behavior: str) -> float | torch.Tensor:
        return self._strengths.get(behavior, 0.0)

    def _terms_by_layer(self) -> dict[int, list[_SteeringTerm]]:
        n = len(self._blocks)
        terms: dict[int, list[_SteeringTerm]] = {}
        for name, vector in self._chosen.items():
            terms.setdefault(vector.layer_index % n, []).append(
                self._term(vector, lambda name=name: self._strengths[name]))
        return terms


def _metadata_number(vector: SteeringVector, key: str, where: str, purpose: str) -> float:
    value = vector.metadata.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {purpose} needs metadata[{key!r}] (a positive number, recorded by this "
                         f"package's extraction), got {value!r}")
    return float(value)


def _activation_norm(vector: SteeringVector, where: str) -> float:
    return _metadata_number(vector, "activation_norm", where, "relative=True")


def _mean_positive_projection(vector: SteeringVector, where: str) -> float:
    value = vector.metadata.get("pos_mean_projection")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: operator='clamp' needs metadata['pos_mean_projection'] (recorded by this "
                         f"package's extraction) or relative=True, got {value!r}")
    return float(value)
