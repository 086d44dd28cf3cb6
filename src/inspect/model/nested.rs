//! Models named deeper in a body than its top-level `model`, where some vendor endpoints put
//! them: Anthropic's Message Batches name one per request (`requests[].params.model`), OpenAI's
//! Realtime client secrets name the session's (`session.model`). The catalog says which field
//! of which path (`model_fields`).
//!
//! The same scanner and the same rule as for the top-level `model`: values are skipped, never
//! descended into, except along the path; and where the vendor's parser could read another
//! model than this one does (a key on the path named twice or in another case, JSON malformed
//! where it is walked, a value the scanner cannot read), the reading is ambiguous and the
//! proxy refuses rather than guesses.

use super::{bad_string, decode, skip_value, skip_ws, value, DecodeError, Members, Stop};

/// Longest key a path may name, in bytes.
const MAX_KEY: usize = 64;

/// Different models one body may name. A batch of thousands of requests names a handful of
/// models; past this many, which ones were checked would depend on order.
pub const MAX_MODELS: usize = 16;

/// Where a body names its models: object keys joined by `.`, with `[]` after a key whose value
/// is an array, each element of which is walked on (`requests[].params.model`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Box<[Step]>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(Box<str>),
    Each,
}

impl FieldPath {
    pub fn parse(spec: &str) -> Result<FieldPath, String> {
        let mut steps = Vec::new();
        for part in spec.split('.') {
            let (name, each) = match part.strip_suffix("[]") {
                Some(n) => (n, true),
                None => (part, false),
            };
            if name.is_empty() || name.len() > MAX_KEY || name.contains(['[', ']', '"', '\\']) {
                return Err(format!(
                    "model field {spec:?}: each step is a key of 1 to {MAX_KEY} bytes, with [] after it for each element of an array (\"requests[].params.model\")"
                ));
            }
            steps.push(Step::Key(name.into()));
            if each {
                steps.push(Step::Each);
            }
        }
        if matches!(steps.last(), Some(Step::Each)) {
            return Err(format!(
                "model field {spec:?} must end in the key that names the model"
            ));
        }
        Ok(FieldPath(steps.into()))
    }
}

/// What a body names at a [`FieldPath`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Nested {
    /// Each different model, in order of first appearance, as sent.
    pub models: Vec<String>,
    /// Which models the vendor reads cannot be vouched for (see the module's notes), or the
    /// body names more than [`MAX_MODELS`] different ones.
    pub ambiguous: bool,
}

/// The models `body` (which may be a truncated prefix) names at `path`. What the prefix cuts
/// off is not seen, as for the top-level `model`: the prefix cap is the limit of body rules.
pub fn models_at(body: &[u8], path: &FieldPath) -> Nested {
    let mut out = Nested::default();
    let start = match body.starts_with(b"\xEF\xBB\xBF") {
        true => 3,
        false => 0,
    };
    if walk(body, skip_ws(body, start), &path.0, &mut out) == Err(Stop::Malformed) {
        out.ambiguous = true;
    }
    out
}

/// Walks `steps` from the value at `i`. A value of another type than a step needs (a string
/// where an object is walked into) names no model there, as a non-string top-level `model`
/// names none.
fn walk(b: &[u8], i: usize, steps: &[Step], out: &mut Nested) -> Result<(), Stop> {
    let Some(&first) = b.get(i) else {
        return Err(Stop::Truncated);
    };
    match steps.split_first() {
        None => {
            if first != b'"' {
                return Ok(());
            }
            if bad_string(b, i) {
                out.ambiguous = true;
            } else if let Some(m) = value(b, i + 1) {
                if !out.models.iter().any(|x| **x == *m) {
                    match out.models.len() < MAX_MODELS {
                        true => out.models.push(m.into_owned()),
                        false => out.ambiguous = true,
                    }
                }
            }
            Ok(())
        }
        Some((Step::Key(name), rest)) => {
            if first != b'{' {
                return Ok(());
            }
            // Every member is looked at before descending: a second one of the same name
            // (which parsers resolve differently) makes the reading ambiguous.
            let mut members = Members::at(b, i);
            let mut found = None;
            let stop = loop {
                match members.next() {
                    Ok(m) => match same_key(b, m.key_at, name)? {
                        Same::Exactly if found.is_some() => out.ambiguous = true,
                        Same::Exactly => found = Some(m.value),
                        // Go's encoding/json matches names in any case (Unicode's simple
                        // folding: `requeſts` is `requests`), and takes the last.
                        Same::InOtherCase => out.ambiguous = true,
                        Same::No => {}
                    },
                    Err(stop) => break stop,
                }
            };
            if stop == Stop::Malformed {
                return Err(Stop::Malformed);
            }
            if let Some(v) = found {
                walk(b, v, rest, out)?;
            }
            match stop {
                Stop::Closed => Ok(()),
                other => Err(other),
            }
        }
        Some((Step::Each, rest)) => {
            if first != b'[' {
                return Ok(());
            }
            let mut j = skip_ws(b, i + 1);
            if b.get(j) == Some(&b']') {
                return Ok(());
            }
            loop {
                walk(b, j, rest, out)?;
                j = skip_ws(b, skip_value(b, j)?);
                match b.get(j) {
                    Some(b']') => return Ok(()),
                    Some(b',') => j = skip_ws(b, j + 1),
                    Some(_) => return Err(Stop::Malformed),
                    None => return Err(Stop::Truncated),
                }
            }
        }
    }
}

enum Same {
    Exactly,
    InOtherCase,
    No,
}

/// How the key starting at `i` (just past its quote) compares with `name`, decoded.
fn same_key(b: &[u8], i: usize, name: &str) -> Result<Same, Stop> {
    // Room for a name of `MAX_KEY` letters each spelled in 3 bytes (`K`, the Kelvin sign).
    let mut buf = [0u8; 3 * MAX_KEY + 1];
    match decode(b, i, &mut buf) {
        Ok(d) => {
            let k = &buf[..d.len];
            Ok(if k == name.as_bytes() {
                Same::Exactly
            } else if folds_to(k, name) {
                Same::InOtherCase
            } else {
                Same::No
            })
        }
        Err(DecodeError::Overflow) => Ok(Same::No),
        Err(DecodeError::Truncated) => Err(Stop::Truncated),
        Err(DecodeError::Invalid) => Err(Stop::Malformed),
    }
}

/// Whether `key` is the ASCII `name` under Unicode simple case folding, as Go's encoding/json
/// matches field names: ASCII case aside, the only characters that fold to ASCII letters are
/// `ſ` (U+017F) to `s` and the Kelvin sign (U+212A) to `k`.
fn folds_to(key: &[u8], name: &str) -> bool {
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let folded = key.chars().map(|c| match c {
        'ſ' => 's',
        '\u{212A}' => 'k',
        c => c.to_ascii_lowercase(),
    });
    folded.eq(name.chars().map(|c| c.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> FieldPath {
        FieldPath::parse("requests[].params.model").unwrap()
    }

    fn models(body: &str, path: &FieldPath) -> (Vec<String>, bool) {
        let n = models_at(body.as_bytes(), path);
        (n.models, n.ambiguous)
    }

    #[test]
    fn each_request_of_a_batch_names_its_model() {
        let body = r#"{"requests":[
            {"custom_id":"a","params":{"max_tokens":1,"messages":[{"role":"user","content":"model"}],"model":"claude-opus-4-1"}},
            {"custom_id":"b","params":{"model":"claude-haiku-4-5","metadata":{"model":"not-this"}}},
            {"custom_id":"c","params":{"model":"claude-opus-4-1"}}
        ]}"#;
        assert_eq!(
            models(body, &batch()),
            (
                vec!["claude-opus-4-1".into(), "claude-haiku-4-5".into()],
                false
            )
        );
        // Escaped keys and values are read as parsers read them.
        let escaped = r#"{"requ\u0065sts":[{"params":{"mod\u0065l":"claude-opus-4\u002d1"}}]}"#;
        assert_eq!(
            models(escaped, &batch()),
            (vec!["claude-opus-4-1".into()], false)
        );
        let session = FieldPath::parse("session.model").unwrap();
        assert_eq!(
            models(
                r#"{"session":{"type":"realtime","model":"gpt-4o-realtime"}}"#,
                &session
            ),
            (vec!["gpt-4o-realtime".into()], false)
        );
    }

    #[test]
    fn what_parsers_could_read_otherwise_is_ambiguous() {
        for body in [
            // A key on the path twice: Python keeps the last, we would read both.
            r#"{"requests":[{"params":{"model":"a"}}],"requests":[{"params":{"model":"b"}}]}"#,
            r#"{"requests":[{"params":{"model":"a","model":"b"}}]}"#,
            // Another case: Go's parser takes it, folding Unicode as well as ASCII.
            r#"{"requests":[{"params":{"Model":"b"}}]}"#,
            r#"{"Requests":[{"params":{"model":"b"}}]}"#,
            r#"{"requests":[{"params":{"model":"a"}}],"reque\u017fts":[{"params":{"model":"b"}}]}"#,
            "{\"requests\":[{\"params\":{\"model\":\"a\"},\"paramſ\":{\"model\":\"b\"}}]}",
            // Malformed where it is walked.
            r#"{"requests":[{"params":{"model":"a"}} {"params":{"model":"b"}}]}"#,
            r#"{"requests":[{"params":{"model" "a"}}]}"#,
            // A value the scanner cannot read.
            r#"{"requests":[{"params":{"model":"a\q"}}]}"#,
        ] {
            assert!(models(body, &batch()).1, "{body}");
        }
        let many: Vec<String> = (0..=MAX_MODELS)
            .map(|i| format!(r#"{{"params":{{"model":"m{i}"}}}}"#))
            .collect();
        let body = format!(r#"{{"requests":[{}]}}"#, many.join(","));
        assert!(models(&body, &batch()).1);
    }

    #[test]
    fn other_shapes_name_nothing_and_a_cut_is_not_a_doubt() {
        for body in [
            r#"{"requests":"none"}"#,
            r#"{"requests":[1,"x",{"params":7},{"params":{"model":3}}]}"#,
            r#"{"model":"top-level is not this field"}"#,
            "[]",
            "",
        ] {
            assert_eq!(models(body, &batch()), (vec![], false), "{body}");
        }
        let cut = r#"{"requests":[{"params":{"model":"claude-opus-4-1"}},{"params":{"mo"#;
        assert_eq!(
            models(cut, &batch()),
            (vec!["claude-opus-4-1".into()], false)
        );
    }

    #[test]
    fn keys_fold_as_go_folds_them() {
        assert!(folds_to("\u{212A}ind".as_bytes(), "kind"));
        assert!(folds_to("ſESSION".as_bytes(), "session"));
        assert!(!folds_to("sessions".as_bytes(), "session"));
        assert!(!folds_to("séssion".as_bytes(), "session"));
    }

    #[test]
    fn field_paths_name_keys_and_arrays() {
        assert!(FieldPath::parse("requests[].params.model").is_ok());
        for bad in ["", "requests[]", "a..model", "a[0].model", "a.\"b\""] {
            assert!(FieldPath::parse(bad).is_err(), "{bad}");
        }
    }
}
