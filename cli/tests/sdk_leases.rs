//! The SDK's lease handles against three real scheduler processes: a
//! `KeepAlive` renews whether or not its answers are read, and says when the
//! lease is gone.

mod common;

use std::time::{Duration, Instant};

use common::Schedulers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_stays_alive_when_nobody_reads_the_answers_and_its_end_is_still_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    sched.agreed_leader(&[1, 2, 3]).await;

    // A 1 s lease is renewed every third of a second: 8 s is about 24
    // renewals, past the 16 answers the handle buffers for its reader.
    let lease = c.grant(Duration::from_secs(1)).await.expect("grant");
    c.put_with_lease("svc/unread", b"x".to_vec(), lease).await.expect("put");
    let mut keeper = c.keep_alive(lease);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let left = c
            .time_to_live(lease)
            .await
            .unwrap_or_else(|e| panic!("the lease ended while its answers went unread: {e}\n{}", sched.logs()));
        assert!(left.ttl_ms > 0);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(c.get("svc/unread").await.expect("get").is_some(), "the lease's key is still there");

    // Revoked: the handle still reports the end after its buffer of unread
    // answers, then closes.
    c.revoke(lease).await.expect("revoke");
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(answer) = keeper.next().await {
            if let Ok(r) = answer {
                if r.ttl_ms == 0 {
                    return true;
                }
            }
        }
        false
    })
    .await
    .expect("the end is reported");
    assert!(gone, "an answer with ttl 0 came before the handle closed");
    let after = tokio::time::timeout(Duration::from_secs(5), keeper.next()).await.expect("closes");
    assert!(after.is_none(), "the renewal task ended with the lease");
}
