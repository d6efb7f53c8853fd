//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the leader renews
//! every retry period; a candidate takes over once it has seen the lease unchanged for its
//! duration, by its own clock (another node's `renewTime` is never compared with ours: clocks
//! differ); writes carry the resourceVersion so two candidates can never both win. Every call
//! to the API is bounded by the renew deadline, so a hung request cannot keep a leader
//! working after its lease ran out.
//!
//! Why not kube-lease-manager: its newest release (0.12, June 2026) depends on kube 4 and
//! k8s-openapi 0.28, so with kube 5 the tree would hold two kube clients and two k8s-openapi
//! versions; the election is small enough to keep here, with its decision pure and tested.
//!
//! The decision (`step`) is pure and tested with simulated time; `LeaderElector` does the I/O.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::context::Clock;

/// Timing of the election (client-go's defaults: 15 s, 10 s, 2 s).
#[derive(Clone, Debug)]
pub struct LeaseTiming {
    /// How long a lease stays valid without renewal; the longest a dead leader blocks others.
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long (< lease_duration).
    pub renew_deadline: Duration,
    /// How often the leader renews and candidates look.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate does after looking at the lease.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Write this spec: take a free or expired lease, or renew our own.
    Claim(LeaseSpec),
    /// Another replica holds a live lease; look again at `retry_at`.
    Follow { holder: String, retry_at: Timestamp },
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// When a candidate first saw the lease as it is now. Expiry is judged from this local time,
/// as client-go's `observedTime`: a holder whose clock runs behind ours is not taken over
/// early, nor one whose clock runs ahead late.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    record: Option<LeaseSpec>,
    at: Option<Timestamp>,
}

impl Observation {
    /// Records what was read at `now`; returns when this record was first seen.
    pub fn observe(&mut self, lease: Option<&LeaseSpec>, now: Timestamp) -> Timestamp {
        match self.at {
            Some(at) if self.record.as_ref() == lease => at,
            _ => {
                self.record = lease.cloned();
                self.at = Some(now);
                now
            }
        }
    }
}

/// When `lease`, first seen unchanged at `observed_at`, stops being valid; `None` when nobody
/// holds it.
pub fn expiry(lease: &LeaseSpec, observed_at: Timestamp) -> Option<Timestamp> {
    lease.holder_identity.as_deref().filter(|h| !h.is_empty())?;
    let duration = SignedDuration::from_secs(i64::from(lease.lease_duration_seconds.unwrap_or(0)));
    observed_at.checked_add(duration).ok()
}

/// Decides what `identity` does at `now`, having seen `lease` (`None`: no Lease object) as it
/// is since `observed_at`.
pub fn step(
    lease: Option<&LeaseSpec>,
    observed_at: Timestamp,
    identity: &str,
    now: Timestamp,
    timing: &LeaseTiming,
) -> Step {
    let empty = LeaseSpec::default();
    let lease = lease.unwrap_or(&empty);
    let holder = lease.holder_identity.as_deref().unwrap_or("");
    let live_until = expiry(lease, observed_at).filter(|until| *until > now);

    if holder == identity || live_until.is_none() {
        let renewing = holder == identity && live_until.is_some();
        let transitions = lease.lease_transitions.unwrap_or(0);
        return Step::Claim(LeaseSpec {
            holder_identity: Some(identity.to_owned()),
            lease_duration_seconds: Some(
                i32::try_from(timing.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if renewing {
                lease.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            // A change of holder is a transition; renewing, or re-taking our own expired lease, is not.
            lease_transitions: Some(if holder.is_empty() || holder == identity {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        });
    }
    let until = live_until.unwrap_or(now);
    // Look again at the retry period, or exactly at expiry if that comes first, so a dead
    // leader is replaced within the lease duration of its last renewal.
    let retry_at = (now + signed(timing.retry_period)).min(until);
    Step::Follow {
        holder: holder.to_owned(),
        retry_at,
    }
}

/// The spec that hands the lease back on shutdown (client-go's ReleaseOnCancel): no holder and
/// a one-second duration, so a standby takes over at its next look instead of after 15 s.
pub fn released(lease: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        ..lease.clone()
    }
}

/// Errors talking to the Lease API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Lease {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Lease {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Lease {namespace}/{name}: no answer within {after:?}")]
    Timeout {
        namespace: String,
        name: String,
        after: Duration,
    },
}

/// The outcome of one look at the lease.
#[derive(Clone, Debug, PartialEq)]
pub enum Observed {
    Leading,
    Following { holder: String, retry_at: Timestamp },
}

/// Why holding the lease ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Held {
    /// Asked to stop; the lease is still ours to release.
    Stopped,
    /// Another replica took the lease, or renewal failed past the renew deadline.
    Lost(String),
    /// The work done as leader ended by itself: the lease is still ours, to hand over.
    Abandoned(String),
}

/// Takes part in the election for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    namespace: String,
    identity: String,
    timing: LeaseTiming,
    clock: Arc<dyn Clock>,
    observed: std::sync::Mutex<Observation>,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: LeaseTiming,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            timing,
            clock,
            observed: std::sync::Mutex::default(),
        }
    }

    fn observe(&self, lease: Option<&LeaseSpec>, now: Timestamp) -> Timestamp {
        match self.observed.lock() {
            Ok(mut observed) => observed.observe(lease, now),
            Err(poisoned) => poisoned.into_inner().observe(lease, now),
        }
    }

    /// One look, given up after `within` (a hung request must not outlive the lease).
    pub async fn look(&self, within: Duration) -> Result<Observed, Error> {
        match tokio::time::timeout(within, self.try_acquire_or_renew()).await {
            Ok(looked) => looked,
            Err(_) => Err(Error::Timeout {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                after: within,
            }),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn read_err(&self, source: kube::Error) -> Error {
        Error::Read {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    fn write_err(&self, source: kube::Error) -> Error {
        Error::Write {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// One look: read the lease, decide, and write our claim if we may.
    pub async fn try_acquire_or_renew(&self) -> Result<Observed, Error> {
        let now = self.clock.now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.read_err(e))?;
        let record = current.as_ref().and_then(|l| l.spec.as_ref());
        let observed_at = self.observe(record, now);
        let spec = match step(record, observed_at, &self.identity, now, &self.timing) {
            Step::Follow { holder, retry_at } => {
                return Ok(Observed::Following { holder, retry_at });
            }
            Step::Claim(spec) => spec,
        };
        let write = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                // Keeps metadata.resourceVersion: if anyone wrote since we read, this fails.
                lease.spec = Some(spec);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match write {
            Ok(written) => {
                // Our own write is the record now, seen at the time we made it.
                self.observe(written.spec.as_ref(), now);
                Ok(Observed::Leading)
            }
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                Ok(Observed::Following {
                    holder: "another replica".into(),
                    retry_at: now + signed(self.timing.retry_period),
                })
            }
            Err(e) => Err(self.write_err(e)),
        }
    }

    /// Waits until this replica leads. Returns false when `stop` fired first.
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        let mut last_holder = String::new();
        loop {
            let wake = match self.look(self.timing.renew_deadline).await {
                Ok(Observed::Leading) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "acquired leadership");
                    return true;
                }
                Ok(Observed::Following { holder, retry_at }) => {
                    if holder != last_holder {
                        tracing::info!(%holder, "standing by; another replica leads");
                        last_holder = holder;
                    }
                    retry_at
                }
                Err(error) => {
                    tracing::warn!(%error, "leader election");
                    self.clock.now() + signed(self.timing.retry_period)
                }
            };
            if self.sleep_until(wake, stop).await {
                return false;
            }
        }
    }

    /// Renews the lease every retry period until `stop` fires or leadership is lost: another
    /// replica holds it, or no renewal succeeded for the renew deadline (measured on the
    /// monotonic clock; each attempt is cut off at the deadline).
    pub async fn hold(&self, stop: &CancellationToken) -> Held {
        let deadline = self.timing.renew_deadline;
        let mut last_renew = tokio::time::Instant::now();
        loop {
            let wake = self.clock.now() + signed(self.timing.retry_period);
            if self.sleep_until(wake, stop).await {
                return Held::Stopped;
            }
            let left = deadline.saturating_sub(last_renew.elapsed());
            let looked = tokio::select! {
                looked = self.look(left) => looked,
                () = stop.cancelled() => return Held::Stopped,
            };
            match looked {
                Ok(Observed::Leading) => last_renew = tokio::time::Instant::now(),
                Ok(Observed::Following { holder, .. }) => {
                    return Held::Lost(format!("{holder} holds the lease now"));
                }
                Err(error) => {
                    tracing::warn!(%error, "renewing the leader lease");
                    let since = last_renew.elapsed();
                    if since >= deadline {
                        return Held::Lost(format!("could not renew for {since:?}: {error}"));
                    }
                }
            }
        }
    }

    /// Holds the lease while `work` runs: as `hold`, and ends with `Abandoned` when `work_done`
    /// fires before `stop` (a leader whose controllers stopped reconciles nothing; renewing on
    /// would keep every standby out).
    pub async fn hold_while(
        &self,
        stop: &CancellationToken,
        work_done: &CancellationToken,
    ) -> Held {
        tokio::select! {
            held = self.hold(stop) => held,
            () = work_done.cancelled() => {
                if stop.is_cancelled() {
                    Held::Stopped
                } else {
                    Held::Abandoned("the controllers stopped".into())
                }
            }
        }
    }

    /// Hands the lease back so a standby replica takes over at once.
    pub async fn release(&self) -> Result<(), Error> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.read_err(e))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_ref() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        lease.spec = Some(released(spec, self.clock.now()));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(|e| self.write_err(e))?;
        tracing::info!(identity = %self.identity, "released leadership");
        Ok(())
    }

    /// Sleeps until `when`; returns true if `stop` fired first.
    async fn sleep_until(&self, when: Timestamp, stop: &CancellationToken) -> bool {
        let wait = when
            .duration_since(self.clock.now())
            .try_into()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(wait) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn timing() -> LeaseTiming {
        LeaseTiming::default()
    }

    /// Applies a step to a shared lease as the API server would (no conflict in this model:
    /// candidates act one at a time). The lease's record is taken as seen when it was
    /// written (`renewTime`), as a candidate that watched it all along would have.
    fn act(lease: &mut Option<LeaseSpec>, who: &str, now: Timestamp) -> bool {
        let seen = lease
            .as_ref()
            .and_then(|l| l.renew_time.as_ref())
            .map_or(now, |t| t.0);
        match step(lease.as_ref(), seen, who, now, &timing()) {
            Step::Claim(spec) => {
                *lease = Some(spec);
                true
            }
            Step::Follow { .. } => false,
        }
    }

    #[test]
    fn first_candidate_takes_a_missing_lease() {
        let Step::Claim(spec) = step(None, t(0), "a", t(0), &timing()) else {
            panic!()
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn a_live_lease_is_followed_until_expiry() {
        let mut lease = None;
        assert!(act(&mut lease, "a", t(0)));
        match step(lease.as_ref(), t(0), "b", t(14), &timing()) {
            Step::Follow { holder, retry_at } => {
                assert_eq!(holder, "a");
                assert_eq!(
                    retry_at,
                    t(15),
                    "wakes exactly at expiry, not a retry period later"
                );
            }
            other => panic!("{other:?}"),
        }
        match step(lease.as_ref(), t(0), "b", t(5), &timing()) {
            Step::Follow { retry_at, .. } => assert_eq!(retry_at, t(7)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn renewal_keeps_acquire_time_and_transitions() {
        let mut lease = None;
        act(&mut lease, "a", t(0));
        act(&mut lease, "a", t(2));
        let spec = lease.unwrap();
        assert_eq!(spec.acquire_time, Some(MicroTime(t(0))));
        assert_eq!(spec.renew_time, Some(MicroTime(t(2))));
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn takeover_after_expiry_counts_a_transition() {
        let mut lease = None;
        act(&mut lease, "a", t(0));
        assert!(!act(&mut lease, "b", t(14)));
        assert!(act(&mut lease, "b", t(15)));
        let spec = lease.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(t(15))));
    }

    #[test]
    fn released_lease_is_taken_at_the_next_look() {
        let mut lease = None;
        act(&mut lease, "a", t(0));
        lease = Some(released(lease.as_ref().unwrap(), t(3)));
        assert!(act(&mut lease, "b", t(3)));
        assert_eq!(
            lease.unwrap().lease_transitions,
            Some(0),
            "a released lease has no holder to transition from"
        );
    }

    /// Two replicas in simulated time, one second per tick; the leader dies at t=40 and is
    /// never heard from again. Exactly one leads at any tick, and the standby takes over
    /// within the lease duration of the leader's last renewal.
    #[test]
    fn exactly_one_leader_and_handover_within_lease_duration() {
        let timing = timing();
        let mut lease: Option<LeaseSpec> = None;
        let mut next_look = [t(0), t(0)];
        let names = ["a", "b"];
        let died_at = t(40);
        let mut leader_at_tick = vec![];
        let mut last_renewal_of_a = t(0);
        let mut observations = [Observation::default(), Observation::default()];
        for tick in 0..120 {
            let now = t(tick);
            for (i, who) in names.iter().enumerate() {
                if *who == "a" && now >= died_at {
                    continue;
                }
                if now < next_look[i] {
                    continue;
                }
                let seen = observations[i].observe(lease.as_ref(), now);
                match step(lease.as_ref(), seen, who, now, &timing) {
                    Step::Claim(spec) => {
                        observations[i].observe(Some(&spec), now);
                        lease = Some(spec);
                        if *who == "a" {
                            last_renewal_of_a = now;
                        }
                        next_look[i] = now + signed(timing.retry_period);
                    }
                    Step::Follow { retry_at, .. } => next_look[i] = retry_at,
                }
            }
            let holder = lease
                .as_ref()
                .and_then(|l| l.holder_identity.clone())
                .unwrap();
            leader_at_tick.push(holder);
        }
        assert!(leader_at_tick[..40].iter().all(|h| h == "a"));
        let takeover = leader_at_tick.iter().position(|h| h == "b").unwrap() as i64;
        let deadline = last_renewal_of_a.as_second() - t(0).as_second() + 15;
        assert!(
            takeover <= deadline,
            "took over at {takeover}s, lease ran out at {deadline}s"
        );
        assert!(leader_at_tick[takeover as usize..].iter().all(|h| h == "b"));
    }

    /// Found in review: expiry compared the holder's `renewTime` with our clock, so a holder
    /// whose clock ran 20 s behind looked expired at every look and was taken over while alive.
    #[test]
    fn expiry_is_judged_by_when_we_saw_a_change_not_by_the_holders_clock() {
        let timing = timing();
        // a's clock is 20 s behind: its renewals carry times 20 s in our past.
        let renewed = |at: i64| LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(at - 20))),
            ..LeaseSpec::default()
        };
        let mut seen = Observation::default();
        for now in (0..60).step_by(2) {
            let lease = renewed(now);
            let at = seen.observe(Some(&lease), t(now));
            assert!(
                matches!(
                    step(Some(&lease), at, "b", t(now), &timing),
                    Step::Follow { .. }
                ),
                "a renews every 2 s and is alive at {now}"
            );
        }
        // a stops renewing at 58: b takes over 15 s after it first saw the last record, by
        // its own clock, not earlier.
        let last = renewed(58);
        let at = seen.observe(Some(&last), t(72));
        assert!(matches!(
            step(Some(&last), at, "b", t(72), &timing),
            Step::Follow { retry_at, .. } if retry_at == t(73)
        ));
        assert!(matches!(
            step(Some(&last), at, "b", t(73), &timing),
            Step::Claim(_)
        ));

        // A holder whose clock runs ahead (renewTime in our future) is taken over once it
        // stops, too: the record is unchanged for the lease duration.
        let ahead = LeaseSpec {
            renew_time: Some(MicroTime(t(1000))),
            ..renewed(0)
        };
        let mut seen = Observation::default();
        let at = seen.observe(Some(&ahead), t(100));
        assert_eq!(seen.observe(Some(&ahead), t(110)), at, "unchanged record");
        assert!(matches!(
            step(Some(&ahead), at, "b", t(115), &timing),
            Step::Claim(_)
        ));
    }
}
