//! Service definitions: one YAML file per service, parsed strictly and validated into a
//! [`Service`] that the supervisor can run without further checks.

pub mod criu_options;
mod error;
pub mod host;
mod key_lines;
mod load;
pub mod schema;
pub mod trust;
mod validate;

pub use error::{ConfigError, Problem};
#[cfg(test)]
pub use load::parse_and_validate_for_fuzzing;
pub use load::{check_name, discover, load_named, load_service, service_name_from_path};
pub use schema::{CriuSection, ServiceFile};
pub use validate::{
    OnFileChanged, OnIncompatible, Readiness, RestartFrom, RestartLimit, RestartPolicy, RestoreMode, Service,
    DEFAULT_PATH, MAX_RESTART_BACKOFF,
};
