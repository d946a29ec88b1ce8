//! rewards crate (no libtorch).
