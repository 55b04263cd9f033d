//! The last warning or error a running applier logged, for its fleet report (`fleet` shows it
//! in the "last error" column). A `tracing` layer keeps a copy of the latest WARN or ERROR
//! event that passes the log filter; nothing else is retained.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Most characters of a kept message (a long error chain is cut with `…`).
const MAX_CHARS: usize = 500;

/// A shared slot holding the last WARN or ERROR log line; clone it freely.
#[derive(Debug, Clone, Default)]
pub struct LastError(Arc<Mutex<Option<String>>>);

impl LastError {
    /// The last warning or error logged, as `LEVEL message (field=value, ...)`.
    pub fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Records `text` as the last error (also what the layer does).
    pub fn set(&self, text: String) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(text);
    }

    /// A `tracing` layer that records WARN and ERROR events into this slot.
    pub fn layer(&self) -> LastErrorLayer {
        LastErrorLayer(self.clone())
    }
}

/// The layer [`LastError::layer`] returns.
#[derive(Debug, Clone)]
pub struct LastErrorLayer(LastError);

impl<S: Subscriber> Layer<S> for LastErrorLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut visitor = Text::default();
        event.record(&mut visitor);
        let mut text = format!("{level} {}", visitor.message);
        if !visitor.fields.is_empty() {
            let _ = write!(text, " ({})", visitor.fields.join(", "));
        }
        if text.chars().count() > MAX_CHARS {
            text = text.chars().take(MAX_CHARS).collect::<String>() + "…";
        }
        self.0.set(text);
    }
}

#[derive(Default)]
struct Text {
    message: String,
    fields: Vec<String>,
}

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields.push(format!("{}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields.push(format!("{}={value}", field.name()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn keeps_the_last_warning_only() {
        let last = LastError::default();
        let subscriber = tracing_subscriber::registry().with(last.layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            assert_eq!(last.get(), None);
            tracing::warn!(applied = 7, "first");
            tracing::error!(error = "boom", "second");
            tracing::info!("still not kept");
        });
        assert_eq!(last.get().as_deref(), Some("ERROR second (error=boom)"));
    }
}
