//! Property tests of the wire contract (DESIGN sections 2 and 3): key tokens, the two event
//! codecs, and the row ↔ struct conversion.

use std::collections::BTreeMap;

use jetsync::codec::{decode, decode_message, encode, DecodeError, Format};
use jetsync::{decode_key, encode_key, from_row, to_row, Change, Event, Row, SubjectError, Value};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Key tokens
// ---------------------------------------------------------------------------------------------

/// Characters that stress the encoding: token characters, subject metacharacters, `=`, and
/// arbitrary unicode.
fn key_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::char::ranges(vec!['a'..='z', 'A'..='Z', '0'..='9'].into()),
        1 => Just('_'),
        1 => Just('-'),
        1 => Just('.'),
        1 => Just(' '),
        1 => Just('*'),
        1 => Just('>'),
        1 => Just('='),
        1 => Just('$'),
        2 => any::<char>(),
    ]
}

/// Keys of 1 to 512 bytes: a mix of plain-token keys (around the 128-byte boundary too), keys
/// needing encoding, and keys of exactly 512 bytes.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_-]{1,130}",
        prop::collection::vec(key_char(), 1..=600).prop_map(|chars| {
            let mut key = String::new();
            for c in chars {
                if key.len() + c.len_utf8() > 512 {
                    break;
                }
                key.push(c);
            }
            key
        }),
        "[a-z. ]{512}",
        "[A-Za-z0-9_-]{512}",
    ]
}

fn is_valid_single_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'='))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn key_round_trips(key in key()) {
        prop_assume!(!key.is_empty() && key.len() <= 512);
        let token = encode_key(&key).unwrap();
        prop_assert!(is_valid_single_token(&token), "token {token:?}");
        prop_assert!(!token[1..].contains('='), "'=' only leads: {token:?}");
        prop_assert_eq!(decode_key(&token).unwrap(), key);
    }

    #[test]
    fn key_encoding_is_injective(keys in prop::collection::vec(key(), 1..16), extra in key()) {
        // Model: token → key. A token seen twice must come from the same key.
        let mut seen = BTreeMap::<String, String>::new();
        let mut all = keys.clone();
        // Near neighbours of generated keys are the likeliest collisions.
        for k in &keys {
            if k.len() < 512 {
                all.push(format!("{k}="));
            }
            all.push(k.chars().skip(1).collect::<String>());
        }
        all.push(extra);
        for k in all.into_iter().filter(|k| !k.is_empty() && k.len() <= 512) {
            let token = encode_key(&k).unwrap();
            if let Some(previous) = seen.insert(token.clone(), k.clone()) {
                prop_assert_eq!(previous, k, "token {} reused", token);
            }
        }
    }

    #[test]
    fn decode_of_arbitrary_strings_never_panics(s in any::<String>()) {
        if let Ok(key) = decode_key(&s) {
            // Only canonical tokens decode.
            prop_assert_eq!(encode_key(&key).unwrap(), s);
        }
    }

    #[test]
    fn decode_of_token_like_strings_is_canonical(s in "=?[A-Za-z0-9_=-]{0,700}") {
        match decode_key(&s) {
            Ok(key) => prop_assert_eq!(encode_key(&key).unwrap(), s),
            Err(e) => {
                let is_invalid_token = matches!(e, SubjectError::InvalidKeyToken { .. });
                prop_assert!(is_invalid_token, "{e}");
            }
        }
    }
}

#[test]
fn key_edge_cases() {
    assert_eq!(encode_key(""), Err(SubjectError::EmptyKey));
    let k513 = "a".repeat(513);
    assert_eq!(
        encode_key(&k513),
        Err(SubjectError::KeyTooLong { len: 513, max: 512 })
    );
    // 513 bytes of multi-byte characters too.
    let k513u = format!("{}x", "é".repeat(256));
    assert_eq!(k513u.len(), 513);
    assert!(matches!(
        encode_key(&k513u),
        Err(SubjectError::KeyTooLong { len: 513, .. })
    ));
    for key in ["a.b", "a b", "*", ">", "ünï", "=", "a=b", "$JS", ".", "a.>"] {
        let token = encode_key(key).unwrap();
        assert!(token.starts_with('='), "{key:?} → {token:?}");
        assert!(is_valid_single_token(&token), "{token:?}");
        assert_eq!(decode_key(&token).unwrap(), key);
    }
    for key in ["A-1", "a", "_", "-", &"k".repeat(128)] {
        assert_eq!(encode_key(key).unwrap(), key);
        assert_eq!(decode_key(key).unwrap(), key);
    }
    for key in [
        "x".repeat(512),
        ".".repeat(512),
        "é".repeat(256),
        "k".repeat(129),
    ] {
        let token = encode_key(&key).unwrap();
        assert!(is_valid_single_token(&token));
        assert_eq!(decode_key(&token).unwrap(), key);
    }
}

// ---------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------

/// Whether this build's `serde_json` parses floats exactly (its `float_roundtrip` feature). Without
/// it, json/1 (and JSON text nested in postcard/1) can move a float by one ulp, so the strategies
/// below then only generate floats that parse exactly either way. Enabling the feature makes these
/// tests cover every finite float.
fn json_floats_exact() -> bool {
    serde_json::from_str::<f64>("0.10300000000000001").ok() == Some(0.103_000_000_000_000_01)
}

/// Finite floats that survive JSON text in this build.
fn json_f64() -> BoxedStrategy<f64> {
    use proptest::num::f64 as f;
    if json_floats_exact() {
        (f::POSITIVE | f::NEGATIVE | f::NORMAL | f::SUBNORMAL | f::ZERO).boxed()
    } else {
        // Short decimals (at most 14 significant digits) parse exactly with the fast parser.
        (any::<i32>(), 0u32..=4)
            .prop_map(|(m, k)| f64::from(m) / f64::from(1u32 << k))
            .boxed()
    }
}

/// Small nested JSON values; no object anywhere is of the `{"$bytes": <string>}` shape.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        json_f64().prop_map(serde_json::Value::from),
        ".{0,8}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("[a-z$]{0,6}", inner, 0..4).prop_map(|m| {
                let map: serde_json::Map<String, serde_json::Value> = m.into_iter().collect();
                let reserved = map.len() == 1
                    && matches!(map.get("$bytes"), Some(serde_json::Value::String(_)));
                if reserved {
                    serde_json::Value::Array(vec![serde_json::Value::Object(map)])
                } else {
                    serde_json::Value::Object(map)
                }
            }),
        ]
    })
}

/// Column values. `json` restricts to what json/1 reads back as the same variant: finite floats
/// and `Json` values that are objects or arrays (a scalar inside `Json` reads back as the scalar
/// variant).
fn value(json: bool) -> BoxedStrategy<Value> {
    let float = if json {
        json_f64().boxed()
    } else {
        // Everything but NaN, which is never equal to itself (a unit test covers it).
        any::<f64>().prop_filter("not NaN", |f| !f.is_nan()).boxed()
    };
    let nested = if json {
        json_value()
            .prop_filter("objects and arrays only", |j| j.is_object() || j.is_array())
            .boxed()
    } else {
        json_value().boxed()
    };
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::I64),
        float.prop_map(Value::F64),
        any::<String>().prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..48).prop_map(Value::Bytes),
        nested.prop_map(Value::Json),
    ]
    .boxed()
}

fn row(json: bool) -> impl Strategy<Value = Row> {
    prop::collection::btree_map(any::<String>(), value(json), 0..8)
}

fn event(json: bool) -> impl Strategy<Value = Event> {
    let change = prop_oneof![
        3 => row(json).prop_map(Change::Upsert),
        1 => Just(Change::Delete),
    ];
    (change, any::<String>(), any::<u64>(), any::<u32>()).prop_map(
        |(change, origin, ts_ms, schema)| Event {
            change,
            origin,
            ts_ms,
            schema,
        },
    )
}

fn is_typed_decode_error(e: &DecodeError) -> bool {
    matches!(e, DecodeError::Malformed { .. })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn postcard_round_trips(event in event(false)) {
        let body = encode(&event, Format::Postcard1).unwrap();
        prop_assert_eq!(&decode(&body, Format::Postcard1).unwrap(), &event);
        prop_assert_eq!(decode_message(Some("postcard/1"), &body).unwrap(), event);
    }

    #[test]
    fn json_round_trips(event in event(true)) {
        let body = encode(&event, Format::Json1).unwrap();
        prop_assert_eq!(&decode(&body, Format::Json1).unwrap(), &event);
        prop_assert_eq!(decode_message(Some("json/1"), &body).unwrap(), event);
    }

    #[test]
    fn truncated_postcard_bodies_are_errors(event in event(false)) {
        let body = encode(&event, Format::Postcard1).unwrap();
        for cut in 0..body.len() {
            let result = decode(&body[..cut], Format::Postcard1);
            prop_assert!(
                matches!(&result, Err(e) if is_typed_decode_error(e)),
                "prefix of {} bytes: {:?}", cut, result
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
        for format in [Format::Postcard1, Format::Json1] {
            if let Err(e) = decode(&body, format) {
                prop_assert!(is_typed_decode_error(&e), "{e}");
            }
        }
        prop_assert_eq!(decode_message(None, &body), Err(DecodeError::MissingFormat));
        let is_unknown = matches!(
            decode_message(Some("bincode/1"), &body),
            Err(DecodeError::UnknownFormat { .. })
        );
        prop_assert!(is_unknown);
    }

    #[test]
    fn mutated_bodies_never_panic(
        event in event(true),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        for format in [Format::Postcard1, Format::Json1] {
            let mut body = encode(&event, format).unwrap();
            for (at, byte) in &edits {
                let i = at.index(body.len());
                body[i] = *byte;
            }
            // Either an event (which can be written again) or a typed error.
            match decode(&body, format) {
                Ok(decoded) => prop_assert!(encode(&decoded, Format::Postcard1).is_ok()),
                Err(e) => prop_assert!(is_typed_decode_error(&e), "{e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Dimensions {
    width: f64,
    labels: Vec<String>,
    depth: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    sku: String,
    stock: i64,
    price: f64,
    active: bool,
    note: Option<String>,
    tags: Vec<String>,
    dims: Dimensions,
    thumbnail: Vec<u8>,
}

fn product() -> impl Strategy<Value = Product> {
    let dims = (
        json_f64(),
        prop::collection::vec(any::<String>(), 0..4),
        any::<Option<i64>>(),
    )
        .prop_map(|(width, labels, depth)| Dimensions {
            width,
            labels,
            depth,
        });
    (
        any::<String>(),
        any::<i64>(),
        any::<f64>().prop_filter("not NaN", |f| !f.is_nan()),
        any::<bool>(),
        any::<Option<String>>(),
        prop::collection::vec(any::<String>(), 0..4),
        dims,
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(
            |(sku, stock, price, active, note, tags, dims, thumbnail)| Product {
                sku,
                stock,
                price,
                active,
                note,
                tags,
                dims,
                thumbnail,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn record_round_trips(p in product()) {
        let row = to_row(&p).unwrap();
        prop_assert_eq!(row.len(), 8);
        prop_assert_eq!(&row["sku"], &Value::Text(p.sku.clone()));
        prop_assert_eq!(&row["stock"], &Value::I64(p.stock));
        prop_assert!(matches!(row["dims"], Value::Json(_)));
        prop_assert_eq!(&from_row::<Product>(&row).unwrap(), &p);

        // And through the wire: the row inside a postcard/1 event still reads as the struct.
        let body = encode(&Event::upsert(row, "p"), Format::Postcard1).unwrap();
        let back = decode(&body, Format::Postcard1).unwrap();
        prop_assert_eq!(from_row::<Product>(back.row().unwrap()).unwrap(), p);
    }
}
