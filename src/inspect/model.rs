use std::borrow::Cow;
pub fn model(body: &[u8]) -> Option<Cow<'_, str>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(Cow::Owned(v.get("model")?.as_str()?.to_string()))
}
