//! A delivered stream message in the compact form the apply path holds while it is in flight.
//!
//! A client library message carries a header map (a hash table, and a vector and a string per
//! header), a handle on the JetStream context (reference counts shared with the connection) and
//! status fields the apply path never reads. The apply path needs only the subject, the body,
//! the ack subject and three header values: the event format, the message id (both for the
//! parked record of a poison event) and the transaction tag. The receiving side converts each
//! message into a [`Delivery`] as it arrives, reading the headers once, so the header map and
//! the context handle are freed there and not on the thread that applies batches to the sink;
//! and an in-flight batch holds a few small fields per event instead of a whole message.

use std::borrow::Cow;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use jetsync::codec::{Format, FORMAT_HEADER};
use jetsync::transaction::{BATCH_COMMIT_HEADER, BATCH_ID_HEADER};

use crate::decode::RawEvent;
use crate::txn::Tag;

/// The header carrying a message's id (idempotency key).
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// A delivered stream message, as the apply path keeps it.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// The message's subject (`<prefix>.<table>.<key-token>` for a row).
    pub(crate) subject: Subject,
    /// The event body.
    pub(crate) payload: Bytes,
    /// Where to acknowledge it (the durable consumer's deliveries).
    pub(crate) reply: Option<Subject>,
    /// The `Jetsync-Format` header (the known formats without an allocation).
    pub(crate) format: Option<Cow<'static, str>>,
    /// The `Nats-Msg-Id` header.
    pub(crate) msg_id: Option<Box<str>>,
    /// The transaction it belongs to: its batch id, and whether it is the commit member.
    pub(crate) txn: Option<(Box<str>, bool)>,
}

/// A header value as kept: the known formats are static.
fn format_of(value: &str) -> Cow<'static, str> {
    match Format::parse(value) {
        Ok(format) => Cow::Borrowed(format.header_value()),
        Err(_) => Cow::Owned(value.to_owned()),
    }
}

impl Delivery {
    /// The compact form of a message: its headers are read once (the first value of each, as
    /// `HeaderMap::get` gives) and dropped with the rest.
    pub(crate) fn of(message: async_nats::Message) -> Delivery {
        let (format, msg_id, txn) = read_headers(message.headers.as_ref());
        Delivery {
            subject: message.subject,
            payload: message.payload,
            reply: message.reply,
            format,
            msg_id,
            txn,
        }
    }

    /// Its place in a transaction, `None` outside one.
    pub(crate) fn tag(&self) -> Option<Tag<'_>> {
        self.txn.as_ref().map(|(id, commit)| Tag {
            id,
            commit: *commit,
        })
    }

    /// Its transaction's batch id, `None` outside a transaction.
    pub(crate) fn batch_id(&self) -> Option<&str> {
        self.txn.as_ref().map(|(id, _)| &**id)
    }

    /// Its `Nats-Msg-Id`.
    pub(crate) fn msg_id(&self) -> Option<&str> {
        self.msg_id.as_deref()
    }

    /// Sends `body` to its ack subject through `client` (the final ack of a batch is an empty
    /// body, a progress ack `+WPI`); nothing for a delivery without one (an ordered consumer's).
    pub(crate) async fn acknowledge(
        &self,
        client: &async_nats::Client,
        body: Bytes,
    ) -> Result<(), async_nats::PublishError> {
        match &self.reply {
            Some(reply) => client.publish(reply.clone(), body).await,
            None => Ok(()),
        }
    }

    /// Its raw parts, at stream sequence `seq`.
    pub(crate) fn raw(&self, seq: u64) -> RawEvent<'_> {
        RawEvent {
            seq,
            subject: self.subject.as_str(),
            format: self.format.as_deref(),
            payload: &self.payload,
        }
    }
}

/// Type of what [`read_headers`] returns: format, message id, transaction tag.
type Headers = (
    Option<Cow<'static, str>>,
    Option<Box<str>>,
    Option<(Box<str>, bool)>,
);

/// Reads the three headers the apply path uses in one walk. Names match exactly, and the first
/// value counts, as with `HeaderMap::get`; an empty batch id is no transaction.
fn read_headers(headers: Option<&HeaderMap>) -> Headers {
    let (mut format, mut msg_id, mut batch, mut commit) = (None, None, None, false);
    let Some(headers) = headers else {
        return (None, None, None);
    };
    for (name, values) in headers.iter() {
        let Some(value) = values.first().map(|v| v.as_str()) else {
            continue;
        };
        match AsRef::<str>::as_ref(name) {
            FORMAT_HEADER => format = Some(format_of(value)),
            MSG_ID_HEADER => msg_id = Some(Box::from(value)),
            BATCH_ID_HEADER if !value.is_empty() => batch = Some(Box::from(value)),
            BATCH_COMMIT_HEADER => commit = value.trim() == "1",
            _ => {}
        }
    }
    (format, msg_id, batch.map(|id| (id, commit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: &[(&str, &str)]) -> async_nats::Message {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        async_nats::Message {
            subject: "g.items.k".into(),
            reply: Some("$JS.ACK.x".into()),
            payload: Bytes::from_static(b"{}"),
            headers: (!headers.is_empty()).then_some(map),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn the_headers_the_apply_path_reads_are_kept() {
        let d = Delivery::of(message(&[
            ("Jetsync-Format", "json/1"),
            ("Nats-Msg-Id", "m-1"),
            ("Nats-Batch-Id", "b"),
            ("Nats-Batch-Commit", "1"),
            ("Other", "x"),
        ]));
        assert!(matches!(d.format, Some(Cow::Borrowed("json/1"))));
        assert_eq!(d.msg_id(), Some("m-1"));
        assert_eq!(
            d.tag(),
            Some(Tag {
                id: "b",
                commit: true
            })
        );
        assert_eq!(d.batch_id(), Some("b"));
        assert_eq!(d.reply.as_deref(), Some("$JS.ACK.x"));
        let raw = d.raw(7);
        assert_eq!(
            (raw.seq, raw.subject, raw.format),
            (7, "g.items.k", Some("json/1"))
        );

        // A member that is not the commit; an unknown format is kept as it is.
        let d = Delivery::of(message(&[
            ("Nats-Batch-Id", "b"),
            ("Nats-Batch-Sequence", "2"),
            ("Jetsync-Format", "weird/9"),
        ]));
        assert_eq!(
            d.tag(),
            Some(Tag {
                id: "b",
                commit: false
            })
        );
        assert_eq!(d.format.as_deref(), Some("weird/9"));
        assert_eq!(d.msg_id(), None);

        // No headers, or an empty batch id: no transaction.
        assert_eq!(Delivery::of(message(&[])).tag(), None);
        assert_eq!(Delivery::of(message(&[("Nats-Batch-Id", "")])).tag(), None);
    }
}
