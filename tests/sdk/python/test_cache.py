"""The response cache through the Python SDK: `x-iris-cache` read with
`with_raw_response`, a repeated request answered without reaching the
upstream, a stream replayed whole, and `Cache-Control: no-cache` going past
the cache."""

import pytest

from iris_harness import DEFAULT_MODELS, Model

CACHED = Model("sdk-cached", upstream_model="upstream-sdk-cached", cache=True)


@pytest.fixture(scope="module")
def cache_iris(start_iris):
    return start_iris(
        models=[*DEFAULT_MODELS, CACHED],
        extra_toml='[cache]\nkind = "memory"\nttl_s = 600\n',
    )


@pytest.fixture
def cached_client(make_client, cache_iris):
    return make_client(target=cache_iris)


def test_a_repeated_request_is_a_hit_the_upstream_never_sees(cached_client, mock_upstream):
    messages = [{"role": "user", "content": "What is a cache? (python, plain)"}]
    before = mock_upstream.chat_requests()

    first = cached_client.chat.completions.with_raw_response.create(
        model="sdk-cached", messages=messages
    )
    again = cached_client.chat.completions.with_raw_response.create(
        model="sdk-cached", messages=messages, user="someone-else"
    )

    assert first.headers["x-iris-cache"] == "miss"
    assert again.headers["x-iris-cache"] == "hit"
    assert "x-iris-attempts" not in again.headers
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert again.parse().model == "upstream-sdk-cached"
    assert mock_upstream.chat_requests() == before + 1


def test_a_stream_is_replayed_whole_and_a_plain_request_gets_it_assembled(
    cached_client, mock_upstream
):
    messages = [{"role": "user", "content": "What is a cache? (python, stream)"}]
    before = mock_upstream.chat_requests()

    def streamed():
        raw = cached_client.chat.completions.with_raw_response.create(
            model="sdk-cached", messages=messages, stream=True
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return raw.headers["x-iris-cache"], text, chunks[-1].choices[0].finish_reason

    assert streamed() == ("miss", "word0 word1 word2 ", "stop")
    assert streamed() == ("hit", "word0 word1 word2 ", "stop")
    plain = cached_client.chat.completions.with_raw_response.create(
        model="sdk-cached", messages=messages
    )
    assert plain.headers["x-iris-cache"] == "hit"
    assert plain.parse().choices[0].message.content == "word0 word1 word2 "
    assert mock_upstream.chat_requests() == before + 1


def test_no_cache_goes_to_the_upstream_and_other_models_say_nothing(
    cached_client, mock_upstream
):
    messages = [{"role": "user", "content": "What is a cache? (python, no-cache)"}]
    cached_client.chat.completions.create(model="sdk-cached", messages=messages)
    before = mock_upstream.chat_requests()

    fresh = cached_client.chat.completions.with_raw_response.create(
        model="sdk-cached", messages=messages, extra_headers={"Cache-Control": "no-cache"}
    )
    other = cached_client.chat.completions.with_raw_response.create(
        model="other-model", messages=messages
    )

    assert fresh.headers["x-iris-cache"] == "miss"
    assert "x-iris-cache" not in other.headers
    assert mock_upstream.chat_requests() == before + 2
