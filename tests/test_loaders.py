"""Loading contrast pairs from files: plain pairs (JSON, JSONL, saved layout) and CAA A/B records."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from rotalabs_steer.datasets import (
    ContrastPair,
    ContrastPairDataset,
    load_behavior_pairs,
    load_caa_ab,
    load_pairs,
    load_refusal_pairs,
    render_exchange,
)

# shared/ lies beside the repository (the project layout, also in CI)
CAA_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "caa_ab_refusal_sample.json"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def chat_tokenizer():
    from tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture
def caa_records():
    if not CAA_SAMPLE.exists():
        pytest.skip(f"{CAA_SAMPLE} is absent")
    return json.loads(CAA_SAMPLE.read_text(encoding="utf-8"))


# --- load_pairs ---------------------------------------------------------------------------------


def test_saved_layout_round_trip(tmp_path):
    dataset = ContrastPairDataset("humor", description="jokes")
    dataset.add(ContrastPair("a pun", "a fact", {"k": 1}))
    dataset.add_pair("a quip", "a statement", topic="food")
    dataset.save(tmp_path / "humor.json")
    loaded = load_pairs(tmp_path / "humor.json")
    assert (loaded.behavior, loaded.description) == ("humor", "jokes")
    assert (loaded.positives, loaded.negatives) == (dataset.positives, dataset.negatives)
    assert [p.metadata for p in loaded] == [{"k": 1}, {"topic": "food"}]
    assert load_pairs(str(tmp_path / "humor.json"), behavior="wit").behavior == "wit"


def test_json_list_detected_from_content(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text(json.dumps([{"positive": "yes", "negative": "no", "source": "x"}]), encoding="utf-8")
    loaded = load_pairs(path, behavior="b")
    assert (loaded.behavior, loaded.positives, loaded.negatives) == ("b", ["yes"], ["no"])
    assert loaded[0].metadata == {"source": "x"}


def test_jsonl_round_trip(tmp_path):
    dataset = load_refusal_pairs()
    records = [{"positive": p.positive, "negative": p.negative, "metadata": p.metadata} for p in dataset]
    path = write_jsonl(tmp_path / "refusal.json", records)  # JSONL despite the suffix
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # blank lines are skipped
    loaded = load_pairs(path)
    assert loaded.behavior == "unknown"
    assert (loaded.positives, loaded.negatives) == (dataset.positives, dataset.negatives)
    assert [p.metadata for p in loaded] == [p.metadata for p in dataset]


def test_single_line_jsonl(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"positive": "yes", "negative": "no"}) + "\n", encoding="utf-8")
    assert load_pairs(path).positives == ["yes"]


def test_jsonl_with_user_turns_renders_like_shipped_pairs():
    # The shipped files use the {"user", "positive", "negative", "topic"} lines.
    path = resources.files("rotalabs_steer.datasets").joinpath("data", "refusal.jsonl")
    loaded, shipped = load_pairs(Path(str(path)), behavior="refusal"), load_refusal_pairs()
    assert (loaded.positives, loaded.negatives) == (shipped.positives, shipped.negatives)
    assert [p.metadata for p in loaded] == [p.metadata for p in shipped]
    user = shipped[0].metadata["user"]
    assert loaded[0].positive.startswith(render_exchange(user, ""))


def test_in_memory_list():
    loaded = load_pairs([{"positive": "yes", "negative": "no"}, {"user": "Q?", "positive": "A", "negative": "B"}])
    assert loaded.positives == ["yes", "User: Q?\nAssistant: A"]
    assert loaded.negatives == ["no", "User: Q?\nAssistant: B"]
    assert loaded[1].metadata == {"user": "Q?"}


GOOD = {"positive": "yes", "negative": "no"}

MALFORMED = [
    # (file name, content, error, message)
    ("pairs.jsonl", f'{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n{{"positive": "p"}}\n', ValueError,
     r"pairs\.jsonl line 3: missing 'negative'"),
    ("pairs.jsonl", f'{json.dumps(GOOD)}\n{{"positive": "p",\n', ValueError,
     r"pairs\.jsonl line 2: not valid JSON"),
    ("pairs.jsonl", f'{json.dumps(GOOD)}\n["yes", "no"]\n', TypeError, r"pairs\.jsonl line 2: expected a dict"),
    ("pairs.jsonl", f'{json.dumps(GOOD)}\n\n{{"user": 5, "positive": "p", "negative": "n"}}\n', TypeError,
     r"pairs\.jsonl line 3: 'user' must be a str"),
    ("pairs.jsonl", '{"user": " ", "positive": "p", "negative": "n"}\n', ValueError,
     r"pairs\.jsonl line 1: 'user' is empty"),
    ("pairs.json", json.dumps([GOOD, {"positive": 3, "negative": "n"}]), TypeError,
     r"pairs\.json record 1: ContrastPair\.positive must be a str"),
    ("pairs.json", json.dumps([GOOD, GOOD, {"positive": "p", "negative": "  "}]), ValueError,
     r"pairs\.json record 2: .*negative is empty"),
    ("pairs.json", json.dumps([{"positive": "p", "negative": "n", "metadata": [1]}]), TypeError,
     r"pairs\.json record 0: 'metadata' must be a dict"),
    ("pairs.json", json.dumps([GOOD, {"question": "q"}]), ValueError,
     r"pairs\.json record 1: missing 'positive' and 'negative'"),
    ("saved.json", json.dumps({"behavior": "x", "pairs": [GOOD, {"negative": "n"}]}), ValueError,
     r"saved\.json pair 1: missing 'positive'"),
    ("saved.json", json.dumps({"behavior": "x", "pairs": {"positive": "p"}}), ValueError,
     r"saved\.json: 'pairs' must be a list"),
    ("saved.json", json.dumps({"behavior": "x", "pairs": []}), ValueError, r"saved\.json: no records"),
    ("pairs.json", "[]", ValueError, r"pairs\.json: no records"),
    ("pairs.json", "", ValueError, r"pairs\.json: file is empty"),
    ("pairs.jsonl", "\n  \n", ValueError, r"pairs\.jsonl: file is empty"),
    ("pairs.json", '"just a string"', ValueError, r"pairs\.json: expected an object with a 'pairs' list"),
    ("pairs.json", json.dumps(GOOD, indent=2), ValueError, r"pairs\.json: expected an object with a 'pairs' list"),
    ("pairs.json", '[\n  {"positive": "p", "negative": "n"},\n  {"positive": \n', ValueError,
     r"pairs\.json: not valid JSON or JSONL"),
]


@pytest.mark.parametrize("name, content, error, message", MALFORMED)
def test_malformed_files_name_file_and_record(tmp_path, name, content, error, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=message):
        load_pairs(path)


def test_malformed_in_memory_and_sources():
    with pytest.raises(ValueError, match=r"source\[1\]: missing 'negative'"):
        load_pairs([GOOD, {"positive": "p"}])
    with pytest.raises(ValueError, match="source is an empty list"):
        load_pairs([])
    with pytest.raises(TypeError, match="source must be a file path or a list of dicts, not dict"):
        load_pairs(GOOD)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"positive": "caf\xe9", "negative": "n"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl: not UTF-8"):
        load_pairs(path)


# --- chat templates -----------------------------------------------------------------------------


def test_behavior_pairs_render_through_chat_template(chat_tokenizer):
    plain, chat = load_behavior_pairs("refusal"), load_behavior_pairs("refusal", tokenizer=chat_tokenizer)
    assert len(chat) == len(plain)
    for plain_pair, chat_pair in zip(plain, chat):
        user = chat_pair.metadata["user"]
        turn = f"<|user|>{user}<|end|><|assistant|>"
        for plain_text, chat_text in ((plain_pair.positive, chat_pair.positive),
                                      (plain_pair.negative, chat_pair.negative)):
            reply = plain_text.removeprefix(f"User: {user}\nAssistant: ")
            assert chat_text == f"{turn}{reply}<|end|>"


def test_render_exchange_needs_a_chat_template():
    from tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    assert not tokenizer.chat_template
    with pytest.raises(ValueError, match="tokenizer has no chat_template"):
        render_exchange("Hi", "Hello", tokenizer)
    with pytest.raises(ValueError, match="tokenizer has no chat_template"):
        load_caa_ab([{"question": "Q?\n(A) x\n(B) y", "answer_matching_behavior": "(A)",
                      "answer_not_matching_behavior": "(B)"}], tokenizer=tokenizer)


# --- CAA A/B ------------------------------------------------------------------------------------


def check_caa_pair(pair: ContrastPair, record: dict) -> None:
    letters = [record[k].strip()[1] for k in ("answer_matching_behavior", "answer_not_matching_behavior")]
    assert pair.metadata["question"] == record["question"]
    for text, letter, key in zip((pair.positive, pair.negative), letters,
                                 ("positive_answer_char", "negative_answer_char")):
        index = pair.metadata[key]
        assert isinstance(index, int) and text[index] == letter and text[index - 1:index + 2] == f"({letter})"
    # The two texts differ in the answer letter alone.
    assert len(pair.positive) == len(pair.negative)
    assert [i for i, (p, n) in enumerate(zip(pair.positive, pair.negative)) if p != n] == [
        pair.metadata["positive_answer_char"]]


def test_caa_sample_file(caa_records):
    dataset = load_caa_ab(CAA_SAMPLE, behavior="refusal")
    assert (dataset.behavior, len(dataset)) == ("refusal", 6)
    assert {r["answer_matching_behavior"] for r in caa_records} == {"(A)", "(B)"}
    for pair, record in zip(dataset, caa_records):
        check_caa_pair(pair, record)
        question = record["question"]
        assert pair.positive == f"{question}\n\nAnswer: {record['answer_matching_behavior']}"
        assert pair.negative == f"{question}\n\nAnswer: {record['answer_not_matching_behavior']}"
        assert pair.metadata["positive_answer_char"] == len(pair.positive) - 2


def test_caa_jsonl_and_in_memory_match_the_json_file(tmp_path, caa_records):
    # Some CAA datasets write answers with a leading space: " (A)".
    spaced = [{**r, "answer_matching_behavior": " " + r["answer_matching_behavior"]} for r in caa_records]
    expected = load_caa_ab(CAA_SAMPLE)
    for source in (write_jsonl(tmp_path / "caa.jsonl", spaced), caa_records):
        loaded = load_caa_ab(source)
        assert (loaded.positives, loaded.negatives) == (expected.positives, expected.negatives)
        assert [p.metadata for p in loaded] == [p.metadata for p in expected]


def test_caa_with_chat_template_records_answer_before_end_of_turn(chat_tokenizer, caa_records):
    dataset = load_caa_ab(CAA_SAMPLE, tokenizer=chat_tokenizer)
    assert len(dataset) == 6
    for pair, record in zip(dataset, caa_records):
        check_caa_pair(pair, record)
        matching = record["answer_matching_behavior"]
        assert pair.positive == f"<|user|>{record['question']}<|end|><|assistant|>{matching}<|end|>"
        assert not pair.positive.endswith(")")
        # The letter is a token position a CAA extractor can read.
        encoding = chat_tokenizer(pair.positive)
        assert encoding.char_to_token(pair.metadata["positive_answer_char"]) is not None


CAA_GOOD = {"question": "Q?\n\nChoices:\n(A) yes\n(B) no", "answer_matching_behavior": "(A)",
            "answer_not_matching_behavior": "(B)"}

CAA_MALFORMED = [
    ({"answer_matching_behavior": "A"}, ValueError,
     r"record 1: answer_matching_behavior 'A' is not one capital letter in parentheses"),
    ({"answer_matching_behavior": "(a)"}, ValueError, r"record 1: answer_matching_behavior '\(a\)' is not"),
    ({"answer_not_matching_behavior": "(AB)"}, ValueError, r"record 1: answer_not_matching_behavior '\(AB\)'"),
    ({"answer_not_matching_behavior": "(C)"}, ValueError,
     r"record 1: answer_not_matching_behavior is \(C\) but the question has no option \(C\)"),
    ({"answer_not_matching_behavior": "(A)"}, ValueError, r"record 1: both answers are \(A\)"),
    ({"answer_not_matching_behavior": ["(B)"]}, TypeError,
     r"record 1: 'answer_not_matching_behavior' must be a str, not list"),
    ({"question": ""}, ValueError, r"record 1: 'question' is empty"),
]


@pytest.mark.parametrize("change, error, message", CAA_MALFORMED)
def test_caa_malformed_records_are_named(tmp_path, change, error, message):
    path = tmp_path / "caa.json"
    path.write_text(json.dumps([CAA_GOOD, {**CAA_GOOD, **change}]), encoding="utf-8")
    with pytest.raises(error, match=r"caa\.json " + message):
        load_caa_ab(path)


def test_caa_malformed_jsonl_and_in_memory(tmp_path):
    missing = {k: v for k, v in CAA_GOOD.items() if k != "question"}
    path = write_jsonl(tmp_path / "caa.jsonl", [CAA_GOOD, CAA_GOOD, missing])
    with pytest.raises(ValueError, match=r"caa\.jsonl line 3: missing 'question'"):
        load_caa_ab(path)
    with pytest.raises(TypeError, match=r"source\[0\]: expected a dict"):
        load_caa_ab(["(A)"])
    with pytest.raises(ValueError, match=r"caa\.json: no records"):
        (tmp_path / "caa.json").write_text("[]")
        load_caa_ab(tmp_path / "caa.json")
