//! Signals derived from traffic: bulk extraction.

pub mod bulk;
