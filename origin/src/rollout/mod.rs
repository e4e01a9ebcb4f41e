//! Canary-then-replicate rollouts (brief 003), from pure to I/O:
//!
//! - [`plan`]: the pure state machine (waves, canaries, halt rules, pause/resume/abort); no
//!   I/O, no clock.
//! - [`driver`]: drives a plan through a [`driver::Fleet`] (offers of a wave at once, reports
//!   fed back, saved after every step, the operator's controls).
//! - [`service`]: `origin rollout ...`, server side: the fleet is remote swaps at the addresses
//!   nodes reported; the state is `rollout.json` in the origin's home, resumed when
//!   `origin serve` restarts.

pub mod driver;
pub mod plan;
pub mod service;
