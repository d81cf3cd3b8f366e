"""`models.list()` and `models.retrieve()` through the Python SDK."""

import openai
import pytest


def test_list_returns_the_configured_models_in_order(client):
    models = list(client.models.list())

    assert [m.id for m in models] == ["sdk-model", "other-model", "vendor/slashed-model"]
    assert all(m.object == "model" for m in models)


def test_list_shows_only_the_clients_models(iris, make_client):
    models = make_client(iris.key("restricted")).models.list()

    assert [m.id for m in models] == ["other-model"]


def test_retrieve_a_model(client):
    model = client.models.retrieve("sdk-model")

    assert model.id == "sdk-model"
    assert model.object == "model"


def test_retrieve_a_model_whose_id_has_a_slash(client):
    assert client.models.retrieve("vendor/slashed-model").id == "vendor/slashed-model"


def test_retrieve_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")

    assert caught.value.code == "model_not_found"
