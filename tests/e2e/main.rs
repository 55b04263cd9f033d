//! End-to-end tests: the real `jetsync-applier` binary against real `nats-server` processes.

mod capture;
mod cluster;
mod coalesce;
mod consumer_state;
mod convergence;
mod crash;
mod deploy;
mod downtime;
mod examples;
mod exit_codes;
mod first_steps;
mod fleet;
mod history;
mod http;
mod isolation;
mod malformed;
mod pg_content;
mod poison;
mod postgres;
mod readme;
mod security;
mod server_restart;
mod smoke;
mod snapshot;
mod transactions;
