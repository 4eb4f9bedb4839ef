//! What Nimbus's own tests share: never a dependency of the server, only of tests.

pub mod fake_driver;
pub mod internet;
pub mod server;
