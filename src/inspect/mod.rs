//! PLACEHOLDER until the real module lands.
pub mod dlp;
pub mod model;
