"""Raw activations of decoder blocks and their MLP / attention submodules.

The reference's ``ActivationHook``, ``ActivationCache`` and ``extract_activations``, with
the same names, arguments and return shapes, on every architecture ``find_decoder_blocks``
knows. ``extract_activations`` also stops the forward after the deepest hooked module and,
when ``inputs`` carry an ``attention_mask``, reads the last / first *real* token of each
row instead of the last / first position (which is padding in a padded batch).
For steering-vector extraction use ``extract_caa_vectors``: it never keeps activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Sequence

import torch
from torch import nn

from . import _core
from .layers import component_module, find_decoder_blocks, resolve_layer_indices
from .model_control import HookSet, block_output, deepest_module, real_token_index, unflatten_rows
from .validation import check_choice

Component = Literal["residual", "mlp", "attn"]
HOOK_TOKEN_POSITIONS = ("last", "first", "all")


class ActivationCache:
    """Detached copies of captured activations, by name."""

    def __init__(self) -> None:
        self._activations: dict[str, torch.Tensor] = {}

    def store(self, name: str, activation: torch.Tensor) -> None:
        self._activations[name] = activation.detach().clone()

    def get(self, name: str) -> torch.Tensor | None:
        return self._activations.get(name)

    def clear(self) -> None:
        self._activations.clear()

    def keys(self) -> list[str]:
        return list(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def __contains__(self, name: object) -> bool:
        return name in self._activations


class ActivationHook:
    """Forward hooks capturing ``component`` outputs of the given layers into ``self.cache``.

    ``token_position``: ``"all"`` keeps ``[batch, seq, hidden]``; ``"last"`` / ``"first"``
    keep ``[batch, 1, hidden]``: the last / first position, or, when ``attention_mask`` is
    given, the last / first real token of each row. Use as a context manager; the hooks
    come off on exit whatever happened.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_indices: Sequence[int],
        component: Component = "residual",
        token_position: Literal["last", "first", "all"] = "all",
        *,
        attention_mask: torch.Tensor | None = None,
        layer_modules=None,
    ) -> None:
        check_choice(token_position, HOOK_TOKEN_POSITIONS, "token_position")
        blocks = find_decoder_blocks(model, layer_modules)
        self.model = model
        self.layer_indices = list(layer_indices)
        self.component = component
        self.token_position = token_position
        self.attention_mask = attention_mask
        self.cache = ActivationCache()
        resolved = resolve_layer_indices(self.layer_indices, len(blocks))
        self._modules = [component_module(blocks.modules[i], component)[0] for i in resolved]
        self._hooks = HookSet(
            [(module, self._hook_for(layer, module)) for layer, module in zip(self.layer_indices, self._modules)],
            pre_hooks=[(model, self._note_batch)])
        self._stop_after: nn.Module | None = None
        self._batch_rows: int | None = None

    @property
    def is_attached(self) -> bool:
        return self._hooks.attached

    @property
    def _attached(self) -> bool:
        """The reference's name for ``is_attached`` (its own tests read it)."""
        return self._hooks.attached

    @property
    def _handles(self) -> list:
        """The capturing hooks, one per layer (the reference's attribute; the batch-size pre-hook is not counted)."""
        return self._hooks.forward_handles

    def attach(self) -> ActivationHook:
        self._hooks.attach()
        return self

    def detach(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> ActivationHook:
        return self.attach()

    def __exit__(self, *exc_info: Any) -> None:
        self.detach()

    def get_activations(self) -> dict[int, torch.Tensor]:
        """``{layer: activation}`` for every layer captured so far."""
        found = ((layer, self.cache.get(f"layer_{layer}")) for layer in self.layer_indices)
        return {layer: act for layer, act in found if act is not None}

    def _note_batch(self, _model: nn.Module, args: tuple, kwargs: dict) -> None:
        """The forward's batch size: OPT's MLP returns [batch * seq, hidden] rows."""
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        self._batch_rows = int(tokens.shape[0]) if isinstance(tokens, torch.Tensor) and tokens.dim() >= 2 else None

    def _hook_for(self, layer: int, module: nn.Module):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            activation = block_output(unflatten_rows(output, self._batch_rows))
            self.cache.store(f"layer_{layer}", self._select(activation))
            if module is self._stop_after:
                raise _core.StopForward
        return hook

    def _select(self, activation: torch.Tensor) -> torch.Tensor:
        if self.token_position == "all":
            return activation
        if self.attention_mask is None:
            return activation[:, -1:, :] if self.token_position == "last" else activation[:, :1, :]
        mask = self.attention_mask.to(activation.device).bool()
        if mask.shape != activation.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the activations are "
                             f"[batch, seq] = {tuple(activation.shape[:2])}")
        index = real_token_index(mask, self.token_position).clamp(0, mask.shape[1] - 1)
        rows = torch.arange(activation.shape[0], device=activation.device)
        return activation[rows, index.to(activation.device)].unsqueeze(1)


def extract_activations(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    layer_indices: Sequence[int],
    component: Component = "residual",
    token_position: Literal["last", "first", "all"] = "last",
) -> dict[int, torch.Tensor]:
    """``{layer: activation}`` of ``component`` for one forward of ``model(**inputs)``.

    Shapes as in ``ActivationHook``. The forward stops after the deepest hooked module and runs
    without gradients and without a KV cache; like the reference, it leaves ``model.training``
    as the caller set it.
    """
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs and "inputs_embeds" not in inputs:
        raise TypeError("inputs must be a dict of model inputs with 'input_ids' (e.g. a tokenizer's output)")
    hook = ActivationHook(model, layer_indices, component, token_position,
                          attention_mask=inputs.get("attention_mask") if token_position != "all" else None)
    hook._stop_after = hook._modules[deepest_module(model, hook._modules)]
    with hook, torch.no_grad():
        try:
            model(**{"use_cache": False, **dict(inputs)})
        except _core.StopForward:
            pass
    return hook.get_activations()
