//! Properties of the client frame parser and the body rules (docs/protocol.md, "Client frames"
//! and "Bad input"), over generated input: any text is either a command or an error that says
//! why; every frame built from the command types round-trips; a field of the wrong JSON type is
//! refused naming that field; blank and over-long bodies are refused with their codes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed step should panic

use proptest::prelude::*;
use protocol::frames::{check_body, parse_client_frame, BodyError, ClientFrame, ErrorCode, Req};
use serde_json::{json, Value};

/// The body limit of docs/protocol.md ("Limits and slow consumers").
const MAX_BODY: usize = 4000;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 256, ..ProptestConfig::default() }
}

// === generators ===

fn room() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn user() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,64}"
}

/// 1–64 characters of any kind but control characters.
fn client_msg_id() -> impl Strategy<Value = String> {
    "[^\\p{Cc}]{1,64}"
}

/// A body with something other than whitespace in it, within the limit.
fn body() -> impl Strategy<Value = String> {
    ("\\PC{0,40}", "[^\\s]", "\\PC{0,40}", 0usize..50)
        .prop_map(|(before, visible, after, pad)| format!("{before}{visible}{}{after}", " ".repeat(pad)))
}

fn req() -> impl Strategy<Value = Option<Req>> {
    prop_oneof![Just(None), any::<i64>().prop_map(|i| Some(Req::Int(i))), ".{0,20}".prop_map(|s| Some(Req::Str(s)))]
}

fn frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (proptest::option::of(user()), proptest::option::of("[A-Za-z0-9_.-]{1,200}"))
            .prop_map(|(user, token)| ClientFrame::Hello { user, token }),
        (room(), proptest::option::of(any::<u64>())).prop_map(|(room, since)| ClientFrame::Join { room, since }),
        room().prop_map(|room| ClientFrame::Leave { room }),
        (room(), client_msg_id(), body(), proptest::option::of("[0-9a-f-]{0,60}")).prop_map(
            |(room, client_msg_id, body, traceparent)| ClientFrame::Send { room, client_msg_id, body, traceparent }
        ),
        (
            room(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(room, before, after, limit)| ClientFrame::History { room, before, after, limit }),
        room().prop_map(|room| ClientFrame::Typing { room }),
        Just(ClientFrame::Ping),
    ]
}

/// The frame as a JSON object, with `req` when there is one.
fn to_object(frame: &ClientFrame, req: &Option<Req>) -> serde_json::Map<String, Value> {
    let Value::Object(mut object) = serde_json::to_value(frame).unwrap() else { panic!("a frame is an object") };
    if let Some(req) = req {
        object.insert("req".into(), serde_json::to_value(req).unwrap());
    }
    object
}

/// The fields a frame of this type reads: (name, is an integer, is required).
fn fields_of(frame_type: &str) -> &'static [(&'static str, bool, bool)] {
    match frame_type {
        "hello" => &[("user", false, false), ("token", false, false)],
        "join" => &[("room", false, true), ("since", true, false)],
        "leave" | "typing" => &[("room", false, true)],
        "send" => &[
            ("room", false, true),
            ("client_msg_id", false, true),
            ("body", false, true),
            ("traceparent", false, false),
        ],
        "history" => &[("room", false, true), ("before", true, false), ("after", true, false), ("limit", true, false)],
        _ => &[],
    }
}

/// A JSON value that is not a string (`null` only where the field is required).
fn not_a_string(required: bool) -> BoxedStrategy<Value> {
    let mut choices = vec![
        any::<i64>().prop_map(Value::from).boxed(),
        any::<bool>().prop_map(Value::from).boxed(),
        Just(json!([])).boxed(),
        ".{0,8}".prop_map(|s| json!([s])).boxed(),
        Just(json!({"a": 1})).boxed(),
        (-1e9f64..1e9).prop_map(Value::from).boxed(),
    ];
    if required {
        choices.push(Just(Value::Null).boxed());
    }
    proptest::strategy::Union::new(choices).boxed()
}

/// A JSON value that is not an integer in the field's range.
fn not_an_integer(field: &str) -> BoxedStrategy<Value> {
    let mut choices = vec![
        (i64::MIN..0).prop_map(Value::from).boxed(),
        "\\PC{0,8}".prop_map(Value::from).boxed(),
        any::<bool>().prop_map(Value::from).boxed(),
        Just(json!([1])).boxed(),
        Just(json!({})).boxed(),
        (0.5f64..1e9).prop_filter("not whole", |f| f.fract() != 0.0).prop_map(Value::from).boxed(),
    ];
    if field == "limit" {
        choices.push((u64::from(u32::MAX) + 1..=u64::MAX).prop_map(Value::from).boxed());
    }
    proptest::strategy::Union::new(choices).boxed()
}

/// A frame with exactly one of its fields given a value of the wrong type: (object, field).
fn mistyped() -> impl Strategy<Value = (serde_json::Map<String, Value>, &'static str)> {
    (frame(), req(), any::<prop::sample::Index>())
        .prop_filter("has fields", |(frame, _, _)| !matches!(frame, ClientFrame::Ping))
        .prop_flat_map(|(frame, req, pick)| {
            let object = to_object(&frame, &req);
            let frame_type = object["type"].as_str().unwrap().to_owned();
            let (field, integer, required) = *pick.get(fields_of(&frame_type));
            let wrong = if integer { not_an_integer(field) } else { not_a_string(required) };
            wrong.prop_map(move |value| {
                let mut object = object.clone();
                object.insert(field.to_owned(), value);
                (object, field)
            })
        })
}

/// Arbitrary JSON objects with a known or unknown `type` and a mix of known fields of any type:
/// deeper than arbitrary text gets.
fn frame_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let key = prop::sample::select(vec![
        "type",
        "req",
        "room",
        "user",
        "token",
        "since",
        "client_msg_id",
        "body",
        "traceparent",
        "before",
        "after",
        "limit",
        "other",
    ]);
    let kind = prop::sample::select(vec!["hello", "join", "leave", "send", "history", "typing", "ping", "nope", ""]);
    (kind, prop::collection::vec((key, value), 0..6)).prop_map(|(kind, fields)| {
        let mut object = serde_json::Map::new();
        object.insert("type".into(), Value::from(kind));
        for (key, value) in fields {
            object.insert(key.to_owned(), value);
        }
        Value::Object(object)
    })
}

// === properties ===

proptest! {
    #![proptest_config(config())]

    /// Any text is parsed into a command or refused with a reason; nothing panics.
    #[test]
    fn any_text_is_a_command_or_a_reason(text in "\\PC{0,200}|.{0,200}") {
        check_total(&text)?;
    }

    /// Any bytes a client might send, read as text the way a lenient reader would.
    #[test]
    fn any_bytes_are_a_command_or_a_reason(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_total(&String::from_utf8_lossy(&bytes))?;
    }

    /// Objects that look like frames, with fields of any type: a command that means what it
    /// says, or a reason.
    #[test]
    fn frame_like_objects_are_a_command_or_a_reason(value in frame_like()) {
        let text = value.to_string();
        check_total(&text)?;
        if let Ok((frame, _)) = parse_client_frame(&text) {
            // What was accepted says the same thing when written out and read again.
            let again = parse_client_frame(&serde_json::to_string(&frame).unwrap()).unwrap();
            prop_assert_eq!(again.0, frame);
        }
    }

    /// Every frame built from the command types, with any request tag, reads back as itself.
    #[test]
    fn every_valid_frame_round_trips(frame in frame(), req in req()) {
        let text = Value::Object(to_object(&frame, &req)).to_string();
        let (parsed, parsed_req) = parse_client_frame(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(parsed, frame);
        prop_assert_eq!(parsed_req, req);
    }

    /// A field holding a value of the wrong JSON type is refused with an error naming it, and
    /// the request tag is still echoed.
    #[test]
    fn a_mistyped_field_is_refused_by_name((object, field) in mistyped()) {
        let req = object.get("req").cloned().map(|r| serde_json::from_value::<Req>(r).unwrap());
        let text = Value::Object(object).to_string();
        let error = match parse_client_frame(&text) {
            Ok(parsed) => return Err(TestCaseError::fail(format!("{text} accepted as {parsed:?}"))),
            Err(error) => error,
        };
        prop_assert!(error.message.contains(&format!("`{field}`")), "{} does not name `{}`: {}", text, field, error.message);
        prop_assert_eq!(error.req, req);
    }

    /// A body with something visible, up to the limit, is accepted as sent.
    #[test]
    fn a_body_within_the_limit_is_accepted(body in body()) {
        prop_assert_eq!(check_body(&body, MAX_BODY), Ok(()));
    }

    /// Empty or whitespace-only bodies (any Unicode whitespace) are `bad_request`, whatever
    /// their length.
    #[test]
    fn a_blank_body_is_bad_request(body in prop::collection::vec(
        prop::sample::select(vec![' ', '\t', '\n', '\r', '\u{a0}', '\u{2003}', '\u{3000}', '\u{2028}']),
        0..MAX_BODY + 100,
    ).prop_map(String::from_iter)) {
        let refused = check_body(&body, MAX_BODY).unwrap_err();
        prop_assert_eq!(refused, BodyError::Blank);
        prop_assert_eq!(refused.code(), ErrorCode::BadRequest);
    }

    /// A body over the limit in characters (not bytes) is `too_large`; one at the limit is not.
    #[test]
    fn a_body_over_the_limit_is_too_large(
        filler in "[a-zé\u{1F600} ]",
        extra in prop_oneof![Just(0usize), 1usize..500],
    ) {
        let body = format!("x{}", filler.repeat(MAX_BODY - 1 + extra));
        let result = check_body(&body, MAX_BODY);
        if extra == 0 {
            prop_assert_eq!(result, Ok(()), "exactly {} characters", MAX_BODY);
        } else {
            let refused = result.unwrap_err();
            prop_assert_eq!(refused, BodyError::TooLong { max: MAX_BODY });
            prop_assert_eq!(refused.code(), ErrorCode::TooLarge);
            prop_assert_eq!(refused.to_string(), format!("body exceeds {MAX_BODY} characters"));
        }
    }
}

/// The parser's totality: a command, or an error with a message (and the error names a reason
/// a person can act on, never an empty string).
fn check_total(text: &str) -> Result<(), TestCaseError> {
    match parse_client_frame(text) {
        Ok(_) => Ok(()),
        Err(error) => {
            prop_assert!(!error.message.trim().is_empty(), "empty reason for {text:?}");
            Ok(())
        }
    }
}
