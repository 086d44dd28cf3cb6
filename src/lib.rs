//! portcullis: an egress proxy that blocks, limits and audits AI services at the network edge.
//!
//! The request path, top to bottom: [`proxy::server`] accepts, [`proxy::handler`] serves one
//! request (identity, [`policy::target`] normalisation, [`policy::Policy::decide`], forward
//! through [`upstream`], [`audit`] and [`metrics`]); [`proxy::connect`] does CONNECT tunnels
//! with the [`tls::sni`] peek. [`config`] compiles files into an immutable [`policy::Policy`].
//! Arrows point down: `policy` knows nothing of the proxy, `tls` nothing of the handler.

pub mod admin;
pub mod app;
pub mod audit;
pub mod ca;
pub mod config;
pub mod error;
pub mod identity;
pub mod inspect;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod secrets;
pub mod signals;
pub mod tls;
pub mod upstream;
