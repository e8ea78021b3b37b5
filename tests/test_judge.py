"""The VIEScore judge against a real HTTP server on 127.0.0.1 that answers like the chat-completions API."""

from __future__ import annotations

import time
import pytest
from PIL import Image

from earl.config import ConfigError, Reward
from earl.judge import JudgeReplyError, VIEScoreJudge, base_url_of, parse_scores


def spec(url: str, **overrides):
    values = dict(kind="viescore", model="judge", base_url=url, max_concurrency=8, max_tokens=100, timeout_s=2.0,
                  max_attempts=5, backoff_s=0.01, deadline_s=60.0)
    return Reward(**{**values, **overrides})


def images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), (i * 10 % 255, 0, 0)) for i in range(n)]


def test_faults_are_retried_counted_and_never_turned_into_scores(server):
    judge = VIEScoreJudge(spec(f"http://127.0.0.1:{server.server_address[1]}/v1"))
    n = 40
    edited = images(n)
    edited[3] = None  # malformed completion: reward 0 without asking
    scores = judge.score_many(edited, [{"instruction": "make it red"}] * n, images(n))
    assert scores[3].overall == 0 and not scores[3].failed
    judged = [s for i, s in enumerate(scores) if i != 3]
    assert all(s.failed or (s.sc, s.pq) == (6.0, 7.0) for s in judged)  # min of each pair, or failed
    assert sum(not s.failed for s in judged) >= n - 3  # 5 attempts make a final failure rare
    # every injected fault was seen (a slow machine may add client-side timeouts of its own)
    assert judge.faults >= sum(server.fault_counts.values()) > 0
    assert all(count > 0 for count in server.fault_counts.values())
    # one SC and one PQ question per edit, plus a retry for every injected fault (unless the sample gave up)
    assert server.requests >= 2 * (n - 1) + sum(server.fault_counts.values()) - 2 * sum(s.failed for s in judged)


def test_a_judge_that_never_answers_fails_the_sample_within_the_deadline(server):
    server.fault_rate = 1.0
    judge = VIEScoreJudge(spec(f"http://127.0.0.1:{server.server_address[1]}/v1", max_attempts=2, deadline_s=5.0))
    started = time.monotonic()
    scores = judge.score_many(images(4), [{"instruction": "x"}] * 4, images(4))
    assert all(s.failed for s in scores) and time.monotonic() - started < 10


def test_url_without_v1_fails_fast_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"^rl\.reward\.base_url: 'http://host:8000' must end in /v1"):
        base_url_of("http://host:8000")
    monkeypatch.delenv("EARL_JUDGE_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="EARL_JUDGE_BASE_URL"):
        base_url_of(None)
    monkeypatch.setenv("EARL_JUDGE_BASE_URL", "http://judge:8000/v1/")
    assert base_url_of(None) == "http://judge:8000/v1"


@pytest.mark.parametrize("reply", ["fine", '{"score": [8]}', '{"score": [8, 11]}', '{"reasoning": "no score"}', "{oops"])
def test_strict_parsing_rejects_what_is_not_two_scores(reply):
    with pytest.raises(JudgeReplyError):
        parse_scores(reply)


def test_parsing_accepts_json_inside_prose():
    assert parse_scores('Sure! {"score": [7, 9.5], "reasoning": "fine"} Hope this helps.') == [7.0, 9.5]
