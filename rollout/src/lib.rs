//! In-process generation engine.
