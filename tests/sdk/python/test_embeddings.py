"""`client.embeddings.create` through Iris with the Python SDK: base64 (the
SDK's default, decoded by the SDK into floats) and floats, renamed upstream,
charged the upstream's count, and the SDK's errors for a chat model and for
input of another shape."""

import openai
import pytest

from iris_harness import DEFAULT_MODELS, Client, Model

EMBED = Model("sdk-embed", upstream_model="upstream-embed", endpoint="embeddings")


@pytest.fixture(scope="module")
def embed_iris(start_iris):
    return start_iris(
        models=[*DEFAULT_MODELS, EMBED],
        clients=[Client("embedder", "iris-sdk-embed-key", budget={"tokens_per_day": 1000})],
    )


@pytest.fixture
def embedder(make_client, embed_iris):
    return make_client(target=embed_iris)


def test_base64_vectors_arrive_as_floats_through_the_sdk(embedder):
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    result = embedder.embeddings.create(model="sdk-embed", input=["first text", "second"])

    assert [item.index for item in result.data] == [0, 1]
    assert all(len(item.embedding) == 4 for item in result.data)
    assert all(isinstance(x, float) for x in result.data[0].embedding)
    assert result.model == "upstream-embed", "the mock echoes the name Iris sent"
    assert result.usage.prompt_tokens == 3 + 2


def test_float_vectors_and_dimensions_pass_through(embedder):
    result = embedder.embeddings.create(
        model="sdk-embed", input="hello", encoding_format="float", dimensions=6
    )

    assert len(result.data[0].embedding) == 6


def test_the_upstreams_count_is_what_the_budget_is_charged(embedder, embed_iris):
    before = embedder.get("/usage", cast_to=object)["windows"]["tokens_per_day"]["used"]

    embedder.embeddings.create(
        model="sdk-embed",
        input="counted",
        extra_headers={"x-mock-usage": '{"prompt_tokens": 41, "total_tokens": 41}'},
    )

    after = embedder.get("/usage", cast_to=object)["windows"]["tokens_per_day"]["used"]
    assert after - before == 41


def test_a_chat_model_is_not_an_embeddings_model(embedder):
    with pytest.raises(openai.BadRequestError) as caught:
        embedder.embeddings.create(model="sdk-model", input="hello")

    assert caught.value.code == "model_not_supported"
    assert caught.value.param == "model"


def test_input_of_another_shape_is_a_bad_request(embedder):
    with pytest.raises(openai.BadRequestError) as caught:
        embedder.embeddings.create(model="sdk-embed", input=[])

    assert caught.value.code == "invalid_request"
    assert caught.value.param == "input"
