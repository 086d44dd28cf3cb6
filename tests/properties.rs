//! Properties of the parsers that read untrusted or hand-edited input.
//!
//! Regression tests for what the fuzzers found are at the end.

use portcullis::identity::htpasswd::{Htpasswd, HtpasswdError};

const BCRYPT: &str = "$2y$05$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC";

// ---------------------------------------------------------------------------------------------
// Regressions found by the fuzzers (scripts/fuzz.sh); the inputs are also in fuzz/seeds.

/// fuzz target `htpasswd`: a bcrypt prefix with the hash cut short ("$2y$0") sliced past the
/// end of the string and panicked, taking the proxy down at start or reload.
#[test]
fn regression_htpasswd_truncated_bcrypt_is_an_error() {
    for text in [
        "alice:$2y$0\nbob:$apr1$abc$G37mj9g=\nd:$6$s.l#c\n#c\n",
        "u:$2y$",
        "u:$2a$1",
        "u:$2b$04",
        "u:$2y$\u{e9}\u{e9}",
        "u:$2y$0\u{e9}",
    ] {
        match Htpasswd::parse("users", text) {
            Err(HtpasswdError::Parse { line: 1, msg, .. }) => {
                assert!(msg.contains("malformed bcrypt"), "{text:?}: {msg}")
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    // A whole hash with a multi-byte character where the salt starts is refused too.
    let mangled = format!("u:$2y$05\u{e9}{}", &BCRYPT[9..]);
    assert!(Htpasswd::parse("users", &mangled).is_err());
}
