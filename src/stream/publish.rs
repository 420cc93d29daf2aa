//! [`PublishFuture`]: one `publish_async`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::bus::Receipt;
use crate::error::PublishError;
use crate::sync::AsyncReceiver;

/// The outcome of a `publish_async`: resolves to the event's [`Receipt`]
/// once it is durable and the caught-up subscribers have run, as
/// [`Bus::publish`](crate::Bus::publish) returns.
///
/// # Cancellation safety
/// The event is handed to the log when `publish_async` is called, before
/// the future is first polled. Dropping the future never un-publishes it
/// and never publishes it twice: it is committed (or refused) all the same,
/// and its subscribers run. Whether it got in is then unknown to the caller;
/// publishing the same event again (same id) answers that, with its
/// original receipt and `duplicate: true` if the first got in.
#[must_use = "an event is acknowledged only when the future resolves to Ok"]
pub struct PublishFuture {
    state: State,
}

enum State {
    Waiting(AsyncReceiver<Result<Vec<Receipt>, PublishError>>),
    /// Refused before it was queued.
    Refused(Option<PublishError>),
    /// Running on a `JetStreamBus`'s runtime.
    #[cfg(feature = "jetstream")]
    Remote(tokio::sync::oneshot::Receiver<Result<Receipt, PublishError>>),
}

impl PublishFuture {
    pub(crate) fn waiting(rx: AsyncReceiver<Result<Vec<Receipt>, PublishError>>) -> PublishFuture {
        PublishFuture {
            state: State::Waiting(rx),
        }
    }

    #[cfg(feature = "jetstream")]
    pub(crate) fn remote(
        rx: tokio::sync::oneshot::Receiver<Result<Receipt, PublishError>>,
    ) -> PublishFuture {
        PublishFuture {
            state: State::Remote(rx),
        }
    }

    pub(crate) fn refused(e: PublishError) -> PublishFuture {
        PublishFuture {
            state: State::Refused(Some(e)),
        }
    }
}

impl Future for PublishFuture {
    type Output = Result<Receipt, PublishError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            State::Refused(e) => Poll::Ready(Err(e.take().unwrap_or(PublishError::Closed))),
            State::Waiting(rx) => rx.poll_take(cx).map(|got| match got {
                Some(Ok(mut receipts)) => receipts.pop().ok_or(PublishError::Closed),
                Some(Err(e)) => Err(e),
                // The bus went away without answering.
                None => Err(PublishError::Closed),
            }),
            #[cfg(feature = "jetstream")]
            State::Remote(rx) => Pin::new(rx)
                .poll(cx)
                .map(|got| got.unwrap_or(Err(PublishError::Closed))),
        }
    }
}

impl std::fmt::Debug for PublishFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishFuture")
    }
}
