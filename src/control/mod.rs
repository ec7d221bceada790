//! The admin interface: the control FIFO protocol (pure), its server side in PID 1, and the
//! client used by `taucli`.

pub mod client;
pub mod protocol;
pub mod server;
pub mod view;
