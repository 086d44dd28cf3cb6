//! Bounded extraction of the top-level `"model"` field from a JSON body.
//!
//! Policy is keyed on the model an OpenAI / Anthropic / Gemini style request
//! names, but the proxy only holds a prefix of the body and must not pay for
//! (or allocate for) a full parse on every request. This is a small
//! iterative scanner: it walks the top-level object's members, skips each
//! value without descending into it recursively, and stops at the first
//! member whose key decodes to `model`. Work is O(n) in the prefix and the
//! stack depth is constant whatever the nesting, so hostile input cannot
//! make it slow or overflow the stack.
//!
//! Agreement with the vendor's parser is what matters for security: a body
//! that the vendor reads as naming model X must never be reported here as
//! naming model Y. Hence keys are compared after escape decoding
//! (`"mod\u0065l"` is `model` to every JSON parser), and anything malformed
//! before the key yields `None` rather than a guess.
//!
//! Duplicate top-level `model` keys: [`model`] reports the first. Parsers
//! disagree here (Python's and JavaScript's keep the last), so the proxy also
//! asks [`duplicate_model`] and refuses such a body rather than guess which
//! one the vendor will read. A duplicate beyond the buffered prefix cannot be
//! seen; the prefix cap is the documented limit of body rules.

use std::borrow::Cow;

/// Longest model name accepted, in decoded bytes. Real names are far
/// shorter; the cap bounds the work and the one allocation.
const MAX_VALUE: usize = 256;

/// The top-level "model" value of a JSON object, if present within `body` (which may be a truncated prefix). Escapes decoded (Cow::Owned only then). Nested "model" keys (inside messages, tools, metadata, string values containing "model") must NOT match. Returns None for non-objects, malformed input before the key, non-string values, values longer than 256 bytes, or invalid UTF-8.
///
/// A leading UTF-8 byte-order mark is skipped, as lenient producers emit one.
pub fn model(body: &[u8]) -> Option<Cow<'_, str>> {
    let mut i = first_member(body)?;
    loop {
        if body.get(i) != Some(&b'"') {
            // Also covers `}` (no model at all) and a trailing comma.
            return None;
        }
        let (is_model, after_key) = key(body, i + 1)?;
        i = skip_ws(body, after_key);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(body, i + 1);
        if is_model {
            if body.get(i) != Some(&b'"') {
                return None;
            }
            return value(body, i + 1);
        }
        i = skip_ws(body, skip_value(body, i)?);
        if body.get(i) != Some(&b',') {
            return None;
        }
        i = skip_ws(body, i + 1);
    }
}

/// Whether the top-level object names `model` more than once within `body`
/// (keys compared after escape decoding, as in [`model`]). Stops, answering
/// false, at anything malformed or at the end of a truncated prefix.
pub fn duplicate_model(body: &[u8]) -> bool {
    let Some(mut i) = first_member(body) else {
        return false;
    };
    let mut seen = false;
    loop {
        if body.get(i) != Some(&b'"') {
            return false;
        }
        let Some((is_model, after_key)) = key(body, i + 1) else {
            return false;
        };
        if is_model && seen {
            return true;
        }
        seen |= is_model;
        i = skip_ws(body, after_key);
        if body.get(i) != Some(&b':') {
            return false;
        }
        let Some(end) = skip_value(body, skip_ws(body, i + 1)) else {
            return false;
        };
        i = skip_ws(body, end);
        if body.get(i) != Some(&b',') {
            return false;
        }
        i = skip_ws(body, i + 1);
    }
}

/// Where the top-level object's first member starts: past a byte-order mark, whitespace and
/// the opening brace. `None` when the body is not an object.
fn first_member(body: &[u8]) -> Option<usize> {
    let start = if body.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let i = skip_ws(body, start);
    (body.get(i) == Some(&b'{')).then(|| skip_ws(body, i + 1))
}

/// RFC 8259 whitespace only; anything else (NBSP, form feed) is malformed
/// to the vendor too.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Whether the key string starting at `i` (just past its quote) decodes to
/// `model`, and the index past its closing quote. `None` if malformed or
/// truncated.
fn key(b: &[u8], i: usize) -> Option<(bool, usize)> {
    let mut buf = [0u8; 5];
    match decode(b, i, &mut buf) {
        Ok(d) => Some((&buf[..d.len] == b"model", d.end)),
        Err(DecodeError::Overflow) => Some((false, string_end(b, i)?)),
        Err(DecodeError::Invalid) => None,
    }
}

/// The model value: the string starting at `i` (just past its quote).
fn value(b: &[u8], i: usize) -> Option<Cow<'_, str>> {
    let mut buf = [0u8; MAX_VALUE];
    let d = decode(b, i, &mut buf).ok()?;
    if d.escaped {
        String::from_utf8(buf[..d.len].to_vec())
            .ok()
            .map(Cow::Owned)
    } else {
        std::str::from_utf8(&b[i..d.end - 1])
            .ok()
            .map(Cow::Borrowed)
    }
}

/// Index past the closing quote of the string starting at `i` (just past its
/// opening quote), without decoding: used for strings whose content does
/// not matter.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i += b.get(i..)?.iter().position(|&c| c == b'"' || c == b'\\')?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        // The escaped byte is never a terminator; `\uXXXX` digits cannot be
        // `"` or `\` either, so skipping one byte is enough.
        i += 2;
    }
}

/// Index past the value starting at `i`. Containers are skipped by bracket
/// counting with a plain counter: it only has to find where the value ends
/// in well-formed input, and a vendor rejects mismatched brackets anyway.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                i += b
                    .get(i..)?
                    .iter()
                    .position(|&c| matches!(c, b'"' | b'{' | b'}' | b'[' | b']'))?;
                match b[i] {
                    b'"' => i = string_end(b, i + 1)?,
                    b'{' | b'[' => {
                        depth += 1;
                        i += 1;
                    }
                    _ => {
                        depth = depth.checked_sub(1)?;
                        i += 1;
                        if depth == 0 {
                            return Some(i);
                        }
                    }
                }
            }
        }
        _ => {
            // Numbers and literals; their exact grammar is irrelevant to
            // finding the next member.
            let n = b[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
                .count();
            (n > 0).then_some(i + n)
        }
    }
}

enum DecodeError {
    /// Decoded content does not fit the buffer.
    Overflow,
    /// Bad escape, raw control character, lone surrogate, or truncated.
    Invalid,
}

struct Decoded {
    /// Bytes written to the buffer.
    len: usize,
    /// Index past the closing quote.
    end: usize,
    /// Whether any escape occurred, i.e. whether the raw bytes differ from
    /// the decoded ones.
    escaped: bool,
}

/// Decodes the JSON string starting at `i` (just past its opening quote)
/// into `out`. Raw bytes are copied as is; UTF-8 validity is the caller's
/// check, done once on the result.
fn decode(b: &[u8], mut i: usize, out: &mut [u8]) -> Result<Decoded, DecodeError> {
    let mut len = 0;
    let mut escaped = false;
    let mut push = |bytes: &[u8], len: &mut usize| -> Result<(), DecodeError> {
        let dst = out
            .get_mut(*len..*len + bytes.len())
            .ok_or(DecodeError::Overflow)?;
        dst.copy_from_slice(bytes);
        *len += bytes.len();
        Ok(())
    };
    loop {
        let c = *b.get(i).ok_or(DecodeError::Invalid)?;
        match c {
            b'"' => {
                return Ok(Decoded {
                    len,
                    end: i + 1,
                    escaped,
                })
            }
            b'\\' => {
                escaped = true;
                let e = *b.get(i + 1).ok_or(DecodeError::Invalid)?;
                i += 2;
                let ch = match e {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    b'u' => {
                        let hi = hex4(b, i)?;
                        i += 4;
                        if (0xD800..0xDC00).contains(&hi) {
                            if b.get(i..i + 2) != Some(b"\\u") {
                                return Err(DecodeError::Invalid);
                            }
                            let lo = hex4(b, i + 2)?;
                            if !(0xDC00..0xE000).contains(&lo) {
                                return Err(DecodeError::Invalid);
                            }
                            i += 6;
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                                .ok_or(DecodeError::Invalid)?
                        } else {
                            // A lone low surrogate is rejected by from_u32.
                            char::from_u32(hi).ok_or(DecodeError::Invalid)?
                        }
                    }
                    _ => return Err(DecodeError::Invalid),
                };
                push(ch.encode_utf8(&mut [0; 4]).as_bytes(), &mut len)?;
            }
            0..=0x1F => return Err(DecodeError::Invalid),
            _ => {
                push(&[c], &mut len)?;
                i += 1;
            }
        }
    }
}

fn hex4(b: &[u8], i: usize) -> Result<u32, DecodeError> {
    let digits = b.get(i..i + 4).ok_or(DecodeError::Invalid)?;
    digits.iter().try_fold(0u32, |acc, &d| {
        let v = (d as char).to_digit(16).ok_or(DecodeError::Invalid)?;
        Ok(acc * 16 + v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(body: &str) -> Option<String> {
        model(body.as_bytes()).map(Cow::into_owned)
    }

    fn is_borrowed(body: &[u8]) -> bool {
        matches!(model(body), Some(Cow::Borrowed(_)))
    }

    #[test]
    fn openai_chat_body() {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"Hi"}],"temperature":0.7,"stream":true}"#;
        assert_eq!(m(body).as_deref(), Some("gpt-4o-mini"));
        assert!(is_borrowed(body.as_bytes()));
    }

    #[test]
    fn anthropic_messages_body() {
        let body = r#"{
  "max_tokens": 1024,
  "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
  "messages": [{"role": "user", "content": [{"type": "text", "text": "what model are you? \"model\": \"evil\""}]}],
  "model": "claude-sonnet-4-5",
  "metadata": {"user_id": "u-1"}
}"#;
        assert_eq!(m(body).as_deref(), Some("claude-sonnet-4-5"));
    }

    #[test]
    fn model_after_large_messages_array() {
        let mut body = String::from(r#"{"messages":["#);
        for i in 0..5000 {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                r#"{{"role":"user","content":"turn {i} mentions \"model\":\"x\" and {{[braces]}}","model":"nested-{i}"}}"#
            ));
        }
        body.push_str(r#"],"model":"gpt-4.1"}"#);
        assert!(body.len() > 300_000);
        assert_eq!(m(&body).as_deref(), Some("gpt-4.1"));
    }

    #[test]
    fn nested_model_keys_ignored() {
        for body in [
            r#"{"metadata":{"model":"inner"},"model":"outer"}"#,
            r#"{"tools":[{"name":"x","model":"inner"}],"model":"outer"}"#,
            r#"{"prompt":"\"model\": \"inner\"","model":"outer"}"#,
            r#"{"a":[[["model"]]],"b":{"c":{"model":{"model":"inner"}}},"model":"outer"}"#,
            r#"{"model_name":"inner","Model":"inner","model ":"inner","model":"outer"}"#,
        ] {
            assert_eq!(m(body).as_deref(), Some("outer"), "{body}");
        }
        assert_eq!(m(r#"{"metadata":{"model":"inner"}}"#), None);
        assert_eq!(m(r#"{"messages":[{"model":"inner"}]}"#), None);
    }

    #[test]
    fn key_spelled_with_escapes() {
        assert_eq!(m(r#"{"mod\u0065l":"gpt-4o"}"#).as_deref(), Some("gpt-4o"));
        assert_eq!(
            m(r#"{"\u006D\u006f\u0064\u0065\u006C":"gpt-4o"}"#).as_deref(),
            Some("gpt-4o")
        );
        // Decodes to something else: not the model key.
        assert_eq!(
            m(r#"{"mod\u0065l\u0000":"x","model":"y"}"#).as_deref(),
            Some("y")
        );
        assert_eq!(m(r#"{"mo\/del":"x","model":"y"}"#).as_deref(), Some("y"));
        // Invalid escape before the key: malformed, no guess.
        assert_eq!(m(r#"{"mod\el":"x","model":"y"}"#), None);
    }

    #[test]
    fn value_with_escapes() {
        let got = model(br#"{"model":"gpt\u002d4o\/mini"}"#);
        assert!(matches!(got, Some(Cow::Owned(ref s)) if s == "gpt-4o/mini"));
        assert_eq!(m(r#"{"model":"a\"b\\c\n"}"#).as_deref(), Some("a\"b\\c\n"));
        assert_eq!(
            m(r#"{"model":"\u00e9\ud83d\ude00x"}"#).as_deref(),
            Some("é😀x")
        );
        assert_eq!(m(r#"{"model":"é😀"}"#).as_deref(), Some("é😀"));
        assert_eq!(m(r#"{"model":"\ud83d"}"#), None); // lone high surrogate
        assert_eq!(m(r#"{"model":"\ud83dx"}"#), None);
        assert_eq!(m(r#"{"model":"\ude00"}"#), None); // lone low surrogate
        assert_eq!(m(r#"{"model":"\ud83d\u0041"}"#), None);
        assert_eq!(m(r#"{"model":"\u12g4"}"#), None);
        assert_eq!(m(r#"{"model":"\x"}"#), None);
        assert_eq!(m("{\"model\":\"a\tb\"}"), None); // raw control char
    }

    #[test]
    fn truncated_prefixes() {
        let full =
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o","stream":true}"#;
        let end = full.find("gpt-4o").unwrap() + "gpt-4o\"".len();
        for cut in 0..=full.len() {
            let got = model(&full.as_bytes()[..cut]);
            if cut >= end {
                assert_eq!(got.as_deref(), Some("gpt-4o"), "cut {cut}");
            } else {
                assert_eq!(got, None, "cut {cut}");
            }
        }
    }

    #[test]
    fn non_objects_and_non_strings() {
        for body in [
            "",
            "   ",
            r#"["model","gpt-4o"]"#,
            r#""model""#,
            "null",
            "model=gpt-4o&x=1",
            r#"{"model":4}"#,
            r#"{"model":null}"#,
            r#"{"model":["gpt-4o"]}"#,
            r#"{"model":{"name":"gpt-4o"}}"#,
            r#"{"model" "gpt-4o"}"#,
            r#"{model:"gpt-4o"}"#,
            r#"{'model':'gpt-4o'}"#,
            r#"{"a":1,,"model":"gpt-4o"}"#,
            r#"{"a":1 "model":"gpt-4o"}"#,
            r#"{"a":,"model":"gpt-4o"}"#,
            r#"{"a":1,}"#,
            r#"{}"#,
            r#"{"a":]"model":"x"}"#,
        ] {
            assert_eq!(m(body), None, "{body}");
        }
        // First wins even when it is not a string: the vendor would reject
        // or mis-typecheck it, and we must not fall through to a later one.
        assert_eq!(m(r#"{"model":1,"model":"gpt-4o"}"#), None);
        assert_eq!(
            m(r#"{"model":"first","model":"second"}"#).as_deref(),
            Some("first")
        );
    }

    #[test]
    fn duplicate_top_level_model_keys_are_reported() {
        for body in [
            r#"{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}"#,
            r#"{"model":"a","mod\u0065l":"b"}"#,
            r#"{ "x": {"model":"n"}, "model": "a", "y": [1, "s"], "model": 1 }"#,
        ] {
            assert!(duplicate_model(body.as_bytes()), "{body}");
        }
        for body in [
            r#"{"model":"gpt-4o","messages":[{"model":"x"}]}"#,
            r#"{"model":"gpt-4o","meta":{"model":"x","model":"y"}}"#,
            r#"{"models":"a","model":"b"}"#,
            r#"{"model":"a","messages":[1,2"#,
            r#"[{"model":"a"},{"model":"b"}]"#,
        ] {
            assert!(!duplicate_model(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn invalid_utf8_value() {
        assert_eq!(model(b"{\"model\":\"gpt\xff\"}"), None);
        assert_eq!(model(b"{\"model\":\"\\u0041\xc3\"}"), None);
        // Invalid UTF-8 elsewhere does not matter.
        assert_eq!(
            model(b"{\"x\":\"\xff\xfe\",\"model\":\"ok\"}").as_deref(),
            Some("ok")
        );
    }

    #[test]
    fn value_length_cap() {
        let ok = "a".repeat(MAX_VALUE);
        assert_eq!(m(&format!(r#"{{"model":"{ok}"}}"#)), Some(ok.clone()));
        let long = "a".repeat(MAX_VALUE + 1);
        assert_eq!(m(&format!(r#"{{"model":"{long}"}}"#)), None);
        // The cap is on decoded bytes: 256 escaped chars are fine, 257 not.
        let esc = r"\u0061".repeat(MAX_VALUE);
        assert_eq!(m(&format!(r#"{{"model":"{esc}"}}"#)), Some(ok));
        let esc = r"\u0061".repeat(MAX_VALUE + 1);
        assert_eq!(m(&format!(r#"{{"model":"{esc}"}}"#)), None);
        // A huge value is rejected without scanning to its end.
        let huge = format!(r#"{{"model":"{}"#, "b".repeat(10 << 20));
        assert_eq!(m(&huge), None);
    }

    #[test]
    fn whitespace_variants_and_bom() {
        for body in [
            " \t\r\n{ \t\r\n\"model\" \t\r\n: \t\r\n\"gpt-4o\" \t\r\n}",
            "{\"a\" : [ 1 , 2 ] ,\n\"model\"\n:\n\"gpt-4o\"}",
            "\u{FEFF}{\"model\":\"gpt-4o\"}",
            "\u{FEFF} \n{\"model\":\"gpt-4o\"}",
        ] {
            assert_eq!(m(body).as_deref(), Some("gpt-4o"), "{body:?}");
        }
        // Not JSON whitespace.
        for body in [
            "\u{A0}{\"model\":\"gpt-4o\"}",
            "{\u{c}\"model\":\"gpt-4o\"}",
            "{\"model\":\u{A0}\"gpt-4o\"}",
            " \u{FEFF}{\"model\":\"gpt-4o\"}",
        ] {
            assert_eq!(m(body), None, "{body:?}");
        }
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        let depth = 1_000_000;
        let body = format!(
            r#"{{"a":{}{},"model":"deep-ok"}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(m(&body).as_deref(), Some("deep-ok"));
        let unbalanced = format!(r#"{{"a":{},"model":"x"}}"#, "[".repeat(depth));
        assert_eq!(m(&unbalanced), None);
    }

    /// Deterministic xorshift64*: no extra crates, reproducible failures.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// (JSON-encoded, decoded) string fragments, chosen to stress the
    /// scanner: quotes, backslashes, brackets and the word "model" inside
    /// strings, and every escape form.
    const PIECES: &[(&str, &str)] = &[
        ("gpt-4o", "gpt-4o"),
        ("model", "model"),
        ("claude", "claude"),
        (r#"\""#, "\""),
        (r"\\", "\\"),
        (r"\/", "/"),
        (r"\n", "\n"),
        (r"\t\r\b\f", "\t\r\u{8}\u{c}"),
        (r"\u00e9", "é"),
        (r"\u00E9", "é"),
        ("é", "é"),
        ("😀", "😀"),
        (r"\ud83d\ude00", "😀"),
        (r"\u0041", "A"),
        ("{", "{"),
        ("}", "}"),
        ("[", "["),
        ("]", "]"),
        (":", ":"),
        (",", ","),
        (" ", " "),
        (r#"\"model\":\"x\""#, r#""model":"x""#),
    ];

    const WS: &[&str] = &["", "", "", " ", "\t", "\n", "\r\n", "  \n  "];

    fn ws(r: &mut Rng, out: &mut String) {
        out.push_str(WS[r.below(WS.len())]);
    }

    /// Appends a random JSON string and returns its decoded value.
    fn gen_string(r: &mut Rng, max_pieces: usize, out: &mut String) -> String {
        let mut decoded = String::new();
        out.push('"');
        for _ in 0..r.below(max_pieces + 1) {
            let (enc, dec) = PIECES[r.below(PIECES.len())];
            out.push_str(enc);
            decoded.push_str(dec);
        }
        out.push('"');
        decoded
    }

    fn gen_value(r: &mut Rng, depth: usize, out: &mut String) {
        let kinds = if depth >= 5 { 3 } else { 5 };
        match r.below(kinds) {
            0 => {
                gen_string(r, 6, out);
            }
            1 => out.push_str(["0", "-12.5e3", "42", "1E-7", "3.25"][r.below(5)]),
            2 => out.push_str(["true", "false", "null"][r.below(3)]),
            3 => {
                out.push('{');
                ws(r, out);
                for k in 0..r.below(5) {
                    if k > 0 {
                        out.push(',');
                        ws(r, out);
                    }
                    // Nested keys may well be "model"; they must be ignored.
                    gen_string(r, 3, out);
                    ws(r, out);
                    out.push(':');
                    ws(r, out);
                    gen_value(r, depth + 1, out);
                    ws(r, out);
                }
                out.push('}');
            }
            _ => {
                out.push('[');
                ws(r, out);
                for k in 0..r.below(5) {
                    if k > 0 {
                        out.push(',');
                        ws(r, out);
                    }
                    gen_value(r, depth + 1, out);
                    ws(r, out);
                }
                out.push(']');
            }
        }
    }

    /// A top-level object with random members and one `"model"` member at a
    /// random position. Returns the body, the decoded model, and the index
    /// just past the model value (the shortest prefix that must succeed).
    fn gen_body(r: &mut Rng) -> (String, String, usize) {
        let mut out = String::new();
        if r.below(8) == 0 {
            out.push('\u{FEFF}');
        }
        ws(r, &mut out);
        out.push('{');
        ws(r, &mut out);
        let members = r.below(6);
        let at = r.below(members + 1);
        let mut expected = None;
        for k in 0..=members {
            if k > 0 {
                out.push(',');
                ws(r, &mut out);
            }
            if k == at {
                let key = [r#""model""#, r#""mod\u0065l""#, r#""\u006dodel""#][r.below(3)];
                out.push_str(key);
                ws(r, &mut out);
                out.push(':');
                ws(r, &mut out);
                let v = gen_string(r, 8, &mut out);
                expected = Some((v, out.len()));
            } else {
                loop {
                    let mut key = String::new();
                    if gen_string(r, 3, &mut key) != "model" {
                        out.push_str(&key);
                        break;
                    }
                }
                ws(r, &mut out);
                out.push(':');
                ws(r, &mut out);
                gen_value(r, 1, &mut out);
            }
            ws(r, &mut out);
        }
        out.push('}');
        ws(r, &mut out);
        let (v, end) = expected.expect("model member always inserted");
        (out, v, end)
    }

    #[test]
    fn random_bodies_agree_with_serde_json() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..3000 {
            let (body, want, end) = gen_body(&mut r);
            let json = body.strip_prefix('\u{FEFF}').unwrap_or(&body);
            let parsed: serde_json::Value =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("case {case}: {e}: {body}"));
            assert_eq!(
                parsed["model"].as_str(),
                Some(want.as_str()),
                "generator, case {case}"
            );
            assert_eq!(
                m(&body).as_deref(),
                Some(want.as_str()),
                "case {case}: {body}"
            );
            for _ in 0..8 {
                let cut = r.below(body.len() + 1);
                let got = model(&body.as_bytes()[..cut]);
                if cut >= end {
                    assert_eq!(
                        got.as_deref(),
                        Some(want.as_str()),
                        "case {case} cut {cut}: {body}"
                    );
                } else {
                    assert_eq!(got, None, "case {case} cut {cut}: {body}");
                }
            }
        }
    }

    #[test]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    fn bench_model_64k() {
        let mut body = String::from(r#"{"messages":["#);
        while body.len() < 64 * 1024 {
            body.push_str(
                r#"{"role":"user","content":"some text with \"quotes\" and {braces} here"},"#,
            );
        }
        body.push_str(r#"{"role":"user","content":"end"}],"model":"gpt-4o"}"#);
        for (label, b) in [
            (
                "model first",
                r#"{"model":"gpt-4o","messages":[]}"#.as_bytes(),
            ),
            ("model after 64 KiB", body.as_bytes()),
        ] {
            let iters = 2000;
            let t = std::time::Instant::now();
            for _ in 0..iters {
                assert!(std::hint::black_box(model(std::hint::black_box(b))).is_some());
            }
            let ns = t.elapsed().as_nanos() as f64 / f64::from(iters);
            println!(
                "model(), {label}: {} bytes, {ns:.0} ns/call, {:.3} ns/byte",
                b.len(),
                ns / b.len() as f64
            );
        }
    }
}
