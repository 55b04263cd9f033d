//! End-to-end tests: the real `jetsync-applier` binary against real `nats-server` processes.

mod smoke;
mod convergence;
mod downtime;
mod exit_codes;
mod crash;
mod consumer_state;
mod server_restart;
mod http;
mod security;
mod cluster;
mod postgres;
