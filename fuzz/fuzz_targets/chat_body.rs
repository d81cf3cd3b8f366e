//! The chat-completion body: parse, the image-part walk, and the rewrite.
//!
//! The input is a request body as a client sends it. Properties:
//! - parsing never panics, whatever the bytes;
//! - a parsed request is unchanged until something is replaced, and walking
//!   its images (even mutably) changes nothing;
//! - the body Iris writes is valid JSON meaning what the client sent (same
//!   `serde_json::Value`), parses again, and writes back byte-identical
//!   (so a body Iris wrote goes upstream exactly as it is), its long
//!   strings spliced from the received body or copied alike;
//! - a rewritten body (model renamed, stream usage asked for, image URLs
//!   replaced, `detail` stripped) is valid JSON that parses again with
//!   exactly those changes and nothing else moved.
#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use iris::budget::estimate;
use iris::openai::chat::{ChatRequest, ImageAt};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    // As the server holds it: the body Iris writes splices long strings
    // from it.
    let received = Bytes::copy_from_slice(body);
    let Ok(request) = ChatRequest::parse(&received) else {
        return;
    };
    assert!(!request.changed(), "a request just parsed is unchanged");
    let original: Option<Value> = serde_json::from_slice(body).ok();

    // The walk, read-only, and what the estimate does with it.
    let images: Vec<(ImageAt, String, Option<String>)> = request
        .images()
        .map(|(at, image)| {
            let _ = at.to_string();
            (
                at,
                image.url.to_string(),
                image.detail.as_deref().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(images.len(), request.image_count());
    for message in &request.messages {
        let _ = message.texts().count();
    }
    let _ = estimate::estimate(&request, 1000);

    // Unchanged: written back meaning the same, and a fixpoint.
    if let Some(value) = &original {
        check_walk(value, &images);
    }
    let written = request.to_body(&received).to_bytes();
    assert_eq!(
        written,
        request.to_body(&Bytes::new()).to_bytes(),
        "spliced or copied, the same text"
    );
    check_written(&written, original.as_ref());
    let reparsed = reparse(&written);
    assert_eq!(reparsed.model, request.model);
    assert_eq!(reparsed.stream, request.stream);
    assert_eq!(reparsed.include_usage, request.include_usage);
    assert_eq!(reparsed.completion_cap, request.completion_cap);
    assert_eq!(
        walk(&reparsed),
        images,
        "the same images at the same places"
    );
    assert_eq!(
        reparsed.to_body(&written).to_bytes(),
        written,
        "Iris's own body writes back byte-identical"
    );

    // Walking mutably without changing anything changes nothing.
    let mut request = ChatRequest::parse(&received).expect("parsed once, parses again");
    assert_eq!(request.images_mut().count(), images.len());
    assert!(!request.changed(), "an untouched walk changes nothing");

    // Every rewrite the gateway makes, one after another.
    request.set_model("renamed \"model\" \u{e9}\u{1F600}\n");
    let renamed = request.to_body(&received).to_bytes();
    // What the renamed body should mean: the original with the new model.
    let renamed_value = original.clone().map(|mut value| {
        value["model"] = Value::from("renamed \"model\" \u{e9}\u{1F600}\n");
        value
    });
    check_written(&renamed, renamed_value.as_ref());
    let again = reparse(&renamed);
    assert_eq!(again.model, "renamed \"model\" \u{e9}\u{1F600}\n");
    assert_eq!(walk(&again), images);

    request.request_stream_usage();
    let with_usage_body = request.to_body(&received).to_bytes();
    let with_usage_value = renamed_value.map(|mut value| {
        let options = &mut value["stream_options"];
        if !options.is_object() {
            *options = serde_json::json!({});
        }
        options["include_usage"] = Value::Bool(true);
        value
    });
    check_written(&with_usage_body, with_usage_value.as_ref());
    let with_usage = reparse(&with_usage_body);
    assert!(with_usage.include_usage, "stream usage was asked for");
    assert_eq!(with_usage.stream, request.stream);

    let shared = Arc::new("data:image/png;base64,AAAA".to_owned());
    for (i, (_, image)) in request.images_mut().enumerate() {
        match i % 3 {
            0 => image.set_url(format!("data:image/jpeg;base64,{i}\"\\/")),
            1 => image.set_url_shared(Arc::clone(&shared)),
            _ => image.strip_detail(),
        }
    }
    assert!(request.changed());
    let rewritten = request.to_body(&received).to_bytes();
    let rewritten_value = with_usage_value.map(|mut value| {
        for (i, (at, _, _)) in images.iter().enumerate() {
            let image = &mut value["messages"][at.message]["content"][at.part]["image_url"];
            match i % 3 {
                0 => image["url"] = Value::from(format!("data:image/jpeg;base64,{i}\"\\/")),
                1 => image["url"] = Value::from(shared.as_str()),
                _ => {
                    if let Some(object) = image.as_object_mut() {
                        object.remove("detail");
                    }
                }
            }
        }
        value
    });
    check_written(&rewritten, rewritten_value.as_ref());
    let last = reparse(&rewritten);
    let after = walk(&last);
    assert_eq!(after.len(), images.len());
    for (i, ((at, url, detail), (at2, url2, detail2))) in images.iter().zip(&after).enumerate() {
        assert_eq!(at, at2);
        match i % 3 {
            0 => assert_eq!(*url2, format!("data:image/jpeg;base64,{i}\"\\/")),
            1 => assert_eq!(url2, shared.as_str()),
            _ => {
                assert_eq!(url2, url);
                assert_eq!(*detail2, None);
            }
        }
        if i % 3 != 2 {
            assert_eq!(detail2, detail);
        }
    }
});

/// The images of a request: where, which URL, which detail.
fn walk(request: &ChatRequest<'_>) -> Vec<(ImageAt, String, Option<String>)> {
    request
        .images()
        .map(|(at, image)| {
            (
                at,
                image.url.to_string(),
                image.detail.as_deref().map(str::to_owned),
            )
        })
        .collect()
}

/// Each image the walk found is an `image_url` part at that place in an
/// independent parse of the body, with that URL; and every `image_url` part
/// there is one the walk found.
fn check_walk(body: &Value, images: &[(ImageAt, String, Option<String>)]) {
    let mut expected = Vec::new();
    let messages = body.get("messages").and_then(Value::as_array);
    for (m, message) in messages.into_iter().flatten().enumerate() {
        let parts = message.get("content").and_then(Value::as_array);
        for (p, part) in parts.into_iter().flatten().enumerate() {
            if part.get("type").and_then(Value::as_str) == Some("image_url") {
                let url = part.pointer("/image_url/url").and_then(Value::as_str);
                expected.push((m, p, url.map(str::to_owned)));
            }
        }
    }
    let found: Vec<_> = images
        .iter()
        .map(|(at, url, _)| (at.message, at.part, Some(url.clone())))
        .collect();
    assert_eq!(
        found, expected,
        "the walk finds the image parts serde_json sees"
    );
}

/// A body Iris wrote is valid JSON, meaning `expected` when given. Only
/// asked of bodies whose input was valid to serde_json: fields Iris keeps
/// raw are forwarded as sent, and JSON's grammar allows what serde_json
/// refuses (a lone surrogate escape, `"\ude00"`).
fn check_written(written: &[u8], expected: Option<&Value>) {
    if expected.is_none() {
        return;
    }
    let value: Value = match serde_json::from_slice(written) {
        Ok(value) => value,
        Err(e) => panic!(
            "Iris wrote invalid JSON ({e}): {}",
            String::from_utf8_lossy(written)
        ),
    };
    assert_eq!(
        Some(&value),
        expected,
        "the written body means what was sent"
    );
}

/// A body Iris wrote is a chat request again.
fn reparse(written: &[u8]) -> ChatRequest<'_> {
    match ChatRequest::parse(written) {
        Ok(request) => request,
        Err(e) => panic!(
            "Iris wrote a body it refuses ({e:?}): {}",
            String::from_utf8_lossy(written)
        ),
    }
}
