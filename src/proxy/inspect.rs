//! Holding back the first part of a request body so DLP and `model` rules can see it before
//! the decision; the held frames are then replayed upstream ahead of the rest of the body.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_ENCODING;
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use std::net::IpAddr;

use super::budget::Held;

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
    /// The body went on past the cap: the rest streams unread.
    pub partial: bool,
    /// A content coding (gzip, br…) we do not decode: the bytes say nothing.
    pub encoded: Option<String>,
    /// The body names its model twice, or is malformed JSON: vendors' parsers differ on which
    /// `model` counts, or find one where we do not.
    pub ambiguous: bool,
}

/// Reads up to `ins.max_body` of `body` (waiting at most `ins.timeout`), inspects it, and
/// returns the body to send on: the held frames, then whatever is left.
pub async fn inspect(
    ins: &Inspection,
    client: IpAddr,
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

    // One copy of the prefix, which is both scanned and sent on; the frames it came in are
    // dropped as they are copied. Content-Length (when sent) sizes it once.
    let expect = body
        .size_hint()
        .upper()
        .unwrap_or(0)
        .min(ins.max_body as u64) as usize;
    let mut prefix = BytesMut::with_capacity(expect);
    // Bytes past the prefix in its last frame, and trailers: sent after the prefix.
    let mut after: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut budget: Option<Held> = None;
    let deadline = tokio::time::Instant::now() + ins.timeout;
    let mut ended = false;
    while prefix.len() < ins.max_body {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            // A client that pauses past the wait must not get the rest past the rules
            // uninspected: deciding on "what arrived" would let a secret sent after a pause
            // through. Refused (408) instead.
            Err(_) => return Err(ProxyError::ClientBodyTimeout),
            Ok(None) => {
                ended = true;
                break;
            }
            Ok(Some(Err(e))) => return Err(ProxyError::ClientBody(e.to_string())),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => {
                    let take = d.len().min(ins.max_body - prefix.len());
                    // Fail closed: forwarding uninspected would skip the rules.
                    if !ins.budget.take(client, take, &mut budget) {
                        return Err(ProxyError::InspectionBusy);
                    }
                    prefix.extend_from_slice(&d[..take]);
                    if take < d.len() {
                        after.push_back(Frame::data(d.slice(take..)));
                    }
                }
                Err(trailers) => after.push_back(trailers),
            },
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
        out.ambiguous = model::model_ambiguous(&prefix);
    }
    let rest = (!ended).then_some(body);
    if !prefix.is_empty() {
        after.push_front(Frame::data(prefix.freeze()));
    }
    Ok((out, RequestBody::resumed(after, budget, rest)))
}
