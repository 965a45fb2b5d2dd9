"""``SteeredAgentExecutor``: a small ReAct-style tool loop around a (steered) LangChain model."""

from __future__ import annotations

from typing import Any

from langchain_core.agents import AgentAction, AgentFinish
from langchain_core.language_models import BaseLanguageModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import BaseTool

from ...validation import int_at_least
from .steered_chat import SteeredChatModel
from .steered_llm import SteeredLLM

_FINAL = "Final Answer:"
_ACTION = "Action:"
_INPUT = "Action Input:"
GAVE_UP = "I was unable to complete the task within the allowed number of steps."


class SteeredAgentExecutor:
    """Ask the model, run the tool it names, feed back the result, until it gives an answer.

    The model answers in the format the system prompt describes: ``Action:`` / ``Action Input:``
    to call a tool, or ``Final Answer:``. A reply in neither form is taken as the answer.
    Strength controls are passed on to ``llm`` (a SteeredLLM or SteeredChatModel).
    """

    def __init__(self, llm: SteeredLLM | SteeredChatModel | BaseLanguageModel, tools: list[BaseTool],
                 system_prompt: str | None = None, max_iterations: int = 10, verbose: bool = False) -> None:
        self.llm = llm
        self.tools_list = list(tools)
        self.tools = {tool.name: tool for tool in self.tools_list}
        self.max_iterations = int_at_least(max_iterations, "max_iterations", 1)
        self.verbose = bool(verbose)
        self.system_prompt = system_prompt or self._build_default_system_prompt()

    def _build_default_system_prompt(self) -> str:
        listing = "\n".join(f"- {tool.name}: {tool.description}" for tool in self.tools_list) or "(none)"
        return (
            "You are an assistant that can call tools.\n\n"
            f"Tools:\n{listing}\n\n"
            "To call a tool, reply with exactly these lines:\n"
            "Thought: why the tool is needed\n"
            f"{_ACTION} the tool's name\n"
            f"{_INPUT} what to pass it\n\n"
            "You will then see the tool's output as an Observation. When you can answer, reply:\n"
            "Thought: your reasoning\n"
            f"{_FINAL} the answer for the user\n\n"
            "Call a tool only when you need one."
        )

    def _parse_agent_output(self, output: str) -> AgentAction | AgentFinish:
        """A tool call (``Action:`` then ``Action Input:``) or an answer (anything else)."""
        text = output.strip()
        if _FINAL in text:
            return AgentFinish({"output": text.split(_FINAL, 1)[1].strip()}, text)
        action_at, input_at = text.find(_ACTION), text.find(_INPUT)
        if 0 <= action_at < input_at:
            tool = text[action_at + len(_ACTION):input_at].strip().splitlines()
            return AgentAction(tool[0].strip() if tool else "", text[input_at + len(_INPUT):].strip(), text)
        return AgentFinish({"output": text}, text)

    def _format_tool_result(self, tool_name: str, result: str) -> str:
        return f"Observation: {result}\n"

    def _ask(self, messages: list[BaseMessage]) -> str:
        if hasattr(self.llm, "invoke"):
            reply = self.llm.invoke(messages)
            return reply.content if hasattr(reply, "content") else str(reply)
        return str(self.llm("\n".join(f"{m.type}: {m.content}" for m in messages)))

    def _use_tool(self, action: AgentAction) -> str:
        tool = self.tools.get(action.tool)
        if tool is None:
            return f"Error: there is no tool named {action.tool!r}; tools: {sorted(self.tools)}"
        try:
            return str(tool.run(action.tool_input))
        except Exception as e:  # noqa: BLE001 - the model sees the error and may try again
            return f"Error: {type(e).__name__}: {e}"

    def run(self, input: str, chat_history: list[BaseMessage] | None = None) -> str:
        """The agent's answer to ``input`` (after ``chat_history``, if given)."""
        messages: list[BaseMessage] = [SystemMessage(content=self.system_prompt), *(chat_history or []),
                                       HumanMessage(content=input)]
        for step in range(1, self.max_iterations + 1):
            output = self._ask(messages)
            if self.verbose:
                print(f"[step {step}] model: {output[:200]}")
            parsed = self._parse_agent_output(output)
            if isinstance(parsed, AgentFinish):
                return parsed.return_values["output"]
            result = self._use_tool(parsed)
            if self.verbose:
                print(f"[step {step}] {parsed.tool}: {result[:200]}")
            messages += [AIMessage(content=output), HumanMessage(content=self._format_tool_result(parsed.tool, result))]
        return GAVE_UP

    # strength controls, passed on to the model when it has them (a plain LLM has none)
    def set_strength(self, behavior: str, strength: float) -> None:
        if hasattr(self.llm, "set_strength"):
            self.llm.set_strength(behavior, strength)

    def get_strength(self, behavior: str) -> float:
        return self.llm.get_strength(behavior) if hasattr(self.llm, "get_strength") else 0.0

    def disable_steering(self, behavior: str | None = None) -> None:
        if hasattr(self.llm, "disable_steering"):
            self.llm.disable_steering(behavior)

    def enable_steering(self, behavior: str, strength: float = 1.0) -> None:
        if hasattr(self.llm, "enable_steering"):
            self.llm.enable_steering(behavior, strength)


def create_steered_agent(model_name: str = "Qwen/Qwen3-8B", steering_configs: dict[str, dict[str, Any]] | None = None,
                         tools: list[BaseTool] | None = None, system_prompt: str | None = None,
                         device: str = "auto", verbose: bool = False, **chat_options: Any) -> SteeredAgentExecutor:
    """A SteeredChatModel of ``model_name`` in a SteeredAgentExecutor.

    ``chat_options`` go to SteeredChatModel (``torch_dtype``, ``max_new_tokens``, ...).
    """
    chat = SteeredChatModel(model_name=model_name, steering_configs=steering_configs or {}, device=device,
                            **chat_options)
    return SteeredAgentExecutor(llm=chat, tools=tools or [], system_prompt=system_prompt, verbose=verbose)


__all__ = ["SteeredAgentExecutor", "create_steered_agent"]
