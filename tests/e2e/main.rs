//! End-to-end tests: the real `jetsync-applier` binary against real `nats-server` processes.

mod smoke;
mod convergence;
mod downtime;
mod exit_codes;
