"""Errors Iris produces itself, as the Python SDK's exception classes see them."""

import openai
import pytest

from iris_harness import DEFAULT_CLIENTS, Client

MESSAGES = [{"role": "user", "content": "Say hello"}]


def test_responses_api_is_a_clear_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="sdk-model", input="Say hello")

    error = caught.value
    assert error.status_code == 400
    assert error.code == "unsupported_api"
    assert "POST /v1/chat/completions" in error.message
    assert error.request_id  # every response carries x-request-id


def test_wrong_key_is_an_authentication_error(make_client):
    wrong = make_client("not-a-configured-key")

    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model="sdk-model", messages=MESSAGES)

    error = caught.value
    assert error.status_code == 401
    assert error.code == "invalid_api_key"
    assert "not-a-configured-key" not in str(error.body)
    assert error.request_id


def test_wrong_key_cannot_list_models(make_client):
    with pytest.raises(openai.AuthenticationError):
        make_client("not-a-configured-key").models.list()


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)

    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_model_outside_the_clients_list_is_permission_denied(iris, make_client):
    restricted = make_client(iris.key("restricted"))

    with pytest.raises(openai.PermissionDeniedError) as caught:
        restricted.chat.completions.create(model="sdk-model", messages=MESSAGES)

    assert caught.value.status_code == 403
    assert caught.value.code == "model_not_allowed"


def test_an_api_iris_does_not_serve_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.moderations.create(input="Say hello")

    assert caught.value.code == "not_found"
    assert "/v1/moderations" in caught.value.message


def test_n_outside_openais_range_is_a_bad_request_naming_it(client):
    # Reserved as what is forwarded: an n the upstream would read as 129
    # choices is refused rather than reserved as fewer.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sdk-model", messages=MESSAGES, n=129)

    assert caught.value.code == "invalid_request"
    assert caught.value.param == "n"


def test_a_url_outside_an_image_part_is_a_bad_request_naming_it(client):
    content = [
        {"type": "text", "text": "Summarise this file."},
        {"type": "file", "file": {"file_url": "http://127.0.0.1:9/a.pdf", "filename": "a.pdf"}},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="sdk-model", messages=[{"role": "user", "content": content}]
        )

    assert caught.value.code == "invalid_request"
    assert caught.value.param == "messages[0].content[1].file.file_url"


def test_a_url_spelled_without_slashes_is_refused_too(client):
    # URL parsers (and fetchers built on them) read `http:host/x` as
    # `http://host/x`.
    content = [
        {"type": "text", "text": "Summarise this file."},
        {"type": "file", "file": {"file_url": "http:127.0.0.1:9/a.pdf", "filename": "a.pdf"}},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="sdk-model", messages=[{"role": "user", "content": content}]
        )

    assert caught.value.code == "invalid_request"
    assert caught.value.param == "messages[0].content[1].file.file_url"


def test_a_field_iris_reads_given_in_another_case_is_a_bad_request_naming_it(client):
    # Go's encoding/json would read "Model" as "model": another model than
    # the one Iris checked.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="sdk-model", messages=MESSAGES, extra_body={"Model": "other-model"}
        )

    assert caught.value.code == "invalid_request"
    assert caught.value.param == "Model"
    assert "only in case" in caught.value.message


def test_an_upstream_error_echoing_iris_key_reaches_the_sdk_with_the_key_blanked_out(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="sdk-model",
            messages=MESSAGES,
            # The mock's 400 echoes the Authorization header it received.
            extra_headers={"x-mock-echo-auth": "400"},
        )

    error = caught.value
    assert error.status_code == 400
    assert error.code == "invalid_api_key", "the upstream's own error, passed through"
    assert "upstream-secret-key" not in error.response.text
    assert "Bearer " + "*" * len("upstream-secret-key") in error.message


def test_an_upstream_refusing_iris_key_is_a_502_that_names_no_key(start_iris, make_client):
    # An Iris of its own: the refusal cools the deployment down for a while.
    iris = start_iris()

    with pytest.raises(openai.APIStatusError) as caught:
        make_client(target=iris).chat.completions.create(
            model="sdk-model",
            messages=MESSAGES,
            # The mock's 401 echoes the Authorization header it received.
            extra_headers={"x-mock-echo-auth": "401"},
        )

    error = caught.value
    assert isinstance(error, openai.InternalServerError)
    assert error.status_code == 502
    assert error.code == "upstream_auth_failed"
    assert error.type == "api_error"
    assert "api_key" in error.message
    assert "upstream-secret-key" not in error.response.text
    assert "set-cookie" not in error.response.headers
    assert error.request_id


@pytest.fixture(scope="module")
def policed(start_iris):
    """Iris with a key past its expiry and a key for another network."""
    return start_iris(
        clients=[
            *DEFAULT_CLIENTS,
            Client("contractor", "iris-sdk-expired-key", expires_at="2020-01-01T00:00:00Z"),
            Client("cluster", "iris-sdk-cluster-key", allowed_networks=["10.0.0.0/8"]),
        ]
    )


def test_an_expired_key_is_an_authentication_error(policed, make_client):
    expired = make_client(policed.key("contractor"), target=policed)

    with pytest.raises(openai.AuthenticationError) as caught:
        expired.chat.completions.create(model="sdk-model", messages=MESSAGES)

    assert caught.value.status_code == 401
    assert caught.value.code == "key_expired"
    assert caught.value.request_id


def test_a_key_from_outside_its_networks_is_permission_denied(policed, make_client):
    outside = make_client(policed.key("cluster"), target=policed)

    with pytest.raises(openai.PermissionDeniedError) as caught:
        outside.chat.completions.create(model="sdk-model", messages=MESSAGES)

    assert caught.value.status_code == 403
    assert caught.value.code == "client_network_forbidden"
    assert "127.0.0.1" in caught.value.message
    # The same server answers the other clients as before.
    assert make_client(policed.key("sdk"), target=policed).models.list().data
