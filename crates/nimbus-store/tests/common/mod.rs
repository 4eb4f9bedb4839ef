//! Helpers of the store's integration tests.

pub mod tmpfs;
