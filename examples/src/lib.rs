//! Runnable jetsync examples live in this package's `[[example]]` targets.
