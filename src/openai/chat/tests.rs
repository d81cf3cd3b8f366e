//! The request parser and writer: what is read, what is written back.

use super::*;

/// The error's param, and whether it is a shape error (rather than one of
/// JSON syntax, which names no field).
fn parse_err(body: &str) -> (bool, Option<String>) {
    let e = ChatRequest::parse(body.as_bytes()).expect_err("should fail");
    (!e.message.is_empty(), e.param)
}

#[test]
fn reads_the_fields_iris_needs() {
    let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"https://x/a.png","detail":"low"}}]}],"extra":{"kept":1}}"#;
    let request = ChatRequest::parse(body).expect("valid");
    assert_eq!(request.model, "m");
    assert!(request.stream && request.include_usage);
    assert_eq!(request.completion_cap, Some(50));
    assert_eq!(request.image_count(), 1);
    let (at, image) = request.images().next().expect("image");
    assert_eq!(at.to_string(), "messages[0].content[1].image_url.url");
    assert_eq!(image.url, "https://x/a.png");
    assert_eq!(image.detail.as_deref(), Some("low"));
    assert_eq!(request.messages[0].texts().collect::<Vec<_>>(), ["hi"]);
    assert_eq!(
        request.to_body(),
        body.to_vec(),
        "unchanged request is written back as sent"
    );
}

#[test]
fn rewritten_bodies_keep_every_field_of_every_level() {
    let body = br#"{"model":"a","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"t"}]},{"role":"user","content":[{"image_url":{"url":"https://x/b.png"},"type":"input_audio"},{"type":"text","text":"caf\u00e9","cache":1},{"type":"image_url","image_url":{"url":"https://x/a.png","extra":[1]}}]}]}"#;
    let mut request = ChatRequest::parse(body).expect("valid");
    assert_eq!(request.image_count(), 1, "only image_url parts are images");
    request.set_model("b");
    let written: serde_json::Value =
        serde_json::from_slice(&request.to_body()).expect("valid JSON");
    let mut expected: serde_json::Value = serde_json::from_slice(body).expect("json");
    expected["model"] = "b".into();
    assert_eq!(written, expected);
}

#[test]
fn max_completion_tokens_wins_over_max_tokens() {
    let request = ChatRequest::parse(
        br#"{"model":"m","max_tokens":5,"max_completion_tokens":9,"messages":[{"role":"user","content":"x"}]}"#,
    )
    .expect("valid");
    assert_eq!(request.completion_cap, Some(9));
}

#[test]
fn rewrites_only_what_changed() {
    let body = br#"{"model":"alias","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"image_url","image_url":{"detail":"high","url":"https://x/a.png"},"x":1}]}],"stream":true,"stream_options":{"other":2}}"#;
    let mut request = ChatRequest::parse(body).expect("valid");
    request.set_model("real-model");
    request.request_stream_usage();
    for (param, image) in request.images_mut() {
        assert_eq!(param.to_string(), "messages[1].content[0].image_url.url");
        image.set_url("data:image/png;base64,AAAA".into());
        image.strip_detail();
    }
    let written = String::from_utf8(request.to_body()).expect("utf8");
    assert_eq!(
        written,
        r#"{"model":"real-model","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"},"x":1}]}],"stream":true,"stream_options":{"other":2,"include_usage":true}}"#
    );
}

#[test]
fn shared_and_owned_urls_are_written_as_json_strings() {
    let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/a.png"}},{"type":"image_url","image_url":{"url":"https://x/b.png","detail":"low"}}]}]}"#;
    let mut request = ChatRequest::parse(body).expect("valid");
    let shared = Arc::new("data:image/png;base64,iVBORw0KGgo=".to_owned());
    let mut params = Vec::new();
    for (i, (param, image)) in request.images_mut().enumerate() {
        params.push(param.to_string());
        if i == 0 {
            image.set_url_shared(Arc::clone(&shared));
        } else {
            image.set_url("needs \"escaping\"".into());
        }
    }
    assert_eq!(
        params,
        [
            "messages[0].content[0].image_url.url",
            "messages[0].content[1].image_url.url"
        ]
    );
    let with_params: Vec<_> = request
        .images()
        .map(|(at, image)| (at, image.url.to_string()))
        .collect();
    assert_eq!(with_params[0].1, *shared);
    assert_eq!(
        with_params[1].0,
        ImageAt {
            message: 0,
            part: 1
        }
    );
    let written: serde_json::Value =
        serde_json::from_slice(&request.to_body()).expect("valid JSON");
    assert_eq!(
        written["messages"][0]["content"][0]["image_url"]["url"],
        *shared
    );
    assert_eq!(
        written["messages"][0]["content"][1]["image_url"],
        serde_json::json!({"url": "needs \"escaping\"", "detail": "low"})
    );
}

#[test]
fn bad_requests_name_their_param() {
    assert!(parse_err("not json").0);
    assert!(parse_err("[1]").0);
    assert_eq!(parse_err(r#"{"messages":[]}"#).1.as_deref(), Some("model"));
    assert_eq!(
        parse_err(r#"{"model":3,"messages":[]}"#).1.as_deref(),
        Some("model")
    );
    assert_eq!(parse_err(r#"{"model":"m"}"#).1.as_deref(), Some("messages"));
    assert_eq!(
        parse_err(r#"{"model":"m","messages":{}}"#).1.as_deref(),
        Some("messages")
    );
    assert_eq!(
        parse_err(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":5}}]}]}"#)
            .1
            .as_deref(),
        Some("messages[0].content[0].image_url.url")
    );
    assert_eq!(
        parse_err(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":5}]}]}"#
        )
        .1
        .as_deref(),
        Some("messages[0].content[0].text")
    );
    assert_eq!(
        parse_err(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#)
            .1
            .as_deref(),
        Some("messages[0].content[0].image_url")
    );
    assert_eq!(
        parse_err(r#"{"model":"m","messages":[1]}"#).1.as_deref(),
        Some("messages[0]")
    );
    assert_eq!(
        parse_err(r#"{"model":"m","messages":[{"content":{}}]}"#)
            .1
            .as_deref(),
        Some("messages[0].content")
    );
    assert_eq!(
        parse_err(r#"{"model":"m","messages":[{"content":"x"}],"max_tokens":-1}"#)
            .1
            .as_deref(),
        Some("max_tokens")
    );
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let depth = 200_000;
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"x":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert!(parse_err(&body).0);
}

/// Found by the `chat_body` fuzz target: a part whose `type` turns from
/// `image_url` to another kind between two `image_url` fields had its second
/// (raw) `image_url` overwritten by the first (parsed) one when the body was
/// rewritten, so the upstream read another value than the client sent.
#[test]
fn a_raw_field_beside_a_parsed_one_of_the_same_name_is_written_as_sent() {
    let body = br#"{"model":"a","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/b.png"},"type":"input_audio","image_url":{"url":"https://x/a.png","extra":[1]}}]}]}"#;
    let mut request = ChatRequest::parse(body).expect("valid");
    assert_eq!(request.image_count(), 0, "the part's last type is no image");
    request.set_model("b");
    let written = String::from_utf8(request.to_body()).expect("utf8");
    assert_eq!(
        written,
        r#"{"model":"b","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/b.png"},"type":"input_audio","image_url":{"url":"https://x/a.png","extra":[1]}}]}]}"#
    );
}
