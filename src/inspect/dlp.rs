pub const BUILTINS: &[&str] = &["private_key", "aws_access_key", "aws_secret_key", "gcp_service_account", "gcp_api_key", "github_token", "slack_token", "openai_key", "anthropic_key", "card_number"];
#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    #[error("unknown DLP pattern {0:?}")]
    Unknown(String),
    #[error("DLP pattern {name:?}: {source}")]
    BadRegex { name: String, #[source] source: regex::Error },
    #[error("more than 64 DLP patterns")]
    TooMany,
    #[error("duplicate DLP pattern name {0:?}")]
    Duplicate(String),
}
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Hits(pub u64);
impl Hits { pub fn is_empty(&self) -> bool { self.0 == 0 } }
pub struct Scanner { names: Vec<String>, res: Vec<regex::bytes::Regex> }
impl Scanner {
    pub fn new(custom: &[(String, String)]) -> Result<Scanner, DlpError> {
        let mut names: Vec<String> = BUILTINS.iter().map(|s| s.to_string()).collect();
        let mut res = vec![regex::bytes::Regex::new(r"-----BEGIN [A-Z ]*PRIVATE KEY( BLOCK)?-----").unwrap()];
        for _ in 1..BUILTINS.len() { res.push(regex::bytes::Regex::new(r"\bAKIA[0-9A-Z]{16}\b").unwrap()); }
        for (n, r) in custom { if names.contains(n) { return Err(DlpError::Duplicate(n.clone())); } names.push(n.clone()); res.push(regex::bytes::Regex::new(r).map_err(|source| DlpError::BadRegex{name:n.clone(), source})?); }
        if names.len() > 64 { return Err(DlpError::TooMany); }
        Ok(Scanner { names, res })
    }
    pub fn index(&self, name: &str) -> Option<usize> { self.names.iter().position(|n| n == name) }
    pub fn name(&self, i: usize) -> &str { &self.names[i] }
    pub fn len(&self) -> usize { self.names.len() }
    pub fn is_empty(&self) -> bool { self.names.is_empty() }
    pub fn scan(&self, body: &[u8]) -> Hits { let mut h = 0; for (i, r) in self.res.iter().enumerate() { if r.is_match(body) { h |= 1 << i; } } Hits(h) }
    pub fn names(&self, hits: Hits) -> impl Iterator<Item = &str> { self.names.iter().enumerate().filter(move |(i, _)| hits.0 & (1 << i) != 0).map(|(_, n)| n.as_str()) }
}
