//! TLS pieces that do not depend on the request handler: the ClientHello peek, the
//! interception CA with its leaf cache, and the replay of peeked bytes into the acceptor.

pub mod ca;
pub mod rewind;
pub mod sni;
