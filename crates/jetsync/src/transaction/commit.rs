//! `Transaction::commit`: one transaction sent as one atomic batch, retried whole.
//!
//! An attempt sends the first member as a request (the server answers empty once the batch is
//! started, or with an error such as "atomic publish disabled"), the middle members as plain
//! publishes on the same connection (they arrive in order behind it), and the last member,
//! marked `Nats-Batch-Commit: 1`, as a request answered with the batch's acknowledgement. Every
//! attempt has a fresh batch id; the members' message ids (`<transaction id>-<n>`) never change.
//!
//! What is stored when an attempt stops part way:
//! - before the commit member reached the server (timeout, disconnect, leader change): nothing.
//!   The server drops the partial batch (at once on a leader change, after 10 s idle otherwise)
//!   and the next attempt sends every member again under a new batch id.
//! - after the server stored the batch, before its acknowledgement arrived: the whole
//!   transaction. The next attempt carries the same message ids, so the server refuses it whole
//!   as a duplicate (10201), and the commit reports the stored one (`duplicate: true`).
//!
//! So a transaction is stored at most once, provided the retry comes within the stream's
//! duplicate window while the originals are still in the stream (the caveat single writes have).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use async_nats::{client::RequestErrorKind, HeaderMap, Message, Request};

use super::{
    builder::{Member, MAX_TRANSACTION_ROWS},
    reply::{self, ApiError, Reply},
    version, Transaction, BATCH_COMMIT_HEADER, BATCH_ID_HEADER, BATCH_SEQUENCE_HEADER,
};
use crate::{
    codec::FORMAT_HEADER,
    connect,
    table::{last_message, parse_current_seq},
    Error,
};

/// Attempts of one commit (each with a fresh batch id), within this many client timeouts.
const ATTEMPTS: u32 = 3;

/// The message-id header (JetStream deduplication).
const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The compare-and-set header.
const EXPECTED_SEQ_HEADER: &str = "Nats-Expected-Last-Subject-Sequence";

/// The outcome of [`Transaction::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Committed {
    /// The stream sequence of the commit (last) member. Once an instance's applied sequence
    /// reaches it, the whole transaction is in its database (read-your-writes). 0 for an empty
    /// transaction.
    ///
    /// For a duplicate whose commit member's row was written again since, this is that later
    /// write's sequence (the transaction's own sequence is no longer readable); waiting for it
    /// still covers the transaction.
    pub seq: u64,
    /// The stream sequence of the first member (`seq - (count - 1)`: members are contiguous).
    /// 0 when unknown: for an empty transaction, and for a duplicate whose commit member's row
    /// was written again since.
    pub first_seq: u64,
    /// The number of members stored.
    pub count: u64,
    /// True when an earlier commit of this same transaction had already been stored (inside the
    /// stream's duplicate window) and this call stored nothing new.
    pub duplicate: bool,
}

/// Why an attempt ended without an outcome.
enum Failure {
    /// The batch was lost or its fate is unknown: send it all again under a new batch id.
    Retry {
        reason: String,
        /// Wait a little first (the server has too many batches in flight).
        back_off: bool,
    },
    /// An outcome for the caller.
    Fatal(Error),
}

impl Failure {
    fn retry(reason: impl Into<String>) -> Self {
        Failure::Retry {
            reason: reason.into(),
            back_off: false,
        }
    }
}

impl Transaction {
    /// Stores every change of the transaction atomically: all of them, in contiguous stream
    /// sequences, or none. Returns the commit (last) member's sequence.
    ///
    /// - An empty transaction sends nothing and returns zeros.
    /// - More than [`MAX_TRANSACTION_ROWS`] changes: [`Error::TransactionTooLarge`], nothing
    ///   sent. An event above the server's `max_payload`: [`Error::TooLarge`], nothing sent.
    /// - A server older than 2.12.1, or a stream without atomic publish (set
    ///   `stream.transactions = true` and provision): [`Error::Unsupported`], nothing stored.
    /// - A failed compare-and-set: [`Error::Conflict`], nothing stored.
    /// - No stream: [`Error::StreamNotFound`]. A member the NATS user may not publish:
    ///   [`Error::PermissionDenied`] naming its subject, nothing stored (on connections made by
    ///   [`Client::connect`](crate::Client::connect); elsewhere [`Error::Timeout`]).
    /// - A lost batch (timeout, leader change) is sent again whole, up to 3 attempts within 3
    ///   client timeouts, then [`Error::Timeout`]: the outcome is then unknown; call `commit`
    ///   again (same transaction) and it is stored at most once.
    ///
    /// Calling `commit` again after any error or success is safe: an earlier attempt that was
    /// stored is reported with `duplicate: true`, and nothing is stored twice.
    pub async fn commit(&self) -> Result<Committed, Error> {
        self.mark_committed();
        let members = self.members();
        if members.is_empty() {
            return Ok(Committed::default());
        }
        if members.len() > MAX_TRANSACTION_ROWS {
            return Err(Error::TransactionTooLarge {
                rows: members.len(),
                max: MAX_TRANSACTION_ROWS,
            });
        }
        let inner = self.client().inner();
        version::check(&inner.nats)?;
        self.check_sizes()?;
        let started = Instant::now();
        let budget = inner.timeout * ATTEMPTS;
        let violations = connect::violations(&inner.nats);
        let subjects: HashSet<&str> = members.iter().map(|m| m.subject.as_str()).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let batch_id = nuid::next().to_string();
            // Remembered before sending: only violations reported after it count.
            let mark = violations.as_ref().map(|v| v.mark());
            match self.attempt(&batch_id).await {
                Ok(committed) => return Ok(committed),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { reason, back_off }) => {
                    // The server drops a denied publish and says so only on the connection: a
                    // denied first or commit member times out, a denied middle one leaves the
                    // batch incomplete.
                    if let (Some(violations), Some(mark)) = (&violations, mark) {
                        if let Some(denied) = violations.since(mark, &|s| subjects.contains(s)) {
                            return Err(denied.into_error("publish"));
                        }
                    }
                    tracing::debug!(
                        transaction = %self.id(),
                        batch = %batch_id,
                        attempt,
                        %reason,
                        "transaction attempt failed; sending it again whole (were it stored, the next attempt is a duplicate)"
                    );
                    if attempt >= ATTEMPTS || started.elapsed() >= budget {
                        tracing::warn!(
                            transaction = %self.id(),
                            attempts = attempt,
                            %reason,
                            "transaction commit gave up; its outcome is unknown until it is committed again"
                        );
                        break;
                    }
                    if back_off {
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                }
            }
        }
        Err(Error::Timeout {
            operation: "transaction commit",
            after: Some(started.elapsed()),
        })
    }

    /// Member `index`'s (1-based) headers in the batch `batch_id`.
    fn headers(
        &self,
        index: usize,
        member: &Member,
        batch_id: &str,
    ) -> Vec<(&'static str, String)> {
        let format = self.client().inner().format.header_value();
        let mut headers = vec![
            (MSG_ID_HEADER, self.msg_id(index, member)),
            (FORMAT_HEADER, format.to_owned()),
            (BATCH_ID_HEADER, batch_id.to_owned()),
            (BATCH_SEQUENCE_HEADER, index.to_string()),
        ];
        if index == self.members().len() {
            headers.push((BATCH_COMMIT_HEADER, "1".to_owned()));
        }
        if let Some(seq) = member.expected_seq {
            headers.push((EXPECTED_SEQ_HEADER, seq.to_string()));
        }
        headers
    }

    /// Member `index`'s (1-based) message id: its own, else `<transaction id>-<index>`.
    fn msg_id(&self, index: usize, member: &Member) -> String {
        match &member.msg_id {
            Some(id) => id.clone(),
            None => format!("{}-{index}", self.id()),
        }
    }

    /// [`Error::TooLarge`] for the first member above the server's `max_payload`, before
    /// anything is sent (a refused middle member would only show as a lost batch).
    fn check_sizes(&self) -> Result<(), Error> {
        let max_payload = self.client().inner().nats.server_info().max_payload;
        if max_payload == 0 {
            return Ok(());
        }
        // Batch ids are nuids: every attempt's headers have the same length.
        let batch_id = nuid::next().to_string();
        for (i, member) in self.members().iter().enumerate() {
            // As the NATS protocol carries them: `NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`.
            let header_len: usize = self
                .headers(i + 1, member, &batch_id)
                .iter()
                .map(|(name, value)| name.len() + value.len() + 4)
                .sum::<usize>()
                + 12;
            let size = header_len + member.body.len();
            if size > max_payload {
                return Err(Error::TooLarge {
                    subject: member.subject.clone(),
                    reason: format!(
                        "{size} bytes with headers, the server's max_payload is {max_payload} (transaction member {}); nothing of the transaction was sent",
                        i + 1
                    ),
                });
            }
        }
        Ok(())
    }

    /// One attempt under `batch_id`.
    async fn attempt(&self, batch_id: &str) -> Result<Committed, Failure> {
        let inner = self.client().inner();
        let members = self.members();
        let count = members.len();
        for (i, member) in members.iter().enumerate() {
            let index = i + 1;
            let last = index == count;
            let mut headers = HeaderMap::new();
            for (name, value) in self.headers(index, member, batch_id) {
                headers.insert(name, value.as_str());
            }
            if index > 1 && !last {
                inner
                    .nats
                    .publish_with_headers(member.subject.clone(), headers, member.body.clone())
                    .await
                    .map_err(|e| Failure::retry(format!("publishing member {index}: {e}")))?;
                continue;
            }
            let message = match self.request(member, headers).await {
                Ok(message) => message,
                Err(kind) => return Err(self.request_failure(kind, index).await),
            };
            if let Some(status) = message.status.filter(|s| !s.is_success()) {
                return Err(Failure::retry(format!(
                    "status {status} in reply to member {index}"
                )));
            }
            match reply::parse(&message.payload) {
                Ok(Reply::Started) if !last => {}
                Ok(Reply::Started) => {
                    return Err(Failure::retry("an empty reply to the commit"));
                }
                Ok(Reply::Stored { seq, count: stored }) if last => {
                    if stored != count as u64 {
                        return Err(Failure::Fatal(Error::nats(
                            "transaction commit",
                            reply::BadReply(format!(
                                "the server stored {stored} members of {count}"
                            )),
                        )));
                    }
                    return Ok(Committed {
                        seq,
                        first_seq: seq.saturating_sub(stored - 1),
                        count: stored,
                        duplicate: false,
                    });
                }
                Ok(Reply::Stored { .. }) => {
                    return Err(Failure::Fatal(Error::nats(
                        "transaction commit",
                        reply::BadReply(format!(
                            "an acknowledgement for member {index} before the commit"
                        )),
                    )));
                }
                Ok(Reply::Refused(error)) => return self.refused(error, index).await,
                Err(bad) => return Err(Failure::Fatal(Error::nats("transaction commit", bad))),
            }
        }
        unreachable!("a non-empty transaction ends with its commit member")
    }

    /// Sends a member as a request and waits for the reply.
    async fn request(
        &self,
        member: &Member,
        headers: HeaderMap,
    ) -> Result<Message, RequestErrorKind> {
        let inner = self.client().inner();
        let request = Request::new()
            .headers(headers)
            .payload(member.body.clone())
            .timeout(Some(inner.timeout));
        inner
            .nats
            .send_request(member.subject.clone(), request)
            .await
            .map_err(|e| e.kind())
    }

    /// What a failed request to member `index` means.
    async fn request_failure(&self, kind: RequestErrorKind, index: usize) -> Failure {
        let inner = self.client().inner();
        match kind {
            RequestErrorKind::TimedOut => Failure::retry(format!(
                "no reply to member {index} within {:?}",
                inner.timeout
            )),
            // Nothing listens on the row subjects: no stream captures them, or (in a cluster)
            // the stream has no leader right now. Ask which.
            RequestErrorKind::NoResponders => match inner.js.get_stream(&inner.stream.name).await {
                Err(e)
                    if matches!(
                        e.kind(),
                        async_nats::jetstream::context::GetStreamErrorKind::JetStream(js)
                            if js.error_code().0 == reply::STREAM_NOT_FOUND
                    ) =>
                {
                    Failure::Fatal(Error::StreamNotFound {
                        stream: inner.stream.name.clone(),
                    })
                }
                _ => Failure::retry(format!("no responders for member {index}")),
            },
            RequestErrorKind::MaxPayloadExceeded => Failure::Fatal(Error::TooLarge {
                subject: self.members()[index - 1].subject.clone(),
                reason: "above the server's max_payload".to_owned(),
            }),
            RequestErrorKind::InvalidSubject => Failure::Fatal(Error::nats(
                "transaction commit",
                reply::BadReply(format!("invalid subject for member {index}")),
            )),
            _ => Failure::retry(format!("request for member {index} failed (connection)")),
        }
    }

    /// What the server's refusal of the batch (in reply to member `index`) means.
    async fn refused(&self, error: ApiError, index: usize) -> Result<Committed, Failure> {
        let inner = self.client().inner();
        Err(match error.err_code {
            reply::ATOMIC_DISABLED => Failure::Fatal(Error::Unsupported {
                feature: "transactions",
                server_version: inner.nats.server_info().version,
                needed: format!(
                    "stream {} does not allow atomic publish: set stream.transactions = true and run provision",
                    inner.stream.name
                ),
            }),
            reply::WRONG_LAST_SEQUENCE => {
                let current_seq = match parse_current_seq(&error.description) {
                    Some(seq) => seq,
                    None => self.compared_row_seq().await.map_err(Failure::Fatal)?,
                };
                Failure::Fatal(Error::Conflict { current_seq })
            }
            reply::DUPLICATE => return self.duplicate().await.map_err(Failure::Fatal),
            reply::INCOMPLETE | reply::INVALID_ID | reply::INVALID_COMMIT | reply::MISSING_SEQ => {
                Failure::retry(format!("batch lost at member {index}: {error}"))
            }
            reply::TOO_MANY_INFLIGHT => Failure::Retry {
                reason: format!("member {index}: {error}"),
                back_off: true,
            },
            reply::TOO_LARGE => Failure::Fatal(Error::TransactionTooLarge {
                rows: self.len(),
                max: reply::too_large_limit(&error.description).unwrap_or(MAX_TRANSACTION_ROWS),
            }),
            reply::STREAM_NOT_FOUND => Failure::Fatal(Error::StreamNotFound {
                stream: inner.stream.name.clone(),
            }),
            _ => Failure::Fatal(Error::nats("transaction commit", error)),
        })
    }

    /// The current sequence of the transaction's compare-and-set row, when the server's
    /// conflict error does not carry it and there is exactly one such row (else 0).
    async fn compared_row_seq(&self) -> Result<u64, Error> {
        let mut compared = self.members().iter().filter(|m| m.expected_seq.is_some());
        match (compared.next(), compared.next()) {
            (Some(member), None) => Ok(last_message(self.client(), &member.subject)
                .await?
                .map_or(0, |message| message.sequence)),
            _ => Ok(0),
        }
    }

    /// The outcome of an earlier, stored attempt of this transaction (the server refused this
    /// one as a duplicate): the commit member's sequence, read back from its row subject.
    async fn duplicate(&self) -> Result<Committed, Error> {
        let members = self.members();
        let count = members.len();
        let commit = &members[count - 1];
        let msg_id = self.msg_id(count, commit);
        let (seq, exact) = match last_message(self.client(), &commit.subject).await? {
            Some(message) => {
                let ours = message
                    .headers
                    .get(MSG_ID_HEADER)
                    .is_some_and(|v| v.as_str() == msg_id);
                (message.sequence, ours)
            }
            // The row is gone from the stream (age or size limits): the stream's last sequence
            // is at least the transaction's, which keeps read-your-writes.
            None => {
                let inner = self.client().inner();
                let mut stream = inner
                    .js
                    .get_stream(&inner.stream.name)
                    .await
                    .map_err(|e| Error::nats("stream info", e))?;
                let info = stream
                    .info()
                    .await
                    .map_err(|e| Error::nats("stream info", e))?;
                (info.state.last_sequence, false)
            }
        };
        Ok(Committed {
            seq,
            first_seq: if exact {
                seq.saturating_sub(count as u64 - 1)
            } else {
                0
            },
            count: count as u64,
            duplicate: true,
        })
    }
}
