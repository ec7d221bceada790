//! Configuration: `tau.toml`, unit files and the kernel command line.
//!
//! [`model`] holds the serde types, [`load`] parses and validates them into resolved
//! [`Unit`]s, [`cmdline`] reads `/proc/cmdline`, and every problem is a located [`Diagnostic`].

pub mod cmdline;
pub mod diag;
pub mod load;
pub mod model;

pub use cmdline::{Cmdline, CrashAction, parse_cmdline};
pub use diag::Diagnostic;
pub use load::{
    IdDb, check_executable, load_config, load_config_or_default, load_units, lookup_group,
    lookup_user, parse_config, parse_signal, parse_unit, parse_unit_with_ids, start_order,
    valid_unit_name,
};
pub use model::{Config, Priority, Ready, Recovery, Strategy, Unit, UnitFile};
