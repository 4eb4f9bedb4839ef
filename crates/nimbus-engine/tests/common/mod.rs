//! The engine tests' harness: an engine on a SQLite store and the embedded state store in a
//! temporary directory, starting real Python workers with the (unisolated) process driver.

use std::sync::Arc;

use nimbus_engine::{Engine, EngineConfig};
use nimbus_runtime::{RuntimeSettings, Runtimes};
use nimbus_sandbox::{Driver, ProcessDriver};
use nimbus_state::embedded::EmbeddedStore;
use nimbus_state::State;

/// An engine, its metadata store and the directory it keeps its files in.
#[allow(dead_code)] // Each test crate uses a different part of it.
pub struct Harness {
    pub engine: Arc<Engine>,
    pub store: Arc<dyn nimbus_store::MetadataStore>,
    _dir: tempfile::TempDir,
}

/// An engine with the default configuration as `tune` changes it.
#[allow(dead_code)] // Each test crate uses a different part of it.
pub async fn harness(tune: impl FnOnce(&mut EngineConfig)) -> Harness {
    harness_on(Arc::new(ProcessDriver::new()), tune).await
}

/// [`harness`] with workers started by `driver`.
pub async fn harness_on(driver: Arc<dyn Driver>, tune: impl FnOnce(&mut EngineConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = nimbus_store::open(&format!(
        "sqlite:{}",
        dir.path().join("nimbus.db").display()
    ))
    .await
    .unwrap();
    let runtimes = Runtimes::discover(&RuntimeSettings::default(), dir.path());
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    tune(&mut config);
    let state = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    let state = State::new(Arc::new(state));
    let engine = Engine::start(config, store.clone(), state, driver, runtimes).unwrap();
    Harness {
        engine,
        store,
        _dir: dir,
    }
}
