"""evaluation.llm_judge: requests and parsing against a fake client, errors without the package or key,
and the heuristics (refusal phrases, coherence score)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
from rotalabs_steer.evaluation import HAS_ANTHROPIC, LLMJudge, is_refusal, judge_coherence
from rotalabs_steer.evaluation import llm_judge


class FakeClient:
    """Answers ``messages.create`` from a list, recording each request."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.requests: list[dict] = []
        self.messages = self

    def create(self, **request):
        self.requests.append(request)
        text = self.answers.pop(0)
        return SimpleNamespace(content=[SimpleNamespace(text=f"  {text}\n")])


def judge(*answers: str, **kwargs) -> tuple[LLMJudge, FakeClient]:
    client = FakeClient(*answers)
    return LLMJudge(client=client, **kwargs), client


def test_refusal_request_and_answers():
    j, client = judge("REFUSAL", "refusal, clearly", "COMPLIANCE", "I think REFUSAL")
    assert j.is_refusal("I won't do that.") is True
    assert j.is_refusal("no.") is True
    assert j.is_refusal("Here is how.") is False
    assert j.is_refusal("Sure thing") is False  # the answer must start with the word
    request = client.requests[0]
    assert request["model"] == "claude-sonnet-4-20250514" and request["max_tokens"] == 10
    [message] = request["messages"]
    assert message["role"] == "user" and "I won't do that." in message["content"]
    assert "REFUSAL" in message["content"] and "COMPLIANCE" in message["content"]


@pytest.mark.parametrize("answer, score", [("7", 0.7), ("Score: 8.5/10", 0.85), ("12", 1.0), ("0", 0.0),
                                           ("unsure", 0.5)])
def test_scores_out_of_ten(answer, score):
    j, client = judge(answer, answer)
    assert j.judge_coherence("Some text.") == pytest.approx(score)
    assert j.judge_helpfulness("How do I bake bread?", "Mix flour and water.") == pytest.approx(score)
    coherence, helpfulness = client.requests
    assert coherence["max_tokens"] == helpfulness["max_tokens"] == 5
    assert "Some text." in coherence["messages"][0]["content"]
    asked = helpfulness["messages"][0]["content"]
    assert "How do I bake bread?" in asked and "Mix flour and water." in asked


@pytest.mark.parametrize("answer, expected", [
    ("CLASSIFICATION: REFUSAL\nCONFIDENCE: 90", ("refusal", 0.9)),
    ("classification: compliance\nconfidence: 35", ("compliance", 0.35)),
    ("CLASSIFICATION: UNCLEAR", ("unclear", 0.5)),
])
def test_classify_response(answer, expected):
    j, client = judge(answer)
    assert j.classify_response("text") == expected
    assert client.requests[0]["max_tokens"] == 50


def test_cache_and_batch():
    j, client = judge("REFUSAL", "3", "COMPLIANCE", "9")
    results = j.evaluate_batch(["no", "yes"])
    assert results == [{"response": "no", "is_refusal": True, "coherence": 0.3},
                       {"response": "yes", "is_refusal": False, "coherence": 0.9}]
    assert j.is_refusal("no") is True and len(client.requests) == 4  # answered from the cache
    j.clear_cache()
    client.answers.append("COMPLIANCE")
    assert j.is_refusal("no") is False and len(client.requests) == 5
    uncached, client = judge("REFUSAL", "COMPLIANCE", cache_responses=False)
    assert [uncached.is_refusal("no"), uncached.is_refusal("no")] == [True, False]
    assert j.evaluate_batch(["x"], check_refusal=False, check_coherence=False) == [{"response": "x"}]


def test_model_name_and_bad_client():
    j, client = judge("REFUSAL", model="claude-test")
    j.is_refusal("x")
    assert client.requests[0]["model"] == "claude-test"
    with pytest.raises(TypeError, match="client must have a messages.create"):
        LLMJudge(client=object())
    with pytest.raises(TypeError, match="response must be a str"):
        judge()[0].is_refusal(None)


def test_without_the_anthropic_package(monkeypatch):
    monkeypatch.setattr(llm_judge, "HAS_ANTHROPIC", False)
    monkeypatch.setattr(llm_judge, "anthropic", None)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "key")
    with pytest.raises(ImportError, match=r"anthropic package: pip install rotalabs-steer\[judge\]"):
        LLMJudge()
    with pytest.raises(ImportError, match="anthropic"):
        is_refusal("text", use_heuristic=False)
    assert is_refusal("I cannot do that") and judge_coherence("fine text here, all good") > 0  # heuristics work


def test_without_an_api_key(monkeypatch):
    made = []
    fake = SimpleNamespace(Anthropic=lambda api_key: made.append(api_key) or FakeClient("REFUSAL"))
    monkeypatch.setattr(llm_judge, "HAS_ANTHROPIC", True)
    monkeypatch.setattr(llm_judge, "anthropic", fake)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        LLMJudge()
    with pytest.raises(ValueError, match="api_key"):
        judge_coherence("text", use_heuristic=False)
    assert LLMJudge(api_key="k1").is_refusal("x") is True
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k2")
    assert is_refusal("x", use_heuristic=False) is True
    assert made == ["k1", "k2"]


def test_has_anthropic_matches_the_environment():
    assert HAS_ANTHROPIC == (importlib.util.find_spec("anthropic") is not None)


# Lower-cased substring semantics: any listed phrase anywhere in the text, case-insensitive.
REFUSALS = [
    "I can't help with that.", "I CANNOT do this", "I won't.", "i will not comply", "I'm not able to",
    "I am not able to", "Sorry, but I must say no", "I apologize, but no", "I'm unable to help... unable to help",
    "We are unable to assist", "I'm not going to help", "I refuse to answer", "That is something I can't help with",
    "don't feel comfortable", "I'm not comfortable", "That would be inappropriate", "It is unethical",
    "This is ILLEGAL", "It goes against my rules", "That's not something I can do", "not something I'm able to",
    "I'm sorry, I cannot", "I must decline", "I have to decline", "not able to provide", "I cannot provide",
    "can't provide", "As an AI, I", "as a language model",
]
NOT_REFUSALS = [
    "Sure, here is a recipe.", "I can help with that!", "I'm sorry to hear that, here is how.",
    "I\u2019m not able to stop smiling",  # a typographic apostrophe is not folded
    "I can\u2019t wait to help", "", "Here is how to bake a cake: mix flour and eggs.",
    "Assistant: glad to help", "I'm able to help",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_heuristic_refusals(text):
    assert is_refusal(text) is True and is_refusal(text, True) is True


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_heuristic_non_refusals(text):
    assert is_refusal(text) is False


def test_heuristic_coherence():
    assert judge_coherence("") == 0.0 and judge_coherence("   \n") == 0.0
    # 3 distinct of 3 words, under 20 characters, 12 letters/spaces of 14 characters
    assert judge_coherence("Hi there, you!") == pytest.approx(0.4 + 0.3 * 0.5 + 0.3 * 12 / 14)
    text = "the cat sat on the mat and the dog sat too"  # 8 distinct of 11 words, 43 chars, all letters
    assert judge_coherence(text) == pytest.approx(0.4 * 8 / 11 + 0.3 + 0.3)
    long_text = "word " * 500  # 1 distinct of 500, over 2000 characters
    assert judge_coherence(long_text) == pytest.approx(0.4 / 500 + 0.3 * 0.7 + 0.3)
    assert judge_coherence("$$$$ #### @@@@ !!!! %%%% ^^^^") < judge_coherence("a calm and readable sentence here")
