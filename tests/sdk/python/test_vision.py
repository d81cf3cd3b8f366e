"""Vision requests written as OpenAI's documentation writes them, through an
upstream that takes only inlined images (`inline_images`, `strip_detail`,
JPEG/PNG/WebP). The mock answers with the body it received (`x-mock-echo`),
so each test checks what reached the upstream."""

import base64
import json

import openai
import pytest

from iris_harness import IMAGES, Client, Model

ECHO = {"x-mock-echo": "1"}
IMAGE_URL_PARAM = "messages[0].content[1].image_url.url"


@pytest.fixture(scope="module")
def vision_iris(start_iris):
    return start_iris(
        models=[Model("vision-model")],
        clients=[Client("vision", "iris-sdk-vision-key")],
        upstream_toml="\n".join(
            [
                "inline_images = true",
                "strip_detail = true",
                'image_formats = ["jpeg", "png", "webp"]',
            ]
        ),
        # The test image host is on loopback, refused unless allowed.
        extra_toml='[images]\nallowed_networks = ["127.0.0.2/32"]',
    )


@pytest.fixture
def vision_client(vision_iris, make_client):
    return make_client(target=vision_iris)


# As in OpenAI's "Images and vision" guide.
def encode_image(image_path):
    with open(image_path, "rb") as image_file:
        return base64.b64encode(image_file.read()).decode("utf-8")


def ask_about(client, image_url: dict, **options):
    return client.chat.completions.create(
        model="vision-model",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What's in this image?"},
                    {"type": "image_url", "image_url": image_url},
                ],
            }
        ],
        **options,
    )


def forwarded_image(completion) -> dict:
    """The `image_url` part the upstream received, from the mock's echo."""
    sent = json.loads(completion.choices[0].message.content)
    content = sent["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "What's in this image?"}
    assert content[1]["type"] == "image_url"
    return content[1]["image_url"]


def split_data_uri(uri: str) -> tuple[str, bytes]:
    head, _, data = uri.partition(",")
    assert head.startswith("data:") and head.endswith(";base64"), uri[:80]
    return head.removeprefix("data:").removesuffix(";base64"), base64.b64decode(data, validate=True)


def pixel_size(image: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR or a JPEG's frame header."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")
    assert image.startswith(b"\xff\xd8"), image[:16]
    at = 2
    while at + 9 < len(image):
        marker, length = image[at + 1], int.from_bytes(image[at + 2 : at + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):  # start of frame: height, then width
            return int.from_bytes(image[at + 7 : at + 9], "big"), int.from_bytes(image[at + 5 : at + 7], "big")
        at += 2 + length
    raise AssertionError("no JPEG frame header")


def test_remote_png_reaches_the_upstream_inlined_byte_for_byte(vision_client, image_host):
    completion = ask_about(
        vision_client,
        {"url": image_host.url("cat.png"), "detail": "high"},
        extra_headers=ECHO,
        max_tokens=50,
    )

    image_url = forwarded_image(completion)
    mime, data = split_data_uri(image_url["url"])
    assert mime == "image/png"
    assert data == (IMAGES / "cat.png").read_bytes()
    assert "detail" not in image_url  # strip_detail
    assert "/cat.png" in image_host.paths
    # Fields Iris does not rewrite pass through.
    assert json.loads(completion.choices[0].message.content)["max_tokens"] == 50


def test_remote_gif_is_converted_to_an_accepted_format(vision_client, image_host):
    completion = ask_about(vision_client, {"url": image_host.url("cat.gif")}, extra_headers=ECHO)

    mime, data = split_data_uri(forwarded_image(completion)["url"])
    assert mime in ("image/png", "image/jpeg")
    # The MIME type says what the bytes are.
    assert data.startswith(b"\x89PNG" if mime == "image/png" else b"\xff\xd8")
    assert pixel_size(data) == (40, 24)  # as cat.gif


def test_local_file_as_base64_reaches_the_upstream_unchanged(vision_client):
    base64_image = encode_image(IMAGES / "cat.jpg")

    completion = ask_about(
        vision_client, {"url": f"data:image/jpeg;base64,{base64_image}"}, extra_headers=ECHO
    )

    assert completion.choices[0].finish_reason == "stop"
    mime, data = split_data_uri(forwarded_image(completion)["url"])
    assert mime == "image/jpeg"
    assert data == (IMAGES / "cat.jpg").read_bytes()
    assert pixel_size(data) == (40, 24)


def test_a_png_labelled_jpeg_as_the_guide_writes_it_is_relabelled(vision_client):
    """The guide hard-codes `data:image/jpeg` whatever the file is; the
    upstream gets the type the bytes say."""
    base64_image = encode_image(IMAGES / "cat.png")

    completion = ask_about(
        vision_client, {"url": f"data:image/jpeg;base64,{base64_image}"}, extra_headers=ECHO
    )

    mime, data = split_data_uri(forwarded_image(completion)["url"])
    assert mime == "image/png"
    assert data == (IMAGES / "cat.png").read_bytes()


def test_a_loopback_url_outside_allowed_networks_is_refused(vision_client, mock_upstream):
    before = mock_upstream.chat_requests()

    with pytest.raises(openai.BadRequestError) as caught:
        ask_about(vision_client, {"url": "http://127.0.0.1:1/x.png"})

    error = caught.value
    assert error.status_code == 400
    assert error.code == "image_url_forbidden"
    assert error.param == IMAGE_URL_PARAM
    assert mock_upstream.chat_requests() == before  # nothing went upstream
