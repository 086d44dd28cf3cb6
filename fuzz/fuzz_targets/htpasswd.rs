//! htpasswd files and `Proxy-Authorization: Basic` values.
//!
//! The parser reads an operator's file, but a file edited by hand (or by a broken tool) must
//! give an error with a usable FILE:LINE:COL, never a panic at start or reload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::identity::htpasswd::{parse_basic, Htpasswd, HtpasswdError};

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        if let Some((user, _password)) = parse_basic(&value) {
            assert!(!user.contains(':'));
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Htpasswd::parse("fuzz.htpasswd", text) {
        Ok(h) => {
            let entries = text
                .split('\n')
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .count();
            assert_eq!(h.len(), entries);
        }
        Err(HtpasswdError::Parse {
            path,
            line,
            col,
            msg,
        }) => {
            assert_eq!(path, "fuzz.htpasswd");
            let lines: Vec<&str> = text.split('\n').collect();
            assert!(
                line >= 1 && line <= lines.len(),
                "line {line} of {}",
                lines.len()
            );
            let width = lines[line - 1].chars().count();
            assert!(col >= 1 && col <= width + 1, "col {col} of {width}: {msg}");
        }
        Err(e @ HtpasswdError::Io { .. }) => panic!("parse cannot do I/O: {e}"),
    }
});
