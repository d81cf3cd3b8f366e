//! The request parser and writer: what is read, what is written back.

use super::*;

/// The body written for upstream, in one buffer (nothing spliced from a
/// received body: see `long_urls_are_spliced_not_copied`).
fn written(request: &ChatRequest<'_>) -> Vec<u8> {
    request.to_body(&Bytes::new()).to_bytes().to_vec()
}

/// A long data URI is sent by reference: the cache's shared one, and the
/// client's own from the received body, each a piece of its own; the text
/// sent is the same as when everything is copied.
#[test]
fn long_urls_are_spliced_not_copied() {
    let client_uri = format!("data:image/png;base64,{}", "A".repeat(40_000));
    let body = Bytes::from(format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"https://x/a.png"}}}},{{"type":"image_url","image_url":{{"url":"{client_uri}","detail":"low"}}}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,AAAA"}}}}]}}]}}"#
    ));
    let mut request = ChatRequest::parse(&body).expect("valid");
    let shared = Arc::new(format!("data:image/jpeg;base64,{}", "B".repeat(50_000)));
    if let Some((_, image)) = request.images_mut().next() {
        image.set_url_shared(Arc::clone(&shared));
    }
    request.set_model("n");
    let sent = request.to_body(&body);
    // Text, the shared URI, text, the client's URI, the rest (the short
    // URI copied).
    assert_eq!(sent.pieces(), 5);
    let sent = sent.to_bytes();
    assert_eq!(sent, written(&request), "the same text either way");
    let json: serde_json::Value = serde_json::from_slice(&sent).expect("JSON");
    let content = &json["messages"][0]["content"];
    assert_eq!(content[0]["image_url"]["url"], *shared);
    assert_eq!(content[1]["image_url"]["url"], client_uri);
    assert_eq!(content[2]["image_url"]["url"], "data:image/png;base64,AAAA");
    assert_eq!(json["model"], "n");
}

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
        written(&request),
        body.to_vec(),
        "unchanged request is written back as sent"
    );
}

#[test]
fn rewritten_bodies_keep_every_field_of_every_level() {
    let body = br#"{"model":"a","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"t"}]},{"role":"user","content":[{"input_audio":{"data":"AAAA","format":"wav"},"type":"input_audio"},{"type":"text","text":"caf\u00e9","cache":1},{"type":"image_url","image_url":{"url":"https://x/a.png","extra":[1]}}]}]}"#;
    let mut request = ChatRequest::parse(body).expect("valid");
    assert_eq!(request.image_count(), 1, "only image_url parts are images");
    request.set_model("b");
    let written: serde_json::Value =
        serde_json::from_slice(&written(&request)).expect("valid JSON");
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
    let written = String::from_utf8(written(&request)).expect("utf8");
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
        serde_json::from_slice(&written(&request)).expect("valid JSON");
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

/// JSON is UTF-8: a body that is not is refused wherever the stray byte
/// is, in a field Iris reads or in one it would pass on unread.
#[test]
fn a_body_that_is_not_utf8_is_refused_wherever_the_byte_is() {
    let valid = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"x":"ok"}"#;
    assert!(ChatRequest::parse(valid).is_ok());
    for (from, to) in [
        (&b"\"hi\""[..], &b"\"h\xffi\""[..]),
        (b"\"ok\"", b"\"o\xc3k\""),
    ] {
        let at = valid
            .windows(from.len())
            .position(|w| w == from)
            .expect("in body");
        let body = [&valid[..at], to, &valid[at + from.len()..]].concat();
        let error = ChatRequest::parse(&body).expect_err("not UTF-8");
        assert_eq!(error.param, None);
        assert_eq!(
            error.message,
            format!(
                "The request body is not valid JSON: it is not UTF-8 (an invalid byte at offset {}).",
                at + 2
            )
        );
    }
}

/// Found by the `chat_body` fuzz target: a part whose `type` turned from
/// `image_url` to another kind between two `image_url` fields had its second
/// `image_url` overwritten by the first when the body was rewritten. Fields
/// Iris interprets may now appear once, and an `image_url` only in an
/// image_url part.
#[test]
fn an_interpreted_field_given_twice_is_refused_at_every_level() {
    for (body, param) in [
        (
            r#"{"model":"a","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/b.png"},"type":"input_audio","image_url":{"url":"https://x/a.png"}}]}]}"#,
            "messages[0].content[0].type",
        ),
        (
            r#"{"model":"m-b","model":"m-a","messages":[{"content":"x"}]}"#,
            "model",
        ),
        (
            r#"{"model":"m","stream":true,"messages":[{"content":"x"}],"stream":false}"#,
            "stream",
        ),
        (
            r#"{"model":"m","n":1,"n":50,"messages":[{"content":"x"}]}"#,
            "n",
        ),
        (
            r#"{"model":"m","messages":[{"content":"x"}],"messages":[{"content":"y"}]}"#,
            "messages",
        ),
        (
            r#"{"model":"m","max_tokens":1,"max_tokens":25000,"messages":[{"content":"x"}]}"#,
            "max_tokens",
        ),
        (
            r#"{"model":"m","stream_options":{},"stream_options":{"include_usage":true},"messages":[{"content":"x"}]}"#,
            "stream_options",
        ),
        (
            r#"{"model":"m","\u006dodel":"n","messages":[{"content":"x"}]}"#,
            "model",
        ),
        (
            r#"{"model":"m","messages":[{"content":"x","role":"user","content":"y"}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"model":"m","messages":[{"content":[{"type":"image_url","image_url":{"url":"data:,a","url":"http://169.254.169.254/"}}]}]}"#,
            "messages[0].content[0].image_url.url",
        ),
    ] {
        assert_eq!(parse_err(body).1.as_deref(), Some(param), "{body}");
    }
    let other = ChatRequest::parse(br#"{"model":"m","x":1,"x":2,"messages":[{"content":"x"}]}"#)
        .expect("fields Iris does not interpret pass as sent");
    assert_eq!(
        written(&other),
        br#"{"model":"m","x":1,"x":2,"messages":[{"content":"x"}]}"#.to_vec()
    );
}

/// Found by probing as a client: `"Model"` beside `"model"` passed on
/// unread, and Go's `encoding/json` (Ollama, LocalAI, gateways built on
/// it) takes it for `model`: another model than the one Iris checked and
/// priced, or `"N": 128` completions where one was reserved.
#[test]
fn a_field_differing_from_an_interpreted_one_only_in_case_is_refused_at_every_level() {
    for (body, param) in [
        (
            r#"{"model":"m","Model":"other","messages":[{"content":"x"}]}"#,
            "Model",
        ),
        (
            r#"{"Model":"other","model":"m","messages":[{"content":"x"}]}"#,
            "Model",
        ),
        (r#"{"model":"m","N":128,"messages":[{"content":"x"}]}"#, "N"),
        (
            r#"{"model":"m","MAX_TOKENS":1000000,"messages":[{"content":"x"}]}"#,
            "MAX_TOKENS",
        ),
        (
            r#"{"model":"m","Stream":true,"messages":[{"content":"x"}]}"#,
            "Stream",
        ),
        // The characters outside ASCII that Go folds to a letter of one.
        (
            r#"{"model":"m","ſtream":true,"messages":[{"content":"x"}]}"#,
            "ſtream",
        ),
        (
            r#"{"model":"m","max_to\u212Aens":9,"messages":[{"content":"x"}]}"#,
            "max_to\u{212A}ens",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","Content":"x","content":"y"}]}"#,
            "messages[0].Content",
        ),
        (
            r#"{"model":"m","messages":[{"content":[{"type":"text","text":"a","TYPE":"image_url"}]}]}"#,
            "messages[0].content[0].TYPE",
        ),
        (
            r#"{"model":"m","messages":[{"content":[{"type":"image_url","image_url":{"url":"data:,a","URL":"http://169.254.169.254/"}}]}]}"#,
            "messages[0].content[0].image_url.URL",
        ),
    ] {
        let e = ChatRequest::parse(body.as_bytes()).expect_err(body);
        assert_eq!(e.param.as_deref(), Some(param), "{body}");
        assert!(e.message.contains("only in case"), "{body}: {}", e.message);
    }
    // Names Iris does not interpret pass as sent, whatever their case.
    let other =
        br#"{"model":"m","Temperature":1,"modelx":2,"mode":3,"messages":[{"content":"x"}]}"#;
    let parsed = ChatRequest::parse(other).expect("not interpreted: passed on");
    assert_eq!(written(&parsed), other.to_vec());
}

#[test]
fn n_and_the_caps_are_what_openai_takes() {
    // (choices, completion cap) as parsed.
    let with = |fields: &str| {
        let body = format!(r#"{{"model":"m","messages":[{{"content":"x"}}]{fields}}}"#);
        ChatRequest::parse(body.as_bytes()).map(|r| (r.choices, r.completion_cap))
    };
    for n in [
        "\"50\"", "50.0", "[50]", "0", "129", "100000", "-1", "true", "1e2",
    ] {
        let e = with(&format!(r#","n":{n}"#)).expect_err(n);
        assert_eq!(e.param.as_deref(), Some("n"), "{n}");
    }
    assert_eq!(with(r#","n":128"#).expect("valid").0, 128);
    assert_eq!(with(r#","n":null"#).expect("valid").0, 1);
    assert_eq!(with("").expect("valid").0, 1);
    for (field, value) in [
        ("max_tokens", "0"),
        ("max_tokens", "\"5\""),
        ("max_tokens", "5.0"),
        ("max_completion_tokens", "-3"),
        ("max_completion_tokens", "99999999999999999999999"),
    ] {
        let e = with(&format!(r#","{field}":{value}"#)).expect_err(value);
        assert_eq!(e.param.as_deref(), Some(field), "{field}: {value}");
    }
    let both = with(r#","max_completion_tokens":1,"max_tokens":25000"#).expect("valid");
    assert_eq!(both.1, Some(25000), "the larger cap is reserved");
    for (options, param) in [
        (r#"[1]"#, "stream_options"),
        (r#"{"include_usage":"yes"}"#, "stream_options.include_usage"),
        (
            r#"{"include_usage":true,"include_usage":false}"#,
            "stream_options",
        ),
    ] {
        let e = with(&format!(r#","stream":true,"stream_options":{options}"#)).expect_err(options);
        assert_eq!(e.param.as_deref(), Some(param), "{options}");
    }
}

#[test]
fn urls_outside_image_parts_are_refused_with_their_param() {
    let part = |part: &str| {
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},{part}]}}]}}"#
        );
        ChatRequest::parse(body.as_bytes()).map(|_| ())
    };
    for (json, param) in [
        (
            r#"{"type":"input_image","image_url":"http://127.0.0.1:9/a.png"}"#,
            "messages[0].content[1].image_url",
        ),
        (
            r#"{"type":"input_image","url":"http://127.0.0.1:9/a.png"}"#,
            "messages[0].content[1].url",
        ),
        (
            r#"{"type":"file","file":{"file_url":"https://127.0.0.1/a.pdf"}}"#,
            "messages[0].content[1].file.file_url",
        ),
        (
            r#"{"type":"text","text":"see","image_url":{"url":"http://127.0.0.1:9/a.png"}}"#,
            "messages[0].content[1].image_url",
        ),
        (
            r#"{"type":"text","text":"see","image_url":{"url":"data:image/png;base64,AAAA"}}"#,
            "messages[0].content[1].image_url",
        ),
        (
            r#"{"type":"image_url","image_url":{"url":"data:,x","fallback":"http:\/\/127.0.0.1\/"}}"#,
            "messages[0].content[1].image_url.fallback",
        ),
        (
            r#"{"type":"text","text":"x","cache_control":{"ref":["a","h\u0074tps://10.0.0.1/"]}}"#,
            "messages[0].content[1].cache_control.ref[1]",
        ),
    ] {
        let e = part(json).expect_err(json);
        assert_eq!(e.param.as_deref(), Some(param), "{json}");
    }
    for json in [
        r#"{"type":"text","text":"https://example.com/ is in the text"}"#,
        r#"{"type":"input_audio","input_audio":{"data":"AA//AA==","format":"wav"}}"#,
        r#"{"type":"file","file":{"file_id":"file-1","filename":"a.pdf"}}"#,
    ] {
        part(json).expect(json);
    }
}

#[test]
fn the_number_of_messages_and_parts_is_bounded() {
    let limits = RequestLimits {
        max_messages: 3,
        max_content_parts: 4,
    };
    let messages = |n: usize| {
        let list = vec!["{}"; n].join(",");
        format!(r#"{{"model":"m","messages":[{list}]}}"#)
    };
    ChatRequest::parse_within(messages(3).as_bytes(), limits).expect("at the limit");
    let e = ChatRequest::parse_within(messages(4).as_bytes(), limits).expect_err("over");
    assert_eq!(e.param.as_deref(), Some("messages"));
    assert!(e.message.contains("more than 3 messages"), "{}", e.message);

    let parts = r#"{"model":"m","messages":[{"content":[{},{}]},{"content":[{},{},{}]}]}"#;
    let e = ChatRequest::parse_within(parts.as_bytes(), limits).expect_err("5 parts");
    assert_eq!(e.param.as_deref(), Some("messages[1].content"));
    let parts = r#"{"model":"m","messages":[{"content":[{},{}]},{"content":[{},{}]}]}"#;
    ChatRequest::parse_within(parts.as_bytes(), limits).expect("4 parts");
}

/// What a parse holds is bounded by what Iris interprets: a million
/// unknown fields (top level, in a message, in a part) are one run of the
/// body's text each, written back as sent.
#[test]
fn unknown_fields_cost_no_entry_each() {
    let many: String = (0..100_000).map(|i| format!(r#""f{i}":{i},"#)).collect();
    let body = format!(
        r#"{{{many}"model":"m",{many}"messages":[{{{many}"role":"user","content":[{{{many}"type":"text","text":"hi"}}]}}],{many}"z":0}}"#
    );
    let request = ChatRequest::parse(body.as_bytes()).expect("valid");
    assert_eq!(written(&request), body.as_bytes());
    let debug = format!("{request:?}");
    assert!(
        debug.matches("Field(").count() <= 8,
        "interpreted fields only: {}",
        debug.matches("Field(").count()
    );
}

#[test]
fn the_cache_text_leaves_out_delivery_and_user_and_names_images_as_given() {
    let with = |extra: &str, url: &str| {
        format!(
            r#"{{"model":"m",{extra}"messages":[{{"role":"user","content":[{{"type":"text","text":"what?"}},{{"type":"image_url","image_url":{{"url":"{url}","detail":"low"}}}}]}}],"temperature":0}}"#
        )
    };
    let text = |body: &str| {
        let request = ChatRequest::parse(body.as_bytes()).expect("valid");
        let text = request.to_cache_text(&mut |at| {
            (at == ImageAt {
                message: 0,
                part: 1,
            })
            .then(|| "sha256:00".to_owned())
        });
        String::from_utf8(text).expect("utf-8")
    };
    let plain = text(&with("", "https://a/x.png"));
    assert_eq!(
        plain,
        r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what?"},{"type":"image_url","image_url":{"url":"sha256:00","detail":"low"}}]}],"temperature":0}"#
    );
    let delivered = with(
        r#""stream":true,"stream_options":{"include_usage":true},"user":"u-42","#,
        "data:image/png;base64,AAAA",
    );
    assert_eq!(
        text(&delivered),
        plain,
        "stream, stream_options, user and the URL left out"
    );
    // The request as sent upstream keeps them.
    let request = ChatRequest::parse(delivered.as_bytes()).expect("valid");
    assert_eq!(written(&request), delivered.as_bytes());
    // Anything else that differs is another text.
    assert_ne!(text(&with(r#""n":2,"#, "https://a/x.png")), plain);
    // `user` is read now, so it may be given once only.
    let (_, param) = parse_err(r#"{"model":"m","user":"a","user":"b","messages":[]}"#);
    assert_eq!(param.as_deref(), Some("user"));
}
