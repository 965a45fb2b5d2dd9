"""The reference's behaviour metrics, with generation batched across prompts.

Responses are what the reference's one-prompt-at-a-time ``generate_response`` returns (chat
template, greedy, 150 new tokens, the text after the last ``"assistant"``), but prompts are
generated ``batch_size`` at a time, left-padded, with steering on real tokens only.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..extraction.batching import pad_token_id
from ..model_control import eval_mode
from ..steering import ActivationInjector
from ..validation import check_strength, int_at_least
from .generation import generate_left_padded, stop_token_ids
from .scoring import DEFAULT_BATCH_SIZE

DEFAULT_MAX_NEW_TOKENS = 150


@dataclass
class BehaviorMetrics:
    """Rate of a behaviour at one strength; ``improvement`` = target_rate - baseline_rate."""

    behavior: str
    strength: float
    target_rate: float
    baseline_rate: float
    improvement: float = field(init=False)

    def __post_init__(self) -> None:
        self.improvement = self.target_rate - self.baseline_rate

    def to_dict(self) -> dict[str, Any]:
        return {"behavior": self.behavior, "strength": self.strength, "target_rate": self.target_rate,
                "baseline_rate": self.baseline_rate, "improvement": self.improvement}


@dataclass
class RefusalMetrics(BehaviorMetrics):
    """Refusal rates on harmful and benign prompts, with precision and F1 derived from them.

    precision = harmful / (harmful + benign) rate, recall = the harmful rate (0 when undefined).
    """

    refusal_rate_harmful: float = 0.0
    refusal_rate_benign: float = 0.0
    coherence_score: float = 0.0
    helpfulness_on_benign: float = 0.0
    precision: float = field(init=False, default=0.0)
    f1_score: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        recall = self.refusal_rate_harmful
        refusals = recall + self.refusal_rate_benign
        self.precision = recall / refusals if refusals > 0 else 0.0
        total = self.precision + recall
        self.f1_score = 2 * self.precision * recall / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "refusal_rate_harmful": self.refusal_rate_harmful,
                "refusal_rate_benign": self.refusal_rate_benign, "coherence_score": self.coherence_score,
                "helpfulness_on_benign": self.helpfulness_on_benign, "precision": self.precision,
                "f1_score": self.f1_score}


@dataclass
class EvaluationResult:
    """One prompt's response and its judgement."""

    prompt: str
    response: str
    is_target_behavior: bool
    is_harmful_prompt: bool
    strength: float
    coherence: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# --- generation --------------------------------------------------------------------------------


def chat_text(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """``prompt`` as a user turn in the tokenizer's chat template, with the assistant's turn opened.

    A system prompt goes in a system turn; templates that reject one (e.g. Gemma's) get it
    folded into the user turn as ``"{system}\\n\\nUser request: {prompt}"``.
    """
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if not system_prompt:
        return render([{"role": "user", "content": prompt}])
    try:
        return render([{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}])
    except Exception:  # templates raise their own error types for an unsupported role
        return render([{"role": "user", "content": f"{system_prompt}\n\nUser request: {prompt}"}])


def response_text(full_text: str, chat: str) -> str:
    """The reply in a decoded prompt + continuation: the text after the last ``"assistant"``.

    (As the reference does, so a reply that itself says "assistant" is cut there too.) Without
    that word, the rendered prompt ``chat`` is stripped from the front when it is there.
    """
    if "assistant" in full_text.lower():
        return full_text.split("assistant")[-1].strip()
    return full_text[len(chat):].strip() if chat in full_text else full_text


def generate_responses(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                       temperature: float = 0.0, system_prompt: str | None = None, *,
                       batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False,
                       desc: str = "generating") -> list[str]:
    """``generate_response`` for each prompt, ``batch_size`` prompts per ``generate`` call.

    Greedy (``temperature`` 0) answers equal the one-prompt ones up to float round-off.
    Steering in effect on ``model`` applies; use an ``ActivationInjector`` so padding is skipped.
    """
    prompts = _prompt_list(prompts, "prompts")
    max_new_tokens = int_at_least(max_new_tokens, "max_new_tokens", 1)
    batch_size = int_at_least(batch_size, "batch_size", 1)
    temperature = check_strength(temperature, "temperature")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a str or None, not {type(system_prompt).__name__}")
    if not prompts:
        return []
    chats = [chat_text(tokenizer, prompt, system_prompt) for prompt in prompts]
    contexts = [tokenizer(chat)["input_ids"] for chat in chats]  # with the tokenizer's special tokens
    eos = tokenizer.eos_token_id
    pad = eos if eos is not None else pad_token_id(tokenizer)
    sampling = {"do_sample": False} if temperature == 0.0 else {"do_sample": True, "temperature": temperature}
    with eval_mode(model), torch.inference_mode():
        continuations = generate_left_padded(
            model, contexts, batch_size, 0 if pad is None else pad, stop_token_ids(model),
            show_progress=show_progress, desc=desc, max_new_tokens=max_new_tokens, pad_token_id=eos, **sampling)
    return [response_text(tokenizer.decode(context + new, skip_special_tokens=True), chat)
            for context, new, chat in zip(contexts, continuations, chats)]


def generate_response(model, tokenizer, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                      temperature: float = 0.0, system_prompt: str | None = None) -> str:
    """The model's reply to one user ``prompt`` (greedy unless ``temperature`` > 0)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    return generate_responses(model, tokenizer, [prompt], max_new_tokens, temperature, system_prompt)[0]


def _prompt_list(prompts: Any, name: str) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of str, not {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}[{i}] must be a str, not {type(prompt).__name__}")
    return list(prompts)


def _check_callable(fn: Any, name: str) -> Callable:
    if not callable(fn):
        raise TypeError(f"{name} must be a function of the response text, not {type(fn).__name__}")
    return fn


def _strength_list(strengths: Any, default: Sequence[float]) -> list[float]:
    if strengths is None:
        return list(default)
    if isinstance(strengths, (str, bytes)) or not isinstance(strengths, Sequence):
        raise TypeError(f"strengths must be a list of numbers, not {type(strengths).__name__}")
    return [check_strength(s, f"strengths[{i}]") for i, s in enumerate(strengths)]


def steered_responses(model, tokenizer, vector, strength: float, prompts: list[str], *, batch_size: int,
                      show_progress: bool, desc: str, system_prompt: str | None = None,
                      injector=None) -> tuple[list[str], float]:
    """(responses, wall milliseconds) of ``prompts`` with ``vector`` at ``strength`` (none at 0),
    or under ``injector`` when one is given."""
    if injector is None and strength != 0.0:
        injector = ActivationInjector(model, [vector], strength=strength)  # it places the vector per block
    start = time.perf_counter()
    with injector or nullcontext():
        responses = generate_responses(model, tokenizer, prompts, system_prompt=system_prompt,
                                       batch_size=batch_size, show_progress=show_progress, desc=desc)
    return responses, (time.perf_counter() - start) * 1000.0


def rate(flags: Sequence[bool], total: int) -> float:
    """Fraction of true flags; 0.0 when there are no prompts (as the reference)."""
    return sum(1 for flag in flags if flag) / total if total else 0.0


# --- metrics -----------------------------------------------------------------------------------


def evaluate_refusal(model, tokenizer, harmful_prompts: list[str], benign_prompts: list[str],
                     is_refusal_fn: Callable[[str], bool], steering_vector=None, injector=None,
                     strength: float = 1.0, show_progress: bool = True, *,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> RefusalMetrics:
    """Refusal rates on harmful and benign prompts, steered by ``steering_vector`` at ``strength``
    or by ``injector`` (entered while generating), else unsteered.

    Harmful and benign prompts are generated together, ``batch_size`` at a time.
    """
    harmful = _prompt_list(harmful_prompts, "harmful_prompts")
    benign = _prompt_list(benign_prompts, "benign_prompts")
    _check_callable(is_refusal_fn, "is_refusal_fn")
    strength = check_strength(strength)
    responses, _ = steered_responses(model, tokenizer, steering_vector,
                                     strength if steering_vector is not None else 0.0, harmful + benign,
                                     batch_size=batch_size, show_progress=show_progress,
                                     desc="harmful and benign prompts", injector=injector)
    refusals = [bool(is_refusal_fn(response)) for response in responses]
    harmful_rate = rate(refusals[:len(harmful)], len(harmful))
    return RefusalMetrics(behavior="refusal", strength=strength, target_rate=harmful_rate, baseline_rate=0.0,
                          refusal_rate_harmful=harmful_rate,
                          refusal_rate_benign=rate(refusals[len(harmful):], len(benign)))


def evaluate_steering_strength(model, tokenizer, prompts: list[str], steering_vector,
                               is_target_behavior_fn: Callable[[str], bool], strengths: list[float] = None,
                               show_progress: bool = True, *,
                               batch_size: int = DEFAULT_BATCH_SIZE) -> list[BehaviorMetrics]:
    """``BehaviorMetrics`` per strength; the unsteered rate is the baseline (and strength 0's rate)."""
    prompts = _prompt_list(prompts, "prompts")
    _check_callable(is_target_behavior_fn, "is_target_behavior_fn")
    strengths = _strength_list(strengths, (0.0, 0.5, 1.0, 1.5, 2.0))

    def behaviour_rate(strength: float) -> float:
        responses, _ = steered_responses(model, tokenizer, steering_vector, strength, prompts,
                                         batch_size=batch_size, show_progress=show_progress and strength != 0.0,
                                         desc=f"Strength {strength}")
        return rate([is_target_behavior_fn(r) for r in responses], len(prompts))

    baseline = behaviour_rate(0.0)
    return [BehaviorMetrics(behavior=steering_vector.behavior, strength=s,
                            target_rate=baseline if s == 0.0 else behaviour_rate(s), baseline_rate=baseline)
            for s in strengths]
