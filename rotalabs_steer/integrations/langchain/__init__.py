"""LangChain models and a small tool-using agent that steer a HuggingFace model.

``SteeredLLM`` (text in, text out) and ``SteeredChatModel`` (messages in, an AIMessage out)
load ``model_name`` with transformers and add the vectors named in ``steering_configs``
through ``MultiVectorInjector`` while they generate; strengths change at run time.
"""

try:
    import langchain_core  # noqa: F401
except ImportError as e:
    raise ImportError('the LangChain integration needs langchain-core: pip install "rotalabs-steer[langchain]"') from e

from .steered_agent import SteeredAgentExecutor, create_steered_agent
from .steered_chat import SteeredChatModel
from .steered_llm import SteeredLLM

__all__ = ["SteeredAgentExecutor", "SteeredChatModel", "SteeredLLM", "create_steered_agent"]
