"""Chat completions through Iris with the official Python SDK: plain,
streamed, and an upstream error passed through."""

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Say hello"}]


def test_plain_completion_returns_the_upstream_answer(client):
    completion = client.chat.completions.create(model="sdk-model", messages=MESSAGES)

    assert completion.choices[0].message.content == "Hello from the mock upstream."
    assert completion.choices[0].finish_reason == "stop"
    # The mock echoes the model it received: Iris sent the upstream's name
    # and returned the response as the upstream sent it.
    assert completion.model == "upstream-sdk-model"
    assert completion.usage is not None and completion.usage.completion_tokens == 7


def test_model_without_rename_is_sent_as_named(client):
    completion = client.chat.completions.create(model="other-model", messages=MESSAGES)

    assert completion.model == "other-model"


def test_stream_yields_chunks_and_no_usage_chunk_unless_asked(client):
    stream = client.chat.completions.create(
        model="sdk-model",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-chunks": "4"},
    )
    chunks = list(stream)

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "word0 word1 word2 word3 "
    assert len(chunks) == 6  # role, 4 words, finish
    assert chunks[-1].choices[0].finish_reason == "stop"
    # Iris asks the upstream for usage (stream_usage = true) but must not pass
    # on a chunk this client did not ask for.
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_stream_with_include_usage_ends_with_the_usage_chunk(client):
    stream = client.chat.completions.create(
        model="sdk-model",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "word0 word1 word2 "
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_helper_assembles_the_final_completion(client):
    """`chat.completions.stream` is the SDK's higher-level streaming API."""
    with client.chat.completions.stream(model="sdk-model", messages=MESSAGES) as stream:
        final = stream.get_final_completion()

    assert final.choices[0].message.content == "word0 word1 word2 "
    assert final.model == "upstream-sdk-model"


def test_upstream_error_surfaces_as_the_matching_sdk_error(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model="sdk-model", messages=MESSAGES, extra_headers={"x-mock-status": "422"}
        )

    error = caught.value
    assert error.status_code == 422
    # The upstream's body, passed through untouched.
    assert error.code == "mock_error"
    assert error.type == "upstream_error"
    assert "mock upstream error" in error.message
    assert error.body == {
        "message": "mock upstream error",
        "type": "upstream_error",
        "param": None,
        "code": "mock_error",
    }


def test_upstream_error_on_a_stream_raises_before_any_chunk(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model="sdk-model",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-status": "422"},
        )

    assert caught.value.code == "mock_error"


def test_request_id_is_visible_in_the_raw_response(client):
    raw = client.chat.completions.with_raw_response.create(model="sdk-model", messages=MESSAGES)

    assert raw.headers.get("x-request-id")
    assert raw.parse().choices[0].message.content == "Hello from the mock upstream."


def test_client_request_id_is_echoed(client):
    raw = client.chat.completions.with_raw_response.create(
        model="sdk-model", messages=MESSAGES, extra_headers={"x-request-id": "sdk-trace-42"}
    )

    assert raw.headers["x-request-id"] == "sdk-trace-42"


def test_a_stream_interrupted_mid_way_raises_instead_of_ending_quietly(client, mock_upstream):
    """The upstream dies after two words. Iris cannot retry once words have
    reached the client, so it ends the stream with an `error` event and no
    `[DONE]`, and the SDK raises: a truncated answer never looks complete."""
    before = mock_upstream.chat_requests()
    stream = client.chat.completions.create(
        model="sdk-model",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-die-after": "2"},
    )
    chunks = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            chunks.append(chunk)

    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "word0 word1 "  # what came before the failure was relayed
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)
    error = caught.value
    assert error.code == "upstream_stream_interrupted"
    assert error.type == "server_error"
    assert error.message
    assert mock_upstream.chat_requests() == before + 1  # not retried
