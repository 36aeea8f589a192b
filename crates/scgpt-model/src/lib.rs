//! The scGPT model in burn (issue 3). This crate currently only pins the burn stack so the
//! workspace builds it; the model lands with the model issue.
pub use burn;
