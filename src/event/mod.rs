//! Event-loop building blocks.

pub mod timers;
