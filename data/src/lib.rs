//! data crate (no libtorch).
