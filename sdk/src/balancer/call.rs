//! Failover policies: what a call does when its instance fails.
//!
//! [`Balancer::call`] picks instances for one logical call and runs the
//! caller's attempt on them under a [`Policy`]. Only failures the instance is
//! to blame for ([`InstanceFault`]) are retried elsewhere and count toward its
//! ejection; a refusal of the request itself (bad argument…) ends the call at
//! once and counts as the instance having served.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;

use super::{Balancer, Instance, Outcome, Pick, Request};

/// What to do when an attempt fails for the instance's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// One attempt; its error is the call's.
    FailFast,
    /// Up to `retries` more attempts, each on an instance not tried yet in
    /// this call; the call fails when the budget or the instances run out.
    /// Only for idempotent calls.
    Failover {
        /// Extra attempts after the first.
        retries: u32,
    },
    /// The attempt runs on up to `fanout` distinct instances at once; the
    /// first success wins and the others are dropped (cancelled, not judged).
    /// Only for idempotent calls; buys latency with load.
    Forking {
        /// Parallel attempts (at least 1).
        fanout: u32,
    },
}

/// Whether an error is the instance's fault (unreachable, overloaded, timed
/// out), so trying elsewhere may help and the instance is judged for it.
pub trait InstanceFault {
    /// True when another instance might succeed.
    fn is_instance_fault(&self) -> bool;
}

impl InstanceFault for tonic::Status {
    fn is_instance_fault(&self) -> bool {
        matches!(self.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted)
    }
}

impl InstanceFault for crate::Error {
    fn is_instance_fault(&self) -> bool {
        matches!(self, crate::Error::Unavailable { .. })
    }
}

/// Why a balanced call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// No instance was eligible for the request (none registered, all
    /// ejected, or none matching its gray or version constraint).
    #[error("balanced call: no instance available")]
    NoInstance,
    /// The last attempt's error (after the policy gave up).
    #[error("balanced call failed: {0}")]
    Failed(E),
}

impl<E> CallError<E> {
    /// The attempt's error, if there was an attempt.
    pub fn into_inner(self) -> Option<E> {
        match self {
            CallError::NoInstance => None,
            CallError::Failed(e) => Some(e),
        }
    }
}

fn judge<E: InstanceFault>(pick: Pick, error: &E) {
    pick.finish(if error.is_instance_fault() { Outcome::Failure } else { Outcome::Success });
}

type Attempt<F> = (Pick, Pin<Box<F>>);

impl Balancer {
    /// Runs `attempt` on instances picked for `request` under `policy`, and
    /// reports every attempt's outcome to the balancer. `attempt` gets the
    /// instance (owned) and returns the call's future.
    pub async fn call<T, E, F, Fut>(&self, request: &Request, policy: Policy, mut attempt: F) -> Result<T, CallError<E>>
    where
        F: FnMut(Instance) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: InstanceFault,
    {
        let (attempts, fanout) = match policy {
            Policy::FailFast => (1, 1),
            Policy::Failover { retries } => (retries.saturating_add(1), 1),
            Policy::Forking { fanout } => (1, fanout.max(1)),
        };
        if fanout > 1 {
            return self.fork(request, fanout, attempt).await;
        }
        let mut tried: Vec<String> = Vec::new();
        let mut last = None;
        for _ in 0..attempts {
            let Some(pick) = self.pick_excluding(request, &tried) else { break };
            tried.push(pick.instance().id.clone());
            match attempt(pick.instance().clone()).await {
                Ok(v) => {
                    pick.success();
                    return Ok(v);
                }
                Err(e) => {
                    judge(pick, &e);
                    if !e.is_instance_fault() {
                        return Err(CallError::Failed(e));
                    }
                    tracing::debug!(instance = %tried[tried.len() - 1], "attempt failed; failing over");
                    last = Some(e);
                }
            }
        }
        Err(last.map_or(CallError::NoInstance, CallError::Failed))
    }

    async fn fork<T, E, F, Fut>(&self, request: &Request, fanout: u32, mut attempt: F) -> Result<T, CallError<E>>
    where
        F: FnMut(Instance) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: InstanceFault,
    {
        let mut tried: Vec<String> = Vec::new();
        let mut running: Vec<Attempt<Fut>> = Vec::new();
        for _ in 0..fanout {
            let Some(pick) = self.pick_excluding(request, &tried) else { break };
            tried.push(pick.instance().id.clone());
            let fut = Box::pin(attempt(pick.instance().clone()));
            running.push((pick, fut));
        }
        let mut last = None;
        while !running.is_empty() {
            let (i, result) = poll_fn(|cx| {
                for (i, (_, fut)) in running.iter_mut().enumerate() {
                    if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                        return Poll::Ready((i, r));
                    }
                }
                Poll::Pending
            })
            .await;
            let (pick, _) = running.swap_remove(i);
            match result {
                // The rest are dropped here: their picks release as cancelled.
                Ok(v) => {
                    pick.success();
                    return Ok(v);
                }
                Err(e) => {
                    judge(pick, &e);
                    if !e.is_instance_fault() {
                        return Err(CallError::Failed(e));
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.map_or(CallError::NoInstance, CallError::Failed))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::balancer::{BalancerOptions, EjectionOptions, ManualClock, Strategy};

    #[derive(Debug, PartialEq, Eq)]
    enum TestError {
        Down(String),
        BadRequest,
    }

    impl InstanceFault for TestError {
        fn is_instance_fault(&self) -> bool {
            matches!(self, TestError::Down(_))
        }
    }

    fn balancer(ids: &[&str]) -> Balancer {
        let b = Balancer::new(BalancerOptions {
            strategy: Strategy::RoundRobin,
            warm_up: Duration::ZERO,
            ejection: EjectionOptions { consecutive_failures: 0, ..EjectionOptions::default() },
            clock: Arc::new(ManualClock::new()),
            ..BalancerOptions::default()
        });
        b.update(ids.iter().map(|id| Instance::new(*id, "10.0.0.1", 80)));
        b
    }

    /// Runs a policy where the instances in `down` fail; returns the result
    /// and the ids attempted, in order.
    async fn run(b: &Balancer, policy: Policy, down: &[&str]) -> (Result<String, CallError<TestError>>, Vec<String>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let result = b
            .call(&Request::new(), policy, |inst| {
                let seen = seen.clone();
                let fails = down.contains(&inst.id.as_str());
                async move {
                    seen.lock().unwrap().push(inst.id.clone());
                    if fails {
                        Err(TestError::Down(inst.id))
                    } else {
                        Ok(inst.id)
                    }
                }
            })
            .await;
        let seen = seen.lock().unwrap().clone();
        (result, seen)
    }

    #[tokio::test]
    async fn failover_tries_other_instances_within_the_budget() {
        let b = balancer(&["a", "b", "c", "d"]);
        let (r, seen) = run(&b, Policy::Failover { retries: 2 }, &["a", "b"]).await;
        assert_eq!(r.unwrap(), "c");
        assert_eq!(seen, ["a", "b", "c"]);

        // Budget of one retry: a third instance is never tried.
        let b = balancer(&["a", "b", "c", "d"]);
        let (r, seen) = run(&b, Policy::Failover { retries: 1 }, &["a", "b"]).await;
        assert!(matches!(r, Err(CallError::Failed(TestError::Down(id))) if id == "b"));
        assert_eq!(seen, ["a", "b"]);

        // Never the same instance twice, even with budget left.
        let b = balancer(&["a", "b"]);
        let (r, seen) = run(&b, Policy::Failover { retries: 5 }, &["a", "b"]).await;
        assert!(r.is_err());
        assert_eq!(seen, ["a", "b"]);
    }

    #[test]
    fn balancer_picks_and_calls_can_cross_tasks() {
        // Users spawn calls: the balancer, a pick and a call's future are Send.
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let b = balancer(&["a"]);
        send_sync(&b);
        send(&b.pick(&Request::new()));
        let req = Request::new();
        let call = b.call(&req, Policy::Forking { fanout: 2 }, |i| async move { Ok::<_, TestError>(i.id) });
        send(&call);
    }

    #[tokio::test]
    async fn fail_fast_makes_one_attempt() {
        let b = balancer(&["a", "b"]);
        let (r, seen) = run(&b, Policy::FailFast, &["a"]).await;
        assert!(matches!(r, Err(CallError::Failed(TestError::Down(_)))));
        assert_eq!(seen, ["a"]);
    }

    #[tokio::test]
    async fn request_errors_are_not_failed_over() {
        let b = balancer(&["a", "b"]);
        let attempts = Arc::new(Mutex::new(0));
        let r: Result<(), _> = b
            .call(&Request::new(), Policy::Failover { retries: 3 }, |_| {
                *attempts.lock().unwrap() += 1;
                async { Err(TestError::BadRequest) }
            })
            .await;
        assert!(matches!(r, Err(CallError::Failed(TestError::BadRequest))));
        assert_eq!(*attempts.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn no_instance_is_reported_as_such() {
        let b = balancer(&[]);
        let (r, seen) = run(&b, Policy::Failover { retries: 2 }, &[]).await;
        assert!(matches!(r, Err(CallError::NoInstance)));
        assert!(seen.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn forking_returns_the_first_success() {
        // a fails first (10 ms), c succeeds at 50 ms, b would succeed at 200 ms.
        let b = balancer(&["a", "b", "c"]);
        let delay = |id: &str| match id {
            "a" => 10,
            "b" => 200,
            _ => 50,
        };
        let finished = Arc::new(Mutex::new(Vec::new()));
        let r: Result<String, CallError<TestError>> = b
            .call(&Request::new(), Policy::Forking { fanout: 3 }, |inst| {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(delay(&inst.id))).await;
                    finished.lock().unwrap().push(inst.id.clone());
                    if inst.id == "a" {
                        Err(TestError::Down(inst.id))
                    } else {
                        Ok(inst.id)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), "c");
        // The call ended with c's answer: b, slower, was dropped unfinished.
        assert_eq!(*finished.lock().unwrap(), ["a", "c"]);
        // Every pick was released (the losing b was cancelled, not leaked).
        assert!(b.lock().slots.iter().all(|s| s.active == 0));
    }

    #[tokio::test(start_paused = true)]
    async fn forking_fails_when_every_attempt_fails() {
        let b = balancer(&["a", "b"]);
        let r: Result<(), CallError<TestError>> = b
            .call(&Request::new(), Policy::Forking { fanout: 4 }, |inst| async move {
                tokio::time::sleep(Duration::from_millis(if inst.id == "a" { 5 } else { 30 })).await;
                Err(TestError::Down(inst.id))
            })
            .await;
        // The last failure to arrive is the one reported.
        assert!(matches!(r, Err(CallError::Failed(TestError::Down(id))) if id == "b"));
    }
}
