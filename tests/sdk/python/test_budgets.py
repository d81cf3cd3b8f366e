"""Budgets as the Python SDK meets them: a spent per-minute budget is a
`RateLimitError` the SDK's own retry gets past once the window refills; a
spent daily budget is one the SDK does not retry; `GET /v1/usage` through the
SDK's generic `get`. Each test runs its own Iris, so budgets never leak
between tests."""

import json
import time

import openai
import pytest

from iris_harness import DEFAULT_MODELS, Client, Model

MESSAGES = [{"role": "user", "content": "Say hello"}]


class Attempts:
    """Every HTTP response the SDK received, retries included (an httpx
    event hook), so a test sees what the SDK's retry loop did."""

    def __init__(self):
        self.responses = []

    def hook(self, response):
        self.responses.append(response)

    def http_client(self):
        return openai.DefaultHttpxClient(event_hooks={"response": [self.hook]})

    @property
    def statuses(self) -> list[int]:
        return [r.status_code for r in self.responses]


def spend_until_refused(client, limit: int) -> openai.RateLimitError:
    """Sends requests (no retries) until one is refused; at most `limit`."""
    for _ in range(limit):
        try:
            client.chat.completions.create(model="sdk-model", messages=MESSAGES, max_tokens=16)
        except openai.RateLimitError as error:
            return error
    pytest.fail(f"no 429 after {limit} requests")


def test_spent_minute_budget_is_retried_by_the_sdk_after_the_refill(
    start_iris, make_client, mock_upstream
):
    # GCRA: a burst of 60, then one request a second.
    iris = start_iris(clients=[Client("rpm", "iris-sdk-rpm-key", budget={"requests_per_minute": 60})])
    eager = make_client(target=iris)  # max_retries=0

    error = spend_until_refused(eager, 70)

    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    headers = error.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 1000
    assert int(headers["retry-after"]) == 1  # whole seconds, rounded up
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"

    attempts = Attempts()
    patient = make_client(target=iris, max_retries=2, http_client=attempts.http_client())
    before = mock_upstream.chat_requests()
    started = time.monotonic()
    completion = patient.chat.completions.create(model="sdk-model", messages=MESSAGES, max_tokens=16)
    elapsed = time.monotonic() - started

    assert completion.choices[0].message.content == "Hello from the mock upstream."
    # Refused, then the SDK waited what `retry-after-ms` said and got through:
    # the wait Iris announced was long enough, and not much longer.
    assert attempts.statuses == [429, 200]
    waited = int(attempts.responses[0].headers["retry-after-ms"]) / 1000
    assert waited * 0.9 <= elapsed < waited + 1.0, (waited, elapsed)
    assert mock_upstream.chat_requests() == before + 1  # the 429 went nowhere


def test_spent_daily_budget_is_not_retried(start_iris, make_client, mock_upstream):
    # The mock charges about 45 tokens a request: two fit, the third does not.
    iris = start_iris(clients=[Client("daily", "iris-sdk-daily-key", budget={"tokens_per_day": 100})])
    spend_until_refused(make_client(target=iris), 10)

    attempts = Attempts()
    stubborn = make_client(target=iris, max_retries=5, http_client=attempts.http_client())
    before = mock_upstream.chat_requests()
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        stubborn.chat.completions.create(model="sdk-model", messages=MESSAGES, max_tokens=16)
    elapsed = time.monotonic() - started

    error = caught.value
    assert error.code == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert int(error.response.headers["retry-after"]) > 0  # until the UTC midnight
    # One attempt, answered at once (five retries would take 11 s and more).
    assert attempts.statuses == [429]
    assert elapsed < 1.0, elapsed
    assert mock_upstream.chat_requests() == before


def test_request_larger_than_the_daily_budget_is_not_retried(start_iris, make_client, mock_upstream):
    iris = start_iris(clients=[Client("small", "iris-sdk-small-key", budget={"tokens_per_day": 1000})])
    attempts = Attempts()
    stubborn = make_client(target=iris, max_retries=5, http_client=attempts.http_client())
    before = mock_upstream.chat_requests()
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        stubborn.chat.completions.create(model="sdk-model", messages=MESSAGES, max_tokens=5000)
    elapsed = time.monotonic() - started

    error = caught.value
    assert error.code == "insufficient_quota"
    # Waiting never helps, so no Retry-After: only x-should-retry keeps the
    # SDK from its default backoff.
    assert "retry-after" not in error.response.headers
    assert error.response.headers["x-should-retry"] == "false"
    assert attempts.statuses == [429]
    assert elapsed < 1.0, elapsed
    assert mock_upstream.chat_requests() == before


def test_usage_endpoint_through_the_sdks_generic_get(start_iris, make_client):
    iris = start_iris(
        clients=[
            Client(
                "metered",
                "iris-sdk-metered-key",
                budget={"requests_per_minute": 10, "tokens_per_day": 100_000},
            )
        ]
    )
    client = make_client(target=iris)
    spent = sum(
        client.chat.completions.create(model="sdk-model", messages=MESSAGES, max_tokens=16).usage.total_tokens
        for _ in range(2)
    )

    usage = client.get("/usage", cast_to=object)

    assert usage["object"] == "usage"
    assert usage["client"] == "metered"
    requests = usage["windows"]["requests_per_minute"]
    assert (requests["limit"], requests["used"], requests["remaining"]) == (10, 2, 8)
    day = usage["windows"]["tokens_per_day"]
    # Settled to what the upstream reported, not to the estimates.
    assert (day["limit"], day["used"], day["remaining"]) == (100_000, spent, 100_000 - spent)
    assert day["reset_at"] > time.time()


def test_a_teams_spent_money_is_not_retried_and_names_the_team(start_iris, make_client, mock_upstream):
    # 1000 prompt tokens (400 cached) and 250 completion tokens at 2.50 /
    # 1.25 / 10.00 per million cost $0.0045: the team's $0.01 a day is
    # spent by the third request, whichever member sends it.
    usage = json.dumps(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 250,
            "total_tokens": 1250,
            "prompt_tokens_details": {"cached_tokens": 400},
        }
    )
    iris = start_iris(
        models=[*DEFAULT_MODELS, Model("priced", price={"input": 2.5, "cached_input": 1.25, "output": 10.0})],
        clients=[
            Client("member-1", "iris-sdk-member-1", team="research"),
            Client("member-2", "iris-sdk-member-2", team="research"),
        ],
        extra_toml='[[teams]]\nname = "research"\n[teams.budget]\ncost_per_day = 0.01\n',
    )
    one = make_client("iris-sdk-member-1", target=iris)
    two = make_client("iris-sdk-member-2", target=iris)
    for member in (one, two, one):
        member.chat.completions.create(
            model="priced", messages=MESSAGES, max_tokens=16, extra_headers={"x-mock-usage": usage}
        )

    attempts = Attempts()
    stubborn = make_client("iris-sdk-member-2", target=iris, max_retries=5, http_client=attempts.http_client())
    before = mock_upstream.chat_requests()
    with pytest.raises(openai.RateLimitError) as caught:
        stubborn.chat.completions.create(model="priced", messages=MESSAGES, max_tokens=16)

    error = caught.value
    assert error.code == "insufficient_quota"
    assert "team research" in error.message and "cost_per_day" in error.message, error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert attempts.statuses == [429]
    assert mock_upstream.chat_requests() == before

    shown = stubborn.get("/usage", cast_to=object)
    assert shown["currency"] == "USD"
    assert shown["team"]["name"] == "research"
    assert abs(shown["team"]["windows"]["cost_per_day"]["used"] - 3 * 0.0045) < 1e-6
