//! Server streams whose producer runs inside the stream itself.
//!
//! A watch used to be a spawned task that sent messages over a channel to
//! the response stream, so every change woke two tasks before it reached the
//! connection: the watch task, then the one sending the response. Here the
//! producer is polled by the response stream's own `poll_next`: a change
//! wakes the task that writes the response directly, and a client that goes
//! away drops the producer with the stream instead of leaving a task that
//! notices only at its next send.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;

/// A stream of what a producer sends, with the producer polled inline.
pub struct InlineStream<T> {
    producer: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    rx: mpsc::Receiver<T>,
}

/// Runs `produce(tx)` inside the returned stream: it yields what the
/// producer sends, in order, and ends once the producer has returned and
/// its sends are read. At most `buffer` messages wait unread; beyond that
/// the producer's send waits, as the reader applies back-pressure.
pub fn inline_stream<T, F, Fut>(buffer: usize, produce: F) -> InlineStream<T>
where
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(buffer);
    InlineStream { producer: Some(Box::pin(produce(tx))), rx }
}

impl<T> Stream for InlineStream<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        // The producer first, so what it sends now is read in this poll.
        // Its wake-ups (a change, a timer, room in the channel) land on this
        // task, which polls it again.
        if let Some(producer) = this.producer.as_mut() {
            if producer.as_mut().poll(cx).is_ready() {
                // Drops its sender: the channel ends after the last message.
                this.producer = None;
            }
        }
        this.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn yields_every_message_in_order_and_ends_with_the_producer() {
        // More messages than the buffer holds: the producer must wait for
        // the reader and resume when it reads.
        let stream = inline_stream(2, |tx| async move {
            for i in 0..10u32 {
                tokio::task::yield_now().await;
                if tx.send(i).await.is_err() {
                    return;
                }
            }
        });
        let got: Vec<u32> = tokio::time::timeout(Duration::from_secs(5), stream.collect())
            .await
            .expect("the stream must end once the producer returns");
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn dropping_the_stream_stops_the_producer_at_once() {
        let (alive_tx, alive_rx) = oneshot::channel::<()>();
        let mut stream = inline_stream(4, |tx| async move {
            let _alive = alive_tx;
            let _ = tx.send(1u32).await;
            // A watch waiting for a change that never comes.
            std::future::pending::<()>().await;
        });
        assert_eq!(stream.next().await, Some(1));
        drop(stream);
        // The producer's state went with the stream: its end of the
        // oneshot is gone without any send failing first.
        let closed = tokio::time::timeout(Duration::from_secs(5), alive_rx).await;
        assert!(matches!(closed, Ok(Err(_))), "the producer outlived its stream");
    }
}
