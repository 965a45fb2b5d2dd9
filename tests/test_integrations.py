"""rotalabs_steer.integrations: HAS_LANGCHAIN, and the LangChain wrappers on the bundled model
(invoke, stop strings, streaming, chat history, run-time strengths) and the agent loop."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from rotalabs_steer import ActivationInjector, SteeringVector

from rotalabs_steer.integrations import HAS_LANGCHAIN
from tiny_models import hook_count

try:
    import langchain_core
except ImportError:
    langchain_core = None
else:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_core.tools import Tool

    from rotalabs_steer.integrations.langchain import (
        SteeredAgentExecutor,
        SteeredChatModel,
        SteeredLLM,
        create_steered_agent,
    )
    from rotalabs_steer.integrations.langchain.steered_agent import GAVE_UP

needs_langchain = pytest.mark.skipif(langchain_core is None, reason='needs pip install "rotalabs-steer[langchain]"')

TOKENS = 6
PROMPT = "The capital of France is"
LAYER = 10


def test_has_langchain():
    assert HAS_LANGCHAIN is (langchain_core is not None)


def test_without_langchain_the_names_are_none():
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "langchain_core" or name.startswith("langchain_core."):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import rotalabs_steer.integrations as integrations
        print(integrations.HAS_LANGCHAIN, integrations.SteeredLLM, integrations.create_steered_agent)
        try:
            import rotalabs_steer.integrations.langchain
        except ImportError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False None None", 'the LangChain integration needs langchain-core: pip install "rotalabs-steer[langchain]"']


# --- the agent loop, with a scripted chat model -----------------------------------------------

def calculator_tool(calls):
    def calculate(expression: str) -> str:
        calls.append(expression)
        if expression == "boom":
            raise ZeroDivisionError("division by zero")
        return str(sum(int(part) for part in expression.split("+")))
    return Tool(name="Calculator", func=calculate, description="adds numbers like 2+2")


@needs_langchain
def test_agent_calls_a_tool_then_answers():
    calls = []
    scripted = FakeListChatModel(responses=[
        "Thought: I should add.\nAction: Calculator\nAction Input: 2+2", "Thought: done\nFinal Answer: it is 4"])
    agent = SteeredAgentExecutor(scripted, [calculator_tool(calls)])
    history = [HumanMessage(content="hi"), AIMessage(content="hello")]
    assert agent.run("What is 2+2?", chat_history=history) == "it is 4"
    assert calls == ["2+2"]
    assert "Calculator: adds numbers like 2+2" in agent.system_prompt


@needs_langchain
def test_agent_errors_are_observations_and_steps_are_bounded():
    calls = []
    seen = []

    class Recording(FakeListChatModel):
        def _call(self, messages, *args, **kwargs):
            seen.append([m.content for m in messages])
            return super()._call(messages, *args, **kwargs)

    model = Recording(responses=["Action: Nope\nAction Input: x", "Action: Calculator\nAction Input: boom"])
    agent = SteeredAgentExecutor(model, [calculator_tool(calls)], system_prompt="sys", max_iterations=2)
    assert agent.run("go") == GAVE_UP
    assert seen[0] == ["sys", "go"]
    assert seen[1][-1].startswith("Observation: Error: there is no tool named 'Nope'")
    assert calls == ["boom"]
    assert agent.get_strength("refusal") == 0.0  # a model without steering controls
    agent.set_strength("refusal", 1.0)  # passed on only where the model has them: no error
    with pytest.raises(ValueError, match="max_iterations"):
        SteeredAgentExecutor(model, [], max_iterations=0)


@needs_langchain
def test_agent_without_markers_returns_the_reply():
    agent = SteeredAgentExecutor(FakeListChatModel(responses=["Just 4."]), [])
    assert agent.run("What is 2+2?") == "Just 4."


# --- the bundled model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder():
    """The HF folder load_default() caches the bundled model in (model_name is the only way in)."""
    from rotalabs_steer import bundled_model

    def cached():
        return sorted(p for p in bundled_model._cache_root().glob("smollm2-135m-instruct-*")
                      if (p / "config.json").is_file())
    try:
        if not cached():
            bundled_model.load_default()
    except ImportError as e:
        pytest.skip(str(e))
    return str(cached()[0])


@pytest.fixture(scope="module")
def vector_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vectors")
    generator = torch.Generator().manual_seed(0)
    for behavior in ("humor", "formality"):
        SteeringVector(behavior, LAYER, torch.randn(576, generator=generator) * 6, "smollm2").save(folder / behavior)
    return {behavior: str(folder / behavior) for behavior in ("humor", "formality")}


def wrapper(kind, folder, vector_paths, strength=2.0):
    return kind(model_name=folder, steering_configs={"humor": {"vector_path": vector_paths["humor"],
                                                               "strength": strength}},
                device="cpu", torch_dtype="float32", max_new_tokens=TOKENS, do_sample=False)


def manual_reply(model, tokenizer, text, vector=None, strength=0.0, add_special_tokens=True):
    """Greedy generate with our ActivationInjector, decoded without the prompt."""
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    injector = ActivationInjector(model, [vector], strength=strength) if vector is not None else None
    with torch.no_grad():
        if injector is not None:
            with injector:
                out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
        else:
            out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@needs_langchain
@pytest.mark.slow
def test_steered_llm(model_folder, vector_paths):
    llm = wrapper(SteeredLLM, model_folder, vector_paths)
    model, tokenizer = llm._model, llm._tokenizer
    humor = SteeringVector.load(vector_paths["humor"])
    steered = llm.invoke(PROMPT)
    assert steered == manual_reply(model, tokenizer, PROMPT, humor, 2.0)
    assert hook_count(model) == 0
    assert llm.get_strength("humor") == 2.0  # the reference reads a missing attribute here
    llm.disable_steering()
    assert llm.get_strength("humor") == 0.0
    plain = llm.invoke(PROMPT)
    assert plain == manual_reply(model, tokenizer, PROMPT) and plain != steered
    llm.enable_steering("humor", 2.0)
    assert llm.invoke(PROMPT) == steered
    assert "".join(llm.stream(PROMPT)) == steered  # LangChain's fallback: one chunk
    first = steered.split()[0]
    assert llm.invoke(PROMPT, stop=[first]) == ""  # cut at the stop string
    llm.add_vector("formality", vector_paths["formality"], strength=0.0)
    assert (llm.get_strength("humor"), llm.get_strength("formality")) == (2.0, 0.0)
    assert llm.invoke(PROMPT) == steered
    with pytest.raises(KeyError, match="'sarcasm'"):
        llm.set_strength("sarcasm", 1.0)
    assert llm.get_strength("sarcasm") == 0.0
    assert llm._identifying_params["model_name"] == model_folder
    assert hook_count(model) == 0


@needs_langchain
@pytest.mark.slow
def test_steered_chat_model_with_history(model_folder, vector_paths):
    chat = wrapper(SteeredChatModel, model_folder, vector_paths)
    model, tokenizer = chat._model, chat._tokenizer
    messages = [SystemMessage(content="Be brief."), HumanMessage(content="My name is Ann."),
                AIMessage(content="Hello Ann!"), HumanMessage(content="What is my name?")]
    roles = [{"role": r, "content": m.content} for r, m in zip(("system", "user", "assistant", "user"), messages)]
    prompt = tokenizer.apply_chat_template(roles, tokenize=False, add_generation_prompt=True)
    chat.set_strength("humor", 0.0)
    reply = chat.invoke(messages)
    assert isinstance(reply, AIMessage)
    assert reply.content == manual_reply(model, tokenizer, prompt, add_special_tokens=False)
    chat.set_strength("humor", 2.0)
    humor = SteeringVector.load(vector_paths["humor"])
    steered = chat.invoke(messages).content
    assert steered == manual_reply(model, tokenizer, prompt, humor, 2.0, add_special_tokens=False)
    assert steered != reply.content
    assert "".join(chunk.content for chunk in chat.stream(messages)) == steered
    assert hook_count(model) == 0


@needs_langchain
@pytest.mark.slow
def test_create_steered_agent_on_the_bundled_model(model_folder, vector_paths):
    agent = create_steered_agent(model_folder, {"humor": {"vector_path": vector_paths["humor"], "strength": 0.5}},
                                 system_prompt="Answer in one word.", device="cpu", torch_dtype="float32",
                                 max_new_tokens=TOKENS, do_sample=False)
    agent.max_iterations = 1
    assert agent.get_strength("humor") == 0.5
    answer = agent.run("What color is the sky?")
    reply = agent.llm.invoke([SystemMessage(content="Answer in one word."),
                              HumanMessage(content="What color is the sky?")]).content
    parsed = agent._parse_agent_output(reply)
    assert answer == (parsed.return_values["output"] if hasattr(parsed, "return_values") else GAVE_UP)
    agent.disable_steering("humor")
    assert agent.llm.get_strength("humor") == 0.0
    assert hook_count(agent.llm._model) == 0


@needs_langchain
def test_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="torch_dtype must be one of"):
        SteeredLLM(model_name="unused", torch_dtype="float8")
    with pytest.raises(ValueError, match=r"steering_configs\['humor'\] must be a dict with a 'vector_path'"):
        SteeredLLM(model_name="unused", steering_configs={"humor": {"strength": 1.0}})
    with pytest.raises(FileNotFoundError, match="missing"):
        SteeredLLM(model_name="unused", steering_configs={"humor": {"vector_path": str(tmp_path / "missing")}})
