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
/// is an array, each element of which is walked on (`requests[].params.model`), or is a model
/// itself when the path ends there (OpenRouter's fallback list, `models[]`), and `**` for the
/// value there and every value nested in it (OpenAI's graders: a multi-grader's `graders` are
/// a map, an array or one grader, and may be multi-graders: `grader.**.model`). Read in each
/// line of the body instead of the body as one document when [`FieldPath::per_line`]: a file
/// of batch requests is JSON Lines (OpenAI's `{"custom_id":…,"body":{"model":…}}`), uploaded
/// whole or as the file part of a multipart form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    steps: Box<[Step]>,
    per_line: bool,
    /// Values of the field that say the body's models are sent where they cannot be read
    /// (an Uploads API file whose `purpose` is `batch` arrives in parts that cut its lines):
    /// the field is then a doubt, not a model.
    unreadable_when: Box<[Box<str>]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(Box<str>),
    /// Each element of an array.
    Each,
    /// The value here and every value nested in it, to [`MAX_DEPTH`] levels.
    Deep,
}

impl FieldPath {
    pub fn parse(spec: &str) -> Result<FieldPath, String> {
        let mut steps = Vec::new();
        let bad = || {
            format!(
                "model field {spec:?}: each step is a key of 1 to {MAX_KEY} bytes, with [] after it for each element of an array (\"requests[].params.model\"), or ** for any depth below (\"grader.**.model\")"
            )
        };
        for part in spec.split('.') {
            if part == "**" {
                if matches!(steps.last(), Some(Step::Deep)) {
                    return Err(bad());
                }
                steps.push(Step::Deep);
                continue;
            }
            let (name, each) = match part.strip_suffix("[]") {
                Some(n) => (n, true),
                None => (part, false),
            };
            if name.is_empty() || name.len() > MAX_KEY || name.contains(['[', ']', '"', '\\', '*'])
            {
                return Err(bad());
            }
            steps.push(Step::Key(name.into()));
            if each {
                steps.push(Step::Each);
            }
        }
        if matches!(steps.last(), Some(Step::Deep)) {
            return Err(bad());
        }
        Ok(FieldPath {
            steps: steps.into(),
            per_line: false,
            unreadable_when: Box::default(),
        })
    }

    /// The field names no model: one of `values` there (in any case) makes the body's models
    /// unreadable, anything else is passed over.
    pub fn unreadable_when(mut self, values: &[impl AsRef<str>]) -> FieldPath {
        self.unreadable_when = values.iter().map(|v| v.as_ref().into()).collect();
        self
    }

    /// The same field, read in every line of the body (JSON Lines).
    pub fn per_line(mut self) -> FieldPath {
        self.per_line = true;
        self
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
///
/// `boundaries`: those of the body's `multipart/form-data` Content-Type fields, for a path
/// read line by line (see [`not_a_batch_upload`]).
pub fn models_at(body: &[u8], path: &FieldPath, boundaries: &[Vec<u8>]) -> Nested {
    let mut out = Nested::default();
    let start = match body.starts_with(b"\xEF\xBB\xBF") {
        true => 3,
        false => 0,
    };
    if path.per_line {
        lines_at(&body[start..], &path.steps, boundaries, &mut out);
    } else if walk(body, skip_ws(body, start), &path.steps, &mut out) == Err(Stop::Malformed) {
        out.ambiguous = true;
    }
    if !path.unreadable_when.is_empty() {
        let values = std::mem::take(&mut out.models);
        let unreadable = |v: &[u8]| {
            path.unreadable_when
                .iter()
                .any(|u| v.trim_ascii().eq_ignore_ascii_case(u.as_bytes()))
        };
        out.ambiguous |= values.iter().any(|v| unreadable(v.as_bytes()));
        // The same field sent as a form, should the vendor read one there: a multipart
        // form's `purpose` (by the strict part parser), a urlencoded body's field of that name.
        if let ([Step::Key(name)], false) =
            (&*path.steps, body.get(skip_ws(body, start)) == Some(&b'{'))
        {
            out.ambiguous |= match boundaries {
                [b] if &**name == "purpose" => {
                    super::multipart_purpose(body, b).is_some_and(unreadable)
                }
                [] => super::form_fields(body, name).any(|v| unreadable(&v)),
                _ => false,
            };
        }
    }
    out
}

/// JSON Lines: each line that holds an object is walked. Other lines are passed over: a
/// multipart upload's boundaries and part headers, and its other fields, are lines too.
///
/// Lines end at LF (a CR before it is white space to JSON). Python's `str.splitlines` also
/// ends them at CR, VT, FF and the file, group and record separators, so a line holding one
/// of those inside could be two requests to the vendor and one to us: it is ambiguous, as is
/// a line that is an object followed by more than white space (see [`splits_in_python`]). A line cut
/// short is ambiguous too unless the prefix ends there (the body past the cap is the limit of
/// body rules, as for the top-level `model`). White space and invisible characters before
/// the object (a byte-order mark, U+00A0, U+3000, control characters) are skipped, as a
/// reader that strips lines would. What we cannot read as the vendor would is ambiguous: a
/// part with a transfer encoding (base64, quoted-printable) or a charset other than UTF-8,
/// and text in UTF-16 or UTF-32 (NUL bytes, or their byte-order marks).
///
/// A multipart upload whose `purpose` says it is not a batch input (an assistant's PDF,
/// fine-tuning data) is not read: it is never run as requests, and a binary file would only
/// trip these checks. See [`not_a_batch_upload`].
fn lines_at(body: &[u8], steps: &[Step], boundaries: &[Vec<u8>], out: &mut Nested) {
    if not_a_batch_upload(body, boundaries) {
        return;
    }
    let mut lines = body.split(|&c| c == b'\n').peekable();
    while let Some(line) = lines.next() {
        let last = lines.peek().is_none();
        let line = line.trim_ascii();
        if transfer_coded(line) || other_charset(line) {
            out.ambiguous = true;
            continue;
        }
        if line.contains(&0)
            || line.starts_with(b"\xFF\xFE")
            || line.starts_with(b"\xFE\xFF")
            || splits_in_python(line)
        {
            out.ambiguous = true;
            continue;
        }
        let Some(at) = object_start(line) else {
            continue;
        };
        let line = &line[at..];
        let whole = match skip_value(line, 0) {
            Ok(end) => line[end..].trim_ascii().is_empty(),
            Err(Stop::Truncated) => last,
            Err(_) => false,
        };
        match walk(line, 0, steps, out) {
            Err(Stop::Malformed) => out.ambiguous = true,
            Err(_) if !last => out.ambiguous = true,
            _ => {}
        }
        out.ambiguous |= !whole;
    }
}

/// Where the line's object starts: at its first `{`, when all before it is white space or
/// invisible (controls, byte-order mark, zero-width characters), as a reader that strips each
/// line sees it.
fn object_start(line: &[u8]) -> Option<usize> {
    let at = memchr::memchr(b'{', line)?;
    let lead = std::str::from_utf8(&line[..at]).ok()?;
    lead.chars()
        .all(|c| {
            c.is_whitespace()
                || c.is_control()
                || matches!(c, '\u{feff}' | '\u{200b}'..='\u{200d}' | '\u{2060}')
        })
        .then_some(at)
}

/// A part header line (`Content-Transfer-Encoding: base64`) saying the part's bytes are
/// encoded: they are not the text the vendor reads.
fn transfer_coded(line: &[u8]) -> bool {
    header_value(line, b"content-transfer-encoding").is_some_and(|v| {
        !["7bit", "8bit", "binary"]
            .iter()
            .any(|e| v.trim_ascii().eq_ignore_ascii_case(e.as_bytes()))
    })
}

/// A part header line (`Content-Type: text/plain; charset=utf-16`) naming a charset other
/// than UTF-8 (or one that cannot be parsed).
fn other_charset(line: &[u8]) -> bool {
    header_value(line, b"content-type").is_some_and(|v| match super::params(v) {
        Some((_, ps)) => ps
            .iter()
            .any(|(n, v, _)| n == b"charset" && !super::utf8_charset(v)),
        None => true,
    })
}

/// The value of a header line named `name` (any case, white space before the colon too).
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = memchr::memchr(b':', line)?;
    line[..colon]
        .trim_ascii()
        .eq_ignore_ascii_case(name)
        .then(|| &line[colon + 1..])
}

/// Whether a multipart upload says, without doubt, that its file is not a batch input: its
/// one `purpose` field (OpenAI's and its imitators' Files API), read by the same strict
/// part parser as a form's `model`, is a plain word other than `batch`. Any doubt reads the
/// file: two boundaries, framing or headers parsers read differently, two fields that are or
/// may be `purpose` (`name*=`, `purp\ose`), a transfer-encoded one (a base64 `purpose` can
/// say `batch`), a body cut at the inspection cap.
fn not_a_batch_upload(body: &[u8], boundaries: &[Vec<u8>]) -> bool {
    let [boundary] = boundaries else {
        return false;
    };
    super::multipart_purpose(body, boundary).is_some_and(|v| {
        !v.is_empty()
            && v.iter()
                .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
            && !v.eq_ignore_ascii_case(b"batch")
    })
}

/// Whether `str.splitlines` would end a line inside `line` (already cut at LF and trimmed)
/// where JSON allows it: CR is white space between tokens. VT, FF and the file, group and
/// record separators are not JSON anywhere, nor are NEL and U+2028/U+2029 outside strings:
/// a line split at one of those inside a string leaves a first piece with an open string,
/// which no JSON reader takes, so those are not counted (`json.dumps(ensure_ascii=False)`
/// writes U+2028 raw inside strings).
fn splits_in_python(line: &[u8]) -> bool {
    line.iter()
        .any(|&c| matches!(c, b'\r' | 0x0b | 0x0c | 0x1c..=0x1e))
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
        Some((Step::Deep, rest)) => deep(b, i, rest, out, 0),
        Some((Step::Each, rest)) => {
            if first != b'[' {
                return Ok(());
            }
            each_element(b, i, |j| walk(b, j, rest, out))
        }
    }
}

/// Calls `visit` with where each element of the array whose `[` is at `i` starts.
fn each_element(
    b: &[u8],
    i: usize,
    mut visit: impl FnMut(usize) -> Result<(), Stop>,
) -> Result<(), Stop> {
    let mut j = skip_ws(b, i + 1);
    if b.get(j) == Some(&b']') {
        return Ok(());
    }
    loop {
        visit(j)?;
        j = skip_ws(b, skip_value(b, j)?);
        match b.get(j) {
            Some(b']') => return Ok(()),
            Some(b',') => j = skip_ws(b, j + 1),
            Some(_) => return Err(Stop::Malformed),
            None => return Err(Stop::Truncated),
        }
    }
}

/// Levels `**` descends before the reading is a doubt: graders nest two or three deep, and
/// each level scans what is below it again.
const MAX_DEPTH: usize = 16;

/// `rest` walked from the value at `i` and from every value nested in it. Two members of one
/// name are both descended into: whichever the vendor keeps is decided.
fn deep(b: &[u8], i: usize, rest: &[Step], out: &mut Nested, depth: usize) -> Result<(), Stop> {
    // A cut here is a cut below too: what comes before it is still read.
    let here = walk(b, i, rest, out);
    if here == Err(Stop::Malformed) {
        return here;
    }
    below(b, i, rest, out, depth).and(here)
}

/// [`deep`] into each member or element of the value at `i`.
fn below(b: &[u8], i: usize, rest: &[Step], out: &mut Nested, depth: usize) -> Result<(), Stop> {
    let nested = matches!(b.get(i), Some(b'{' | b'['));
    if nested && depth == MAX_DEPTH {
        out.ambiguous = true;
        return Ok(());
    }
    match b.get(i) {
        Some(b'{') => {
            let mut members = Members::at(b, i);
            loop {
                match members.next() {
                    Ok(m) => deep(b, m.value, rest, out, depth + 1)?,
                    Err(Stop::Closed) => return Ok(()),
                    Err(stop) => return Err(stop),
                }
            }
        }
        Some(b'[') => each_element(b, i, |j| deep(b, j, rest, out, depth + 1)),
        _ => Ok(()),
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
        let n = models_at(body.as_bytes(), path, &[]);
        (n.models, n.ambiguous)
    }

    fn jsonl() -> FieldPath {
        FieldPath::parse("body.model").unwrap().per_line()
    }

    /// A Batch API input file: one request per line, alone or as a multipart upload's file
    /// part, CRLF or LF, the other fields and the part headers passed over.
    #[test]
    fn each_line_of_a_batch_file_names_its_model() {
        let line = |id: &str, m: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{m}","messages":[{{"role":"user","content":"model"}}]}}}}"#
            )
        };
        let file = [
            line("a", "gpt-4o-mini"),
            line("b", "o1-pro"),
            line("c", "gpt-4o-mini"),
        ]
        .join("\n");
        let both = (vec!["gpt-4o-mini".to_string(), "o1-pro".to_string()], false);
        assert_eq!(models(&file, &jsonl()), both);
        assert_eq!(
            models(&(file.replace('\n', "\r\n") + "\r\n"), &jsonl()),
            both
        );
        let upload = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{file}\n\r\n--XyZ--\r\n"
        );
        assert_eq!(models(&upload, &jsonl()), both);
        // A fine-tuning file names no model in its lines; nor does a prefix cut mid-line.
        assert_eq!(
            models(r#"{"messages":[{"role":"user","content":"hi"}]}"#, &jsonl()),
            (vec![], false)
        );
        let cut = &file[..file.len() - 20];
        assert!(!models(cut, &jsonl()).1);
    }

    /// Where another line splitter could see a request this one does not, the file is
    /// ambiguous: a CR (or VT, FF, NEL, U+2028 …) inside a line, two objects on one line, a line
    /// cut short before the end, malformed JSON.
    #[test]
    fn a_batch_file_that_splits_otherwise_is_ambiguous() {
        let ok = r#"{"custom_id":"a","body":{"model":"gpt-4o-mini"}}"#;
        let hidden = r#"{"custom_id":"b","body":{"model":"o1-pro"}}"#;
        for sep in [
            "\r", "\u{b}", "\u{c}", "\u{1e}", "\u{85}", "\u{2028}", "\u{2029}", " ",
        ] {
            let file = format!("{ok}{sep}{hidden}\n{ok}\n");
            assert!(models(&file, &jsonl()).1, "{sep:?}");
        }
        let spread = "{\"custom_id\":\"b\",\"body\":\r{\"model\":\"o1-pro\"}}\n";
        assert!(models(spread, &jsonl()).1);
        assert!(models(&format!("{{\"body\":{{\"model\":\"o1\"\n{ok}"), &jsonl()).1);
        assert!(
            models(
                &format!("{{\"body\":{{\"model\":\"o1\"}}}}}}\n{ok}"),
                &jsonl()
            )
            .1
        );
        assert!(models(r#"{"body":{"model":"a","model":"b"}}"#, &jsonl()).1);
        // U+2028 inside a string (json.dumps with ensure_ascii=False) is no doubt either.
        let raw = "{\"custom_id\":\"a\",\"body\":{\"model\":\"gpt-4o-mini\",\"x\":\"a\u{2028}b\u{85}\"}}\n";
        assert_eq!(
            models(raw, &jsonl()),
            (vec!["gpt-4o-mini".to_string()], false)
        );
        // White space before the object is no doubt.
        assert_eq!(
            models(&format!("  \t{hidden}\n"), &jsonl()),
            (vec!["o1-pro".to_string()], false)
        );
    }

    fn form(purpose_part: &str, file_head: &str, file: &[u8]) -> Vec<u8> {
        let mut b = format!(
            "--XyZ\r\n{purpose_part}--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n{file_head}\r\n"
        )
        .into_bytes();
        b.extend_from_slice(file);
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    }

    fn xyz() -> Vec<Vec<u8>> {
        vec![b"XyZ".to_vec()]
    }

    const BATCH: &str = "Content-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n";

    /// What the vendor decodes and we do not is ambiguous: a transfer-encoded part, another
    /// charset, UTF-16 text. What a lenient reader skips before a line's object (a
    /// byte-order mark inside the file, U+00A0, U+3000, a control character) is skipped.
    #[test]
    fn a_batch_file_is_read_as_the_vendor_decodes_it() {
        let hidden = r#"{"custom_id":"b","body":{"model":"o1-pro"}}"#;
        let doubt = |b: &[u8]| models_at(b, &jsonl(), &xyz()).ambiguous;
        assert!(doubt(&form(
            BATCH,
            "Content-Transfer-Encoding: base64\r\n",
            b"eyJjdXN0b21"
        )));
        assert!(doubt(&form(
            BATCH,
            "Content-Transfer-Encoding: quoted-printable\r\n",
            b"=7B\"body\":{}}"
        )));
        assert!(doubt(&form(
            BATCH,
            "Content-Type: text/plain; charset=utf-16\r\n",
            b"x"
        )));
        let utf16: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(hidden.encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        assert!(doubt(&form(BATCH, "", &utf16)));
        for lead in ["\u{feff}", "\u{a0}", "\u{3000}", "\u{1f}", " \u{feff}\t"] {
            let file = r#"{"custom_id":"a","body":{"model":"gpt-4o-mini"}}"#.to_string()
                + "\n"
                + lead
                + hidden;
            let n = models_at(&form(BATCH, "", file.as_bytes()), &jsonl(), &xyz());
            assert_eq!(n.models, ["gpt-4o-mini", "o1-pro"], "{lead:?}");
            assert!(!n.ambiguous, "{lead:?}");
        }
    }

    /// A file uploaded for another purpose is never run as requests, and is not read: a PDF's
    /// bytes would only look like doubtful lines. Any doubt about the purpose reads it.
    #[test]
    fn only_a_batch_upload_is_read_line_by_line() {
        let pdf = b"%PDF-1.7\n{\x00\x01\xc2\x85 junk\r\x0b}\nFinal disposition\n{\"body\":{\"model\":\"o1-pro\"}}\n";
        let assistants = "Content-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n";
        let n = models_at(
            &form(assistants, "Content-Type: application/pdf\r\n", pdf),
            &jsonl(),
            &xyz(),
        );
        assert_eq!((n.models.len(), n.ambiguous), (0, false));
        // A second purpose hidden inside a quoted value for us, and a parameter to
        // python-multipart (which counts quotes) or Werkzeug (which quotes only after `key=`).
        for hidden in [
            "x=\"a\\\\\"; y=\"; name=purpose; z=\"",
            "y= \"; name=purpose; z=\"",
            "y@=\"; name=purpose; z=\"",
        ] {
            let second = format!(
                "{assistants}--XyZ\r\nContent-Disposition: form-data; {hidden}\r\n\r\nbatch\r\n"
            );
            let n = models_at(&form(&second, "", pdf), &jsonl(), &xyz());
            assert!(n.ambiguous, "{hidden}");
        }
        // The same body framed by another boundary, or by two, is not sure of its purpose.
        for boundaries in [
            vec![b"Other".to_vec()],
            vec![b"XyZ".to_vec(), b"XyZ".to_vec()],
            vec![],
        ] {
            let n = models_at(&form(assistants, "", pdf), &jsonl(), &boundaries);
            assert!(n.ambiguous, "{boundaries:?}");
        }
        for purpose in [
            BATCH.to_string(),
            String::new(),
            format!("{assistants}--XyZ\r\n{BATCH}"),
            "Content-Disposition: form-data; name*=utf-8''purpose\r\n\r\nassistants\r\n".into(),
            "Content-Disposition: form-data; name=\"purp\\ose\"\r\n\r\nassistants\r\n".into(),
            "Content-Disposition: form-data; name=\"purpose\"\r\nContent-Transfer-Encoding: base64\r\n\r\nYmF0Y2g=\r\n".into(),
            "Content-Disposition: form-data; name=\"purpose\"\n\nbatch\n--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nassistants\r\n".into(),
        ] {
            let n = models_at(&form(&purpose, "", pdf), &jsonl(), &xyz());
            assert!(n.ambiguous, "{purpose:?}");
        }
    }

    /// A path ending in `[]` reads each string of the array as a model (OpenRouter's
    /// `models`, tried in order when the first fails).
    #[test]
    fn a_list_of_models_names_each() {
        let list = FieldPath::parse("models[]").unwrap();
        assert_eq!(
            models(
                r#"{"models":["openai/gpt-4o", 7, {"m":"x"}, "deepseek/deepseek-r1"]}"#,
                &list
            ),
            (
                vec!["openai/gpt-4o".into(), "deepseek/deepseek-r1".into()],
                false
            )
        );
        assert_eq!(
            models(r#"{"models":"deepseek/deepseek-r1"}"#, &list),
            (vec![], false)
        );
        assert!(models(r#"{"models":[],"models":["deepseek/deepseek-r1"]}"#, &list).1);
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

    /// OpenAI's graders: one grader, or a multi-grader whose `graders` are a map keyed by
    /// names the client picks, an array, or one grader, and may be multi-graders themselves.
    #[test]
    fn every_model_at_any_depth_below_is_read() {
        let graders = FieldPath::parse("grader.**.model").unwrap();
        let judge = |m: &str| {
            format!(
                r#"{{"type":"score_model","name":"j","model":"{m}","input":[{{"role":"user","content":"model"}}]}}"#
            )
        };
        for (shape, body) in [
            ("one", format!(r#"{{"grader":{}}}"#, judge("o3-pro"))),
            (
                "map",
                format!(
                    r#"{{"grader":{{"type":"multi","graders":{{"exact":{{"type":"string_check"}},"judge":{}}},"calculate_output":"judge"}}}}"#,
                    judge("o3-pro")
                ),
            ),
            (
                "array",
                format!(
                    r#"{{"grader":{{"type":"multi","graders":[{}]}}}}"#,
                    judge("o3-pro")
                ),
            ),
            (
                "single",
                format!(
                    r#"{{"grader":{{"type":"multi","graders":{}}}}}"#,
                    judge("o3-pro")
                ),
            ),
            (
                "nested",
                format!(
                    r#"{{"grader":{{"type":"multi","graders":{{"outer":{{"type":"multi","graders":{{"j":{}}}}}}}}}}}"#,
                    judge("o3-pro")
                ),
            ),
        ] {
            assert_eq!(
                models(&body, &graders),
                (vec!["o3-pro".into()], false),
                "{shape}"
            );
        }
        // Keys of one name twice: both are read, whichever the vendor keeps.
        let twice = r#"{"grader":{"graders":{"a":{"model":"x"},"a":{"model":"y"}}}}"#;
        assert_eq!(
            models(twice, &graders),
            (vec!["x".into(), "y".into()], false)
        );
        assert_eq!(
            models(r#"{"grader":{"graders":{}}}"#, &graders),
            (vec![], false)
        );
        assert_eq!(
            models(r#"{"model":"not below grader"}"#, &graders),
            (vec![], false)
        );
        let malformed = r#"{"grader":{"graders":{"a":{"model":"x"} "b":{"model":"y"}}}}"#;
        assert!(models(malformed, &graders).1);
        let cut = r#"{"grader":{"graders":{"a":{"model":"x"},"b":{"mod"#;
        assert_eq!(models(cut, &graders), (vec!["x".into()], false));
        // Deeper than anything a vendor nests: a doubt, not a scan without end.
        let deep = format!(r#"{{"grader":{}{}}}"#, "[".repeat(40), "]".repeat(40));
        assert!(models(&deep, &graders).1);
    }

    /// OpenAI's Uploads API sends a file in parts that cut its lines anywhere: a batch input
    /// sent that way cannot be read, so its creation is the doubt. Other purposes pass.
    #[test]
    fn a_field_value_can_make_the_models_unreadable() {
        let purpose = FieldPath::parse("purpose")
            .unwrap()
            .unreadable_when(&["batch"]);
        for (body, doubt) in [
            (
                r#"{"purpose":"batch","filename":"in.jsonl","bytes":9}"#,
                true,
            ),
            (r#"{"purpose":" Batch ","filename":"in.jsonl"}"#, true),
            (r#"{"purpose":"batch"}"#, true),
            (r#"{"purpose":"fine-tune","filename":"t.jsonl"}"#, false),
            (r#"{"purpose":"assistants"}"#, false),
            (r#"{"filename":"no purpose"}"#, false),
            // Named twice, or in another case: which one the vendor keeps is a doubt too.
            (r#"{"purpose":"assistants","purpose":"user_data"}"#, true),
            (r#"{"Purpose":"assistants"}"#, true),
            // As a form, should the vendor take one.
            ("purpose=batch&filename=a.jsonl", true),
            ("filename=a.jsonl&PURPOSE=%62atch", true),
            ("purpose=assistants&filename=a.pdf", false),
        ] {
            assert_eq!(models(body, &purpose), (vec![], doubt), "{body}");
        }
        let form = |p: &str| {
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{p}\r\n--XyZ--\r\n")
        };
        let doubt = |body: &str| models_at(body.as_bytes(), &purpose, &xyz()).ambiguous;
        assert!(doubt(&form("batch")));
        assert!(!doubt(&form("assistants")));
        // An upload's part (`/v1/uploads/{id}/parts`) names no purpose: not a doubt.
        assert!(!doubt("--XyZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n{\"custom_id\":1}\r\n--XyZ--\r\n"));
    }

    #[test]
    fn field_paths_name_keys_and_arrays() {
        assert!(FieldPath::parse("requests[].params.model").is_ok());
        assert!(FieldPath::parse("models[]").is_ok());
        assert!(FieldPath::parse("grader.**.model").is_ok());
        assert!(FieldPath::parse("**.model").is_ok());
        for bad in [
            "",
            "[]",
            "models[][]",
            "a..model",
            "a[0].model",
            "a.\"b\"",
            "a.**",
            "a.**.**.m",
            "a**.m",
            "a.*.m",
        ] {
            assert!(FieldPath::parse(bad).is_err(), "{bad}");
        }
    }
}
