"""``SteeredLLM``: a LangChain text LLM whose HuggingFace model generates under steering."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM

from ._steered_model import DEFAULT_LAYER, SteeredModelFields


class SteeredLLM(SteeredModelFields, LLM):
    """Text in, text out, with steering vectors added while the model generates.

    Example::

        llm = SteeredLLM(model_name="Qwen/Qwen3-8B", steering_configs={
            "refusal": {"vector_path": "vectors/refusal/layer_14", "strength": 1.0}})
        llm.invoke("How do I pick a lock?")
        llm.set_strength("refusal", 0.5)

    The reply is the generated text only (the prompt is not repeated), cut at any ``stop``
    string. ``max_new_tokens``, ``temperature`` and ``do_sample`` can be overridden per call.
    """

    @property
    def _llm_type(self) -> str:
        return "steered_llm"

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return self._generate_text(prompt, stop, add_special_tokens=True, **kwargs)


__all__ = ["DEFAULT_LAYER", "SteeredLLM"]
