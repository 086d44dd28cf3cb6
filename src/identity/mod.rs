//! Who is asking: the source address, an optional proxy user (htpasswd), and API-key
//! fingerprints seen on the request.

pub mod htpasswd;
pub mod keys;
