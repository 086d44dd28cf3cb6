//! TLS pieces that do not depend on the request handler: the ClientHello peek.

pub mod sni;
