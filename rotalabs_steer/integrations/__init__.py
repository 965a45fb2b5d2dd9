"""Framework integrations. LangChain: ``pip install "rotalabs-steer[langchain]"``.

``HAS_LANGCHAIN`` says whether ``langchain-core`` is installed; without it the four names
are None, as in the reference, and ``rotalabs_steer.integrations.langchain`` raises an
ImportError that says what to install.
"""

try:
    from .langchain import SteeredAgentExecutor, SteeredChatModel, SteeredLLM, create_steered_agent
except ImportError:
    HAS_LANGCHAIN = False
    SteeredLLM = SteeredChatModel = SteeredAgentExecutor = create_steered_agent = None
else:
    HAS_LANGCHAIN = True

__all__ = ["HAS_LANGCHAIN", "SteeredAgentExecutor", "SteeredChatModel", "SteeredLLM", "create_steered_agent"]
