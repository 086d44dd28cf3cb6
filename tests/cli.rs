//! The command line: check, explain, ca init.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::{within, BIN, VENDORS};

async fn portcullis(args: &[&str]) -> Output {
    within(
        "portcullis CLI",
        tokio::process::Command::new(BIN)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run portcullis")
}

/// A config file: the catalog include, a listener, then `body`. Lines 1-4 are the preamble.
fn config(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    let text = format!("include = [\"{VENDORS}\"]\n\n[proxy]\nlisten = \"127.0.0.1:0\"\n{body}");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const GOOD: &str = r#"
[[rule]]
id = "block-deepseek"
vendor = "deepseek"
action = "block"
reason = "DeepSeek is not approved (policy SEC-12)"
"#;

#[tokio::test]
async fn check_accepts_a_good_config_with_a_one_line_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "good.toml", GOOD);
    let out = portcullis(&["check", "--config", &path]).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("ok") && stdout.contains("1 rules"),
        "{stdout}"
    );
}

/// A rule that acts on what only an intercepted request shows (an endpoint, a model), for a
/// vendor that is not intercepted, does nothing over HTTPS: `check` says so on stderr, and
/// the summary stays one line. Rules that tunnels do show (vendor, `app`) get no note.
#[tokio::test]
async fn check_notes_rules_that_cannot_see_into_tunnels() {
    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
[[rule]]
id = "cap-batches"
vendor = "openai"
endpoint = "batches"
action = "limit"
limit = { requests = 5, per = "1h", by = "client" }

[[rule]]
id = "no-pro"
vendor = ["anthropic", "google-gemini"]
model = "*opus*"
action = "block"

[[rule]]
id = "no-chat-app"
vendor = "openai"
endpoint = "app"
action = "block"

[[rule]]
id = "cohere-per-key"
vendor = "cohere"
action = "limit"
limit = { requests = 3, per = "1h", by = "key" }

[[rule]]
id = "cohere-bytes"
vendor = "cohere"
action = "limit"
limit = { bytes = "1GiB", per = "1d", by = "client" }

[[rule]]
id = "no-deepseek"
vendor = "deepseek"
action = "block"
"#;
    let path = config(dir.path(), "blind.toml", rules);
    let out = portcullis(&["check", "--config", &path]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let notes: Vec<&str> = stderr.lines().collect();
    assert_eq!(notes.len(), 3, "{stderr}");
    assert!(
        notes[0].contains("note: rule cap-batches") && notes[0].ends_with(": openai)"),
        "{stderr}"
    );
    assert!(
        notes[1].contains("rule no-pro") && notes[1].ends_with(": anthropic, google-gemini)"),
        "{stderr}"
    );
    // A request count and a per-key limit on a vendor not intercepted count tunnels by client
    // address there (found by the red team); a byte limit works on tunnels alike.
    assert!(
        notes[2].contains("rule cohere-per-key limits requests by API key")
            && notes[2].contains("counts tunnels opened, by client address")
            && notes[2].ends_with(": cohere)"),
        "{stderr}"
    );

    // With the vendors intercepted: nothing to note.
    let ca = tempfile::tempdir().unwrap();
    portcullis::ca::init(ca.path(), "test CA").unwrap();
    let intercepted = format!(
        "{rules}\n[intercept]\nca_cert = \"{}\"\nca_key = \"{}\"\nvendors = [\"openai\", \"anthropic\", \"google-gemini\", \"cohere\"]\n",
        ca.path().join("ca.pem").display(),
        ca.path().join("ca.key").display()
    );
    let path = config(dir.path(), "seeing.toml", &intercepted);
    let out = portcullis(&["check", "--config", &path]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stderr).unwrap(), "");
}

/// Runs `check` on `body` and returns (line, col, message) of the one error line.
async fn check_error(dir: &Path, body: &str) -> (usize, usize, String) {
    let path = config(dir, "bad.toml", body);
    let out = portcullis(&["check", "--config", &path]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let rest = stderr
        .trim_end()
        .strip_prefix(&format!("{path}:"))
        .unwrap_or_else(|| panic!("error does not start with FILE: {stderr}"));
    let mut parts = rest.splitn(3, ':');
    let line = parts
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no line: {stderr}"));
    let col = parts
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no col: {stderr}"));
    (line, col, parts.next().unwrap().trim().to_string())
}

#[tokio::test]
async fn check_names_file_line_and_column_of_each_error() {
    let dir = tempfile::tempdir().unwrap();
    // (body after the 4-line preamble, line, column, words the message must carry)
    let cases: &[(&str, usize, usize, &str)] = &[
        ("bogus_key = 1\n", 5, 1, "bogus_key"),
        ("\n[[rule]]\nid = \"r1\"\nvendor = \"openai\"\naction =  \"explode\"\n", 9, 11, "explode"),
        ("\n[[rule]]\nid = \"r1\"\nvendor = \"nosuch\"\naction = \"block\"\n", 8, 10, "nosuch"),
        ("\n[[rule]]\nid = \"r1\"\naction = \"block\"\n\n[[rule]]\n  id = \"r1\"\naction = \"allow\"\n", 11, 8, "r1"),
        ("\n[upstream]\nresolve_typo = {}\n", 7, 1, "resolve_typo"),
        ("\n[inspect]\nmax_body = \"1MiB\"\nmax_buffered = \"10KiB\"\n", 8, 16, "max_buffered"),
        ("\n[defaults]\naction = \"limit\"\n", 7, 10, "defaults"),
        ("\n[[rule]]\nid = \"r1\"\nhost = []\naction = \"block\"\n", 8, 8, "host = []"),
        ("\n[[rule]]\nid = \"r1\"\nport = 0\naction = \"block\"\n", 8, 8, "port"),
        // A catalog entry cut short after its id (a save in progress): refused, not a vendor
        // that matches nothing under a rule that then blocks nothing.
        ("\n[[vendor]]\nid = \"cut\"\nname = \"Cut\"\n", 7, 6, "names no host"),
    ];
    for &(body, line, col, word) in cases {
        let (l, c, msg) = check_error(dir.path(), body).await;
        assert_eq!((l, c), (line, col), "{body:?} -> {msg}");
        assert!(msg.contains(word), "{body:?} -> {msg}");
    }
}

#[tokio::test]
async fn check_points_at_the_unknown_vendor_inside_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let body = "\n[[rule]]\nid = \"r1\"\nvendor = [\"openai\", \"nosuch\"]\naction = \"block\"\n";
    let (line, col, msg) = check_error(dir.path(), body).await;
    assert!(msg.contains("nosuch"), "{msg}");
    // `vendor = ["openai", "nosuch"]`: the value "nosuch" (its opening quote) is at column 21,
    // as every string error points at the value's opening quote.
    assert_eq!((line, col), (8, 21), "{msg}");
}

/// `host = "api.deepseek.com:443"` used to pass `check` and then match nothing: a host pattern
/// with a port (in a rule, the catalog or `[intercept] hosts`) is an error at the value that
/// says to write the port as `port = [...]`.
#[tokio::test]
async fn check_refuses_a_port_in_a_host_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, usize, usize, &[&str])] = &[
        (
            "\n[[rule]]\nid = \"r1\"\nhost = \"api.deepseek.com:443\"\naction = \"block\"\n",
            8,
            8,
            &["api.deepseek.com:443", "port = [443]"],
        ),
        (
            "\n[[rule]]\nid = \"r1\"\nhost = [\".example.ai\", \"1.2.3.4:443\"]\naction = \"block\"\n",
            8,
            24,
            &["1.2.3.4:443", "port = [443]"],
        ),
        (
            "\n[[vendor]]\nid = \"x\"\nhosts = [\"api.x.example:8443\"]\n",
            8,
            10,
            &["api.x.example:8443", "port = [8443]"],
        ),
        (
            "\n[intercept]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\nhosts = [\"api.x.example:443\"]\n",
            9,
            10,
            &["api.x.example:443", "port = [443]"],
        ),
    ];
    for &(body, line, col, words) in cases {
        let (l, c, msg) = check_error(dir.path(), body).await;
        assert_eq!((l, c), (line, col), "{body:?} -> {msg}");
        for word in words {
            assert!(msg.contains(word), "{body:?} -> {msg}");
        }
    }
    // Address literals, IPv6 bracketed or not, stay valid rule hosts.
    let path = config(
        dir.path(),
        "v6.toml",
        "\n[[rule]]\nid = \"r1\"\nhost = [\"[2001:db8::1]\", \"2001:db8::2\", \"192.0.2.1\"]\naction = \"block\"\n",
    );
    let out = portcullis(&["check", "--config", &path]).await;
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn explain_prints_the_decision_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), "good.toml", GOOD);
    let out = portcullis(&[
        "explain",
        "--config",
        &path,
        "https://api.deepseek.com/chat/completions",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(j["vendor"], "deepseek");
    assert_eq!(j["endpoint"], "chat");
    assert_eq!(j["rule"], "block-deepseek");
    assert_eq!(j["action"], "block");
    assert_eq!(j["reason"], "DeepSeek is not approved (policy SEC-12)");

    let out = portcullis(&["explain", "--config", &path, "api.openai.com:443"]).await;
    assert!(out.status.success(), "{out:?}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(j["vendor"], "openai");
    assert_eq!(j["method"], "CONNECT");
    assert_eq!(j["port"], 443);
    assert_eq!(j["action"], "allow");
    assert!(j["reason"].is_string());
}

#[tokio::test]
async fn ca_init_writes_a_private_key_only_the_owner_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("ca");
    let out = portcullis(&["ca", "init", "--out", out_dir.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    let pem = std::fs::read_to_string(out_dir.join("ca.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let key = out_dir.join("ca.key");
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .contains("PRIVATE KEY"));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "ca.key mode {mode:o}");
    // A second init must not overwrite the key.
    let again = portcullis(&["ca", "init", "--out", out_dir.to_str().unwrap()]).await;
    assert!(!again.status.success());
}

/// A config `check` passes must start: the files it names (users, admin token, key secret,
/// upstream CA file) are read by `check` as `run` reads them, and a missing one is named by
/// its key.
#[tokio::test]
async fn check_reads_the_files_a_config_names() {
    let dir = tempfile::tempdir().unwrap();
    for (body, key) in [
        (
            "[auth]\nhtpasswd = \"missing.htpasswd\"\n",
            "[auth] htpasswd",
        ),
        (
            "[admin]\ntoken_file = \"missing.token\"\n",
            "[admin] token_file",
        ),
        (
            "[keys]\nsecret_file = \"missing-secret\"\n",
            "[keys] secret_file",
        ),
        ("[upstream]\nca_file = \"missing-ca.pem\"\n", "[upstream]"),
    ] {
        let path = config(dir.path(), "files.toml", body);
        let check = portcullis(&["check", "--config", &path]).await;
        assert_eq!(check.status.code(), Some(2), "{body}: {check:?}");
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(stderr.contains(key), "{body}: {stderr}");
    }
    // Present and private: accepted.
    let secret = dir.path().join("key-secret");
    std::fs::write(&secret, "a-deployment-secret-of-32-bytes!").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = config(
        dir.path(),
        "files.toml",
        &format!("[keys]\nsecret_file = \"{}\"\n", secret.display()),
    );
    let check = portcullis(&["check", "--config", &path]).await;
    assert!(check.status.success(), "{check:?}");
}
