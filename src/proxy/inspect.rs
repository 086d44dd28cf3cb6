//! Holding back the first part of a request body so DLP and `model` rules can see it before
//! the decision; the held frames are then replayed upstream ahead of the rest of the body.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_ENCODING;
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::RequestBody;
use crate::error::ProxyError;
use crate::inspect::{dlp::Hits, model};
use crate::policy::Inspection;

/// What the held-back prefix showed.
#[derive(Debug, Default)]
pub struct Inspected {
    /// The JSON body's top-level `model`, lowercased.
    pub model: Option<String>,
    pub dlp: Hits,
    /// Bytes inspected.
    pub seen: usize,
    /// The body went on past the cap (or the wait ran out): the rest streams unread.
    pub partial: bool,
    /// A content coding (gzip, br…) we do not decode: the bytes say nothing.
    pub encoded: Option<String>,
    /// The body names its model twice: vendors' parsers differ on which one counts.
    pub ambiguous: bool,
}

/// Reads up to `ins.max_body` of `body` (waiting at most `ins.timeout`), inspects it, and
/// returns the body to send on: the held frames, then whatever is left.
pub async fn inspect(
    ins: &Inspection,
    headers: &HeaderMap,
    mut body: Incoming,
) -> Result<(Inspected, RequestBody), ProxyError> {
    let mut out = Inspected::default();
    // Every field and every listed coding: `identity` first and `gzip` in a second field
    // is still gzip.
    let coded = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"));
    if let Some(enc) = coded {
        out.encoded = Some(enc.chars().take(32).collect());
        return Ok((out, RequestBody::streamed(body)));
    }
    if body.is_end_stream() {
        return Ok((out, RequestBody::streamed(body)));
    }

    let mut held: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut prefix = BytesMut::new();
    let deadline = tokio::time::Instant::now() + ins.timeout;
    let mut ended = false;
    while prefix.len() < ins.max_body {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => break,
            Ok(None) => {
                ended = true;
                break;
            }
            Ok(Some(Err(e))) => return Err(ProxyError::ClientBody(e.to_string())),
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let room = ins.max_body - prefix.len();
                    prefix.extend_from_slice(&d[..d.len().min(room)]);
                }
                held.push_back(frame);
            }
        }
    }
    ended = ended || body.is_end_stream();
    out.partial = !ended;
    out.seen = prefix.len();
    if ins.dlp != 0 {
        out.dlp = ins.scanner.scan(&prefix);
    }
    if ins.models {
        out.model = model::model(&prefix).map(|m| m.to_ascii_lowercase());
        out.ambiguous = model::duplicate_model(&prefix);
    }
    let rest = (!ended).then_some(body);
    Ok((out, RequestBody::resumed(held, rest)))
}
