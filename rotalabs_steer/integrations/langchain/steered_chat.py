"""``SteeredChatModel``: a LangChain chat model whose HuggingFace model generates under steering."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from ._steered_model import DEFAULT_LAYER, SteeredModelFields

_ROLES = ((SystemMessage, "system"), (HumanMessage, "user"), (AIMessage, "assistant"))


class SteeredChatModel(SteeredModelFields, BaseChatModel):
    """Messages in (system prompt, history, the new turn), an AIMessage out, steered.

    The conversation goes through the tokenizer's chat template; the reply is the generated
    text only, cut at any ``stop`` string. Other message types are sent as user turns.
    """

    @property
    def _llm_type(self) -> str:
        return "steered_chat_model"

    def _convert_messages_to_chat_format(self, messages: list[BaseMessage]) -> list[dict[str, str]]:
        """LangChain messages as the ``[{"role", "content"}]`` list chat templates take."""
        def role(message: BaseMessage) -> str:
            return next((name for kind, name in _ROLES if isinstance(message, kind)), "user")
        return [{"role": role(m), "content": m.content if isinstance(m.content, str) else str(m.content)}
                for m in messages]

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        self._initialize()
        prompt = self._tokenizer.apply_chat_template(
            self._convert_messages_to_chat_format(messages), tokenize=False, add_generation_prompt=True)
        # the template already holds the special tokens it needs
        reply = self._generate_text(prompt, stop, add_special_tokens=False, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=reply))])


__all__ = ["DEFAULT_LAYER", "SteeredChatModel"]
