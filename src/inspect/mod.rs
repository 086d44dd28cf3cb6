//! Request-body inspection for intercepted vendor traffic.
//!
//! The proxy buffers at most a configured cap of an intercepted request body,
//! runs these inspectors over that prefix, decides (allow, block, audit), and
//! then streams the body on to the vendor unchanged. Because only a prefix is
//! seen, every inspector here must give a sound answer on truncated input and
//! must cost at most linear time in the prefix length: they sit on the hot
//! request path and an attacker controls the bytes.
//!
//! * [`dlp`] finds which secret/PII patterns occur in the body. Audit records
//!   carry pattern *names* only, never the matched text, so that the audit
//!   log does not become a second copy of the leaked secret.
//! * [`model`] pulls the top-level `"model"` field out of a JSON body (or the
//!   `model` field of a form) so that policy can be applied per model without
//!   a full parse.
//! * [`unreadable`] tells when the bytes are not UTF-8 text at all, so that
//!   neither of the above can read them.

pub mod dlp;
pub mod model;

/// Why a body prefix cannot be read as UTF-8 text, when it cannot: both inspectors read
/// bytes as UTF-8 (ASCII patterns, ASCII keys), but a vendor may decode the body otherwise.
/// Python's `json.loads` and Java's Jackson take bytes starting with a UTF-16 or UTF-32
/// byte-order mark, or with a NUL in the first four bytes (RFC 4627 §3 detection: `{` in
/// UTF-16 is `{\0` or `\0{`), as UTF-16 or UTF-32, where `"model"` and every secret are
/// spelled with NULs between their letters. NUL bytes anywhere else also mean the body is
/// not text, unless `binary` (a multipart form or a declared binary media type, whose file
/// contents are sent as they are and whose text parts are read where they stand).
pub fn unreadable(prefix: &[u8], binary: bool) -> Option<&'static str> {
    const BOMS: [(&[u8], &str); 4] = [
        (b"\x00\x00\xFE\xFF", "a UTF-32BE byte-order mark"),
        (b"\xFF\xFE\x00\x00", "a UTF-32LE byte-order mark"),
        (b"\xFE\xFF", "a UTF-16BE byte-order mark"),
        (b"\xFF\xFE", "a UTF-16LE byte-order mark"),
    ];
    if let Some((_, what)) = BOMS.iter().find(|(bom, _)| prefix.starts_with(bom)) {
        return Some(what);
    }
    if prefix.iter().take(4).any(|&b| b == 0) {
        return Some("NUL bytes at its start: UTF-16 or UTF-32 without a byte-order mark");
    }
    if !binary && prefix.contains(&0) {
        return Some("NUL bytes");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utf16le(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    fn utf16be(s: &str) -> Vec<u8> {
        s.encode_utf16().flat_map(u16::to_be_bytes).collect()
    }

    fn utf32(s: &str, le: bool) -> Vec<u8> {
        s.chars()
            .flat_map(|c| match le {
                true => (c as u32).to_le_bytes(),
                false => (c as u32).to_be_bytes(),
            })
            .collect()
    }

    #[test]
    fn inspect_unreadable_finds_utf16_and_utf32_with_or_without_a_bom() {
        let json = r#"{"model":"gpt-4o"}"#;
        let spaced = " \n{\"model\":\"gpt-4o\"}";
        for body in [
            utf16le(json),
            utf16be(json),
            utf16le(spaced),
            utf16be(spaced),
            utf16le(&format!("\u{FEFF}{json}")),
            utf16be(&format!("\u{FEFF}{json}")),
            utf32(json, true),
            utf32(json, false),
            utf32(&format!("\u{FEFF}{json}"), true),
            utf32(&format!("\u{FEFF}{json}"), false),
            // Only the first bytes of a cut prefix.
            utf16le("{"),
            utf16be("{"),
            b"\xFF\xFE".to_vec(),
        ] {
            assert!(unreadable(&body, false).is_some(), "{body:?}");
            // Whatever the declared type: the detection is the vendor's, not ours.
            assert!(unreadable(&body, true).is_some(), "{body:?}");
        }
        assert_eq!(
            unreadable(&utf32(&format!("\u{FEFF}{json}"), true), false),
            Some("a UTF-32LE byte-order mark")
        );
    }

    #[test]
    fn inspect_unreadable_passes_utf8_and_binary_declared_bodies() {
        for body in [
            &b""[..],
            b"{",
            br#"{"model":"gpt-4o"}"#,
            "\u{FEFF}{\"model\":\"caf\u{e9} \u{1F600}\"}".as_bytes(),
            b"model=gpt-4o&x=1",
            // Not UTF-8 but not another encoding either: invalid bytes are read where they
            // stand.
            b"{\"x\":\"\xff\xfe\"}",
        ] {
            assert_eq!(unreadable(body, false), None, "{body:?}");
        }
        let png_like =
            b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n\x89PNG\x00\x00\r\n--b--";
        assert_eq!(unreadable(png_like, true), None);
        assert_eq!(unreadable(png_like, false), Some("NUL bytes"));
    }
}
