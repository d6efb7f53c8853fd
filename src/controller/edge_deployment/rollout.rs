//! Pure rollout state machines (Rolling, BlueGreen, Canary): from the persisted rollout state,
//! what was observed (target revision, readiness, compliance, a new analysis measurement, an
//! imperative command) and the time, the next state and what to tell the user. No I/O: the
//! reconciler persists `State` in status, so a restarted controller resumes at the same step.
//!
//! Invariants (proptested below): the traffic split always sums to 100; traffic never stays
//! on a candidate whose analysis failed beyond the limit; a step is never skipped — each
//! decision moves at most one step forward, and a promotion only completes the current pause.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch: the only clock this module sees.
pub type Seconds = i64;

/// One canary step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Percent of traffic to the candidate.
    SetWeight(u8),
    /// Wait this many seconds, or until promoted when `None`.
    Pause(Option<Seconds>),
    /// Wait for this many passing analysis measurements.
    Analysis(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Rolling,
    BlueGreen {
        auto_promote: bool,
        scale_down_delay: Seconds,
        pre_promotion_analysis: bool,
    },
    Canary {
        steps: Vec<Step>,
    },
}

/// The strategy as the state machine needs it (from `spec.strategy`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Strategy {
    pub kind: Kind,
    /// Failed measurements tolerated; one more aborts the rollout.
    pub failure_limit: u32,
}

impl Strategy {
    /// The state machine's view of `spec.strategy`.
    pub fn from_spec(spec: &crate::api::edge_deployment::StrategySpec) -> Self {
        use crate::api::edge_deployment::{CanaryStep, StrategyType};
        let kind = match spec.type_ {
            StrategyType::Rolling => Kind::Rolling,
            StrategyType::BlueGreen => {
                let bg = spec.blue_green.clone().unwrap_or_default();
                Kind::BlueGreen {
                    auto_promote: bg.auto_promote,
                    scale_down_delay: Seconds::from(bg.scale_down_delay_seconds),
                    pre_promotion_analysis: bg.pre_promotion_analysis,
                }
            }
            StrategyType::Canary => Kind::Canary {
                steps: spec
                    .canary
                    .iter()
                    .flat_map(|c| &c.steps)
                    .map(|step| match step {
                        CanaryStep::SetWeight(w) => Step::SetWeight((*w).clamp(0, 100) as u8),
                        CanaryStep::Pause(p) => {
                            Step::Pause(p.duration.map(|d| d.as_std().as_secs() as Seconds))
                        }
                        CanaryStep::Analysis(a) => Step::Analysis(a.iterations.unwrap_or(1)),
                    })
                    .collect(),
            },
        };
        Self {
            kind,
            failure_limit: spec.analysis.as_ref().map_or(0, |a| a.failure_limit),
        }
    }
}

/// What the user asked for through an annotation or `kubectl kasmina`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Promote,
    Abort,
    Retry,
    Pause,
    Resume,
}

/// The result of one analysis interval of the candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Measurement {
    Pass,
    Fail(String),
    /// Not enough data (no traffic yet, pods not scraped): neither counts.
    Inconclusive,
}

/// What the reconciler observed this time.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub now: Seconds,
    /// The revision the spec asks for.
    pub target: String,
    /// The target's artifact is built.
    pub artifact_ready: bool,
    /// The candidate's Deployment has all its replicas available.
    pub candidate_ready: bool,
    /// False when the ComplianceProfile controller set Compliant=False on the object.
    pub compliant: bool,
    /// Why the candidate's runtime refused its artifact (digest, signature, decryption).
    pub refused: Option<String>,
    /// `spec.paused`.
    pub spec_paused: bool,
    pub measurement: Option<Measurement>,
    pub command: Option<Command>,
}

/// The rollout's memory, persisted in status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The revision serving; None before the first one is up.
    pub stable: Option<String>,
    /// The revision being rolled out.
    pub candidate: Option<String>,
    /// Canary step being run.
    pub step: u32,
    pub step_started_at: Seconds,
    /// Percent of traffic on the candidate.
    pub weight: u8,
    /// Passing measurements in the current step.
    pub passed: u32,
    /// Failed measurements in this rollout.
    pub failed: u32,
    /// The old stable revision, kept running until `scale_down_at` for an instant rollback.
    pub previous: Option<String>,
    pub scale_down_at: Option<Seconds>,
    /// A candidate that was rolled back; it is not tried again until `retry` or a new target.
    pub aborted: Option<String>,
    /// Paused by command (as opposed to `spec.paused`).
    pub paused: bool,
}

/// How the rollout looks after a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Progressing,
    Paused,
    Healthy,
    RolledBack,
}

/// A rollout that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub revision: String,
    pub outcome: Outcome,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Promoted,
    RolledBack,
    Aborted,
    Superseded,
}

/// Something worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The next state and what changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub state: State,
    pub phase: Phase,
    pub ended: Option<Ended>,
    pub notes: Vec<Note>,
    /// Why the candidate is held, if it is (for the Progressing condition).
    pub waiting: Option<String>,
}

impl State {
    /// (stable, candidate) percent; always sums to 100.
    pub fn split(&self) -> (u8, u8) {
        (100 - self.weight, self.weight)
    }
}

fn note(reason: &'static str, message: String) -> Note {
    Note {
        warning: false,
        reason,
        message,
    }
}

fn warn(reason: &'static str, message: String) -> Note {
    Note {
        warning: true,
        reason,
        message,
    }
}

/// Decides the next rollout state.
pub fn decide(strategy: &Strategy, state: &State, seen: &Observed) -> Decision {
    let mut s = state.clone();
    let mut notes = vec![];
    let mut ended = None;
    let now = seen.now;

    // The old stable revision is released once its scale-down delay has passed.
    if s.scale_down_at.is_some_and(|at| now >= at) {
        s.previous = None;
        s.scale_down_at = None;
    }

    // A retry makes a rolled-back target eligible again.
    if seen.command == Some(Command::Retry) && s.aborted.as_deref() == Some(seen.target.as_str()) {
        s.aborted = None;
        notes.push(note(
            "RolloutRetried",
            format!("retrying revision {}", seen.target),
        ));
    }
    match seen.command {
        Some(Command::Pause) if !s.paused => {
            s.paused = true;
            notes.push(note("RolloutPaused", "paused by command".into()));
        }
        Some(Command::Resume) if s.paused => {
            s.paused = false;
            notes.push(note("RolloutResumed", "resumed by command".into()));
        }
        _ => {}
    }

    // The target changed: the candidate in flight (if any) is superseded; a target equal to
    // the stable revision simply ends the rollout.
    if let Some(candidate) = s.candidate.clone()
        && candidate != seen.target
    {
        ended = Some(Ended {
            revision: candidate.clone(),
            outcome: Outcome::Superseded,
            reason: format!("the spec now asks for revision {}", seen.target),
        });
        notes.push(note(
            "RolloutSuperseded",
            format!("revision {candidate} superseded by {}", seen.target),
        ));
        reset_candidate(&mut s, None, now);
    }
    if s.stable.as_deref() != Some(seen.target.as_str())
        && s.candidate.is_none()
        && s.aborted.as_deref() != Some(seen.target.as_str())
    {
        reset_candidate(&mut s, Some(seen.target.clone()), now);
        if s.stable.is_some() {
            notes.push(note(
                "RolloutStarted",
                format!("rolling out revision {}", seen.target),
            ));
        }
    }

    let decision = |s: State, phase, ended, notes, waiting: Option<String>| Decision {
        state: s,
        phase,
        ended,
        notes,
        waiting,
    };

    let Some(candidate) = s.candidate.clone() else {
        let phase = if s.aborted.is_some() && s.aborted.as_deref() == Some(seen.target.as_str()) {
            Phase::RolledBack
        } else if s.stable.is_some() {
            Phase::Healthy
        } else {
            Phase::Pending
        };
        return decision(s, phase, ended, notes, None);
    };

    // Abort by command: traffic back to stable at once.
    if seen.command == Some(Command::Abort) && s.stable.is_some() {
        let e = roll_back(
            &mut s,
            &candidate,
            Outcome::Aborted,
            "aborted by command".into(),
            now,
        );
        notes.push(warn("RolloutAborted", e.reason.clone()));
        return decision(s, Phase::RolledBack, Some(e), notes, None);
    }

    // A refused artifact (tampered, or signed or encrypted with other keys) will not heal by
    // waiting: abort, and the stable revision keeps serving.
    if let Some(why) = &seen.refused
        && s.stable.is_some()
    {
        let reason = format!("the runtime refused the artifact of revision {candidate}: {why}");
        let e = roll_back(&mut s, &candidate, Outcome::Aborted, reason, now);
        notes.push(warn("ArtifactRefused", e.reason.clone()));
        return decision(s, Phase::RolledBack, Some(e), notes, None);
    }

    // Analysis: failures count whenever they are measured; too many roll back.
    if let Some(m) = &seen.measurement {
        match m {
            Measurement::Pass => s.passed += 1,
            Measurement::Fail(why) => {
                s.failed += 1;
                notes.push(warn(
                    "AnalysisFailed",
                    format!(
                        "revision {candidate}: {why} ({} of {} tolerated)",
                        s.failed, strategy.failure_limit
                    ),
                ));
                if s.failed > strategy.failure_limit && s.stable.is_some() {
                    let reason = format!(
                        "analysis failed {} times (limit {}): {why}",
                        s.failed, strategy.failure_limit
                    );
                    let e = roll_back(&mut s, &candidate, Outcome::RolledBack, reason, now);
                    notes.push(warn("RolledBack", e.reason.clone()));
                    return decision(s, Phase::RolledBack, Some(e), notes, None);
                }
            }
            Measurement::Inconclusive => {}
        }
    }

    // The first revision has nothing to roll out against: it becomes stable when ready.
    if s.stable.is_none() {
        if seen.artifact_ready && seen.candidate_ready && seen.compliant {
            let e = promote(&mut s, &candidate, now, 0, "first revision".into());
            notes.push(note("Promoted", format!("revision {candidate} is serving")));
            return decision(s, Phase::Healthy, Some(e), notes, None);
        }
        let why = waiting_reason(seen);
        return decision(s, Phase::Pending, ended, notes, why);
    }

    if s.paused || seen.spec_paused {
        return decision(s, Phase::Paused, ended, notes, Some("paused".into()));
    }
    if let Some(why) = waiting_reason(seen) {
        // A non-compliant candidate gets no traffic.
        if !seen.compliant {
            s.weight = 0;
        }
        return decision(s, Phase::Progressing, ended, notes, Some(why));
    }

    match &strategy.kind {
        Kind::Rolling => {
            let e = promote(&mut s, &candidate, now, 0, "ready".into());
            notes.push(note("Promoted", format!("revision {candidate} is serving")));
            decision(s, Phase::Healthy, Some(e), notes, None)
        }
        Kind::BlueGreen {
            auto_promote,
            scale_down_delay,
            pre_promotion_analysis,
        } => {
            if *pre_promotion_analysis && s.passed == 0 {
                return decision(
                    s,
                    Phase::Progressing,
                    ended,
                    notes,
                    Some("pre-promotion analysis".into()),
                );
            }
            if !auto_promote && seen.command != Some(Command::Promote) {
                return decision(
                    s,
                    Phase::Paused,
                    ended,
                    notes,
                    Some("waiting for promote".into()),
                );
            }
            let e = promote(
                &mut s,
                &candidate,
                now,
                *scale_down_delay,
                "switched".into(),
            );
            notes.push(note(
                "Promoted",
                format!("active Service switched to revision {candidate}"),
            ));
            decision(s, Phase::Healthy, Some(e), notes, None)
        }
        Kind::Canary { steps } => {
            // The weight the completed steps set (it is zeroed while the candidate is held).
            s.weight = steps[..(s.step as usize).min(steps.len())]
                .iter()
                .rev()
                .find_map(|st| match st {
                    Step::SetWeight(w) => Some((*w).min(100)),
                    _ => None,
                })
                .unwrap_or(0);
            let Some(step) = steps.get(s.step as usize).copied() else {
                let e = promote(&mut s, &candidate, now, 0, "all steps passed".into());
                notes.push(note(
                    "Promoted",
                    format!("revision {candidate} takes all traffic"),
                ));
                return decision(s, Phase::Healthy, Some(e), notes, None);
            };
            let done = match step {
                Step::SetWeight(w) => {
                    if s.weight != w {
                        notes.push(note(
                            "WeightChanged",
                            format!("revision {candidate}: {} → {w} % of traffic", s.weight),
                        ));
                    }
                    s.weight = w.min(100);
                    true
                }
                Step::Pause(Some(d)) => {
                    now >= s.step_started_at + d || seen.command == Some(Command::Promote)
                }
                Step::Pause(None) => seen.command == Some(Command::Promote),
                Step::Analysis(n) => s.passed >= n.max(1),
            };
            let phase = if matches!(step, Step::Pause(None)) && !done {
                Phase::Paused
            } else {
                Phase::Progressing
            };
            if done {
                s.step += 1;
                s.step_started_at = now;
                s.passed = 0;
                notes.push(note(
                    "StepCompleted",
                    format!(
                        "revision {candidate}: step {} of {} done",
                        s.step,
                        steps.len()
                    ),
                ));
                decision(s, Phase::Progressing, ended, notes, None)
            } else {
                let why = match step {
                    Step::Pause(Some(d)) => format!("pause until {}", s.step_started_at + d),
                    Step::Pause(None) => "waiting for promote".into(),
                    Step::Analysis(n) => format!("analysis {} of {n} passed", s.passed),
                    Step::SetWeight(_) => String::new(),
                };
                decision(s, phase, ended, notes, Some(why))
            }
        }
    }
}

fn waiting_reason(seen: &Observed) -> Option<String> {
    if !seen.artifact_ready {
        Some("building the artifact".into())
    } else if let Some(why) = &seen.refused {
        Some(format!("the runtime refused the artifact: {why}"))
    } else if !seen.compliant {
        Some("not compliant: never promoted".into())
    } else if !seen.candidate_ready {
        Some("waiting for the candidate's pods".into())
    } else {
        None
    }
}

fn reset_candidate(s: &mut State, candidate: Option<String>, now: Seconds) {
    s.candidate = candidate;
    s.step = 0;
    s.step_started_at = now;
    s.weight = 0;
    s.passed = 0;
    s.failed = 0;
}

fn promote(s: &mut State, candidate: &str, now: Seconds, delay: Seconds, reason: String) -> Ended {
    if let Some(old) = s.stable.replace(candidate.to_owned()) {
        s.previous = Some(old);
        // `now` is whole seconds, rounded down: a delay counted from it could end up to a
        // second early (the real control plane deleted blue 9.2 s into a 10 s delay), so a
        // delay runs to the next whole second past it.
        s.scale_down_at = Some(if delay > 0 { now + delay + 1 } else { now });
    }
    reset_candidate(s, None, now);
    s.aborted = None;
    Ended {
        revision: candidate.to_owned(),
        outcome: Outcome::Promoted,
        reason,
    }
}

fn roll_back(
    s: &mut State,
    candidate: &str,
    outcome: Outcome,
    reason: String,
    now: Seconds,
) -> Ended {
    s.aborted = Some(candidate.to_owned());
    reset_candidate(s, None, now);
    Ended {
        revision: candidate.to_owned(),
        outcome,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary(steps: Vec<Step>) -> Strategy {
        Strategy {
            kind: Kind::Canary { steps },
            failure_limit: 1,
        }
    }

    fn seen(now: Seconds, target: &str) -> Observed {
        Observed {
            now,
            target: target.into(),
            artifact_ready: true,
            candidate_ready: true,
            compliant: true,
            refused: None,
            spec_paused: false,
            measurement: None,
            command: None,
        }
    }

    #[test]
    fn a_refused_artifact_aborts_at_once_and_keeps_stable() {
        let mut s = stable("r0");
        s.candidate = Some("r1".into());
        s.weight = 20;
        let mut o = seen(10, "r1");
        o.candidate_ready = false;
        o.refused = Some("pod p: manifest digest is sha256:aa, expected sha256:bb".into());
        let d = decide(&canary(vec![Step::SetWeight(20)]), &s, &o);
        assert_eq!(d.phase, Phase::RolledBack);
        assert_eq!(d.state.stable.as_deref(), Some("r0"));
        assert_eq!((d.state.candidate.clone(), d.state.weight), (None, 0));
        let ended = d.ended.unwrap();
        assert_eq!(ended.outcome, Outcome::Aborted);
        assert!(
            ended
                .reason
                .contains("refused the artifact of revision r1: pod p: manifest digest")
        );
        assert_eq!(d.notes[0].reason, "ArtifactRefused");
        // It stays aborted: the same target is not retried by itself.
        let again = decide(
            &canary(vec![Step::SetWeight(20)]),
            &d.state,
            &seen(20, "r1"),
        );
        assert_eq!(
            (again.phase, again.state.candidate),
            (Phase::RolledBack, None)
        );

        // The first revision has no stable to keep: it waits, saying why.
        let d = decide(&canary(vec![]), &State::default(), &o);
        assert_eq!(d.phase, Phase::Pending);
        assert!(
            d.waiting
                .unwrap()
                .starts_with("the runtime refused the artifact")
        );
    }

    fn stable(rev: &str) -> State {
        State {
            stable: Some(rev.into()),
            ..State::default()
        }
    }

    #[test]
    fn the_first_revision_becomes_stable_when_ready() {
        let s = State::default();
        let mut o = seen(0, "a");
        o.candidate_ready = false;
        let d = decide(&canary(vec![Step::SetWeight(50)]), &s, &o);
        assert_eq!(
            (d.phase, d.state.candidate.as_deref()),
            (Phase::Pending, Some("a"))
        );
        assert_eq!(
            d.waiting.as_deref(),
            Some("waiting for the candidate's pods")
        );
        let d = decide(&canary(vec![Step::SetWeight(50)]), &d.state, &seen(1, "a"));
        assert_eq!(d.phase, Phase::Healthy);
        assert_eq!(d.state.stable.as_deref(), Some("a"));
        assert_eq!(d.ended.unwrap().outcome, Outcome::Promoted);
        // Steady: nothing changes, nothing to say.
        let again = decide(&canary(vec![]), &d.state, &seen(2, "a"));
        assert_eq!(again.state, d.state);
        assert!(again.notes.is_empty() && again.ended.is_none());
    }

    #[test]
    fn a_canary_walks_its_steps_one_at_a_time() {
        let strategy = canary(vec![
            Step::SetWeight(20),
            Step::Pause(Some(60)),
            Step::Analysis(2),
            Step::SetWeight(50),
            Step::Pause(None),
        ]);
        let mut s = stable("a");
        let mut t = 0;
        let go = |s: &State, o: Observed| decide(&strategy, s, &o);

        let d = go(&s, seen(t, "b"));
        assert_eq!((d.state.step, d.state.weight), (1, 20));
        s = d.state;
        // The timed pause holds until its minute is up.
        t += 30;
        let d = go(&s, seen(t, "b"));
        assert_eq!((d.state.step, d.phase), (1, Phase::Progressing));
        t += 30;
        let d = go(&s, seen(t, "b"));
        assert_eq!(d.state.step, 2);
        s = d.state;
        // Analysis needs two passes; an inconclusive one does not count.
        for (m, step) in [
            (Measurement::Pass, 2),
            (Measurement::Inconclusive, 2),
            (Measurement::Pass, 3),
        ] {
            let mut o = seen(t, "b");
            o.measurement = Some(m);
            s = go(&s, o).state;
            assert_eq!(s.step, step);
        }
        s = go(&s, seen(t, "b")).state;
        assert_eq!((s.step, s.weight), (4, 50));
        // The open pause waits for a promotion, which completes only that step.
        let d = go(&s, seen(t + 999, "b"));
        assert_eq!((d.phase, d.state.step), (Phase::Paused, 4));
        let mut o = seen(t, "b");
        o.command = Some(Command::Promote);
        s = go(&s, o).state;
        assert_eq!((s.step, s.weight), (5, 50));
        let d = go(&s, seen(t, "b"));
        assert_eq!(d.phase, Phase::Healthy);
        assert_eq!(d.state.stable.as_deref(), Some("b"));
        assert_eq!(d.state.previous.as_deref(), Some("a"));
        assert_eq!(d.state.split(), (100, 0));
    }

    #[test]
    fn failed_analysis_beyond_the_limit_rolls_back_and_stays_back() {
        let strategy = canary(vec![Step::SetWeight(30), Step::Analysis(5)]);
        let mut s = decide(&strategy, &stable("a"), &seen(0, "b")).state;
        assert_eq!(s.weight, 30);
        let fail = |t| {
            let mut o = seen(t, "b");
            o.measurement = Some(Measurement::Fail("error rate 0.2 > 0.05".into()));
            o
        };
        let d = decide(&strategy, &s, &fail(15));
        assert_eq!(
            (d.phase, d.state.weight),
            (Phase::Progressing, 30),
            "1 failure tolerated"
        );
        s = d.state;
        let d = decide(&strategy, &s, &fail(30));
        assert_eq!(d.phase, Phase::RolledBack);
        assert_eq!(d.state.split(), (100, 0));
        assert_eq!(d.state.aborted.as_deref(), Some("b"));
        let e = d.ended.unwrap();
        assert_eq!(e.outcome, Outcome::RolledBack);
        assert!(e.reason.contains("error rate"), "{}", e.reason);
        // The same target is not retried on its own…
        let again = decide(&strategy, &d.state, &seen(45, "b"));
        assert_eq!(
            (again.phase, again.state.candidate),
            (Phase::RolledBack, None)
        );
        // …until retried, or until the spec asks for something else.
        let mut o = seen(60, "b");
        o.command = Some(Command::Retry);
        let retried = decide(&strategy, &d.state, &o);
        assert_eq!(retried.state.candidate.as_deref(), Some("b"));
        let next = decide(&strategy, &d.state, &seen(60, "c"));
        assert_eq!(next.state.candidate.as_deref(), Some("c"));
    }

    #[test]
    fn abort_pause_resume_and_supersede() {
        let strategy = canary(vec![Step::SetWeight(40), Step::Pause(None)]);
        let s = decide(&strategy, &stable("a"), &seen(0, "b")).state;
        let mut o = seen(1, "b");
        o.command = Some(Command::Pause);
        let paused = decide(&strategy, &s, &o);
        assert_eq!(paused.phase, Phase::Paused);
        let mut o = seen(2, "b");
        o.command = Some(Command::Promote);
        let d = decide(&strategy, &paused.state, &o);
        assert_eq!(d.state.step, 1, "a paused rollout does not move");
        let mut o = seen(3, "b");
        o.command = Some(Command::Resume);
        assert!(!decide(&strategy, &paused.state, &o).state.paused);

        let mut o = seen(4, "b");
        o.command = Some(Command::Abort);
        let d = decide(&strategy, &s, &o);
        assert_eq!((d.phase, d.state.weight), (Phase::RolledBack, 0));
        assert_eq!(d.ended.unwrap().outcome, Outcome::Aborted);

        let d = decide(&strategy, &s, &seen(5, "c"));
        assert_eq!(d.ended.unwrap().outcome, Outcome::Superseded);
        assert_eq!(
            (d.state.candidate.as_deref(), d.state.weight),
            (Some("c"), 40)
        );
        // Back to the stable revision: the rollout just ends.
        let d = decide(&strategy, &s, &seen(5, "a"));
        assert_eq!(
            (d.phase, d.state.candidate.as_deref()),
            (Phase::Healthy, None)
        );
        assert_eq!(d.state.split(), (100, 0));
    }

    #[test]
    fn a_non_compliant_or_unbuilt_candidate_gets_no_traffic_and_no_promotion() {
        let strategy = canary(vec![Step::SetWeight(50)]);
        let s = decide(&strategy, &stable("a"), &seen(0, "b")).state;
        assert_eq!(s.weight, 50);
        let mut o = seen(1, "b");
        o.compliant = false;
        let mut held = s.clone();
        for _ in 0..3 {
            let d = decide(&strategy, &held, &o);
            assert_eq!((d.state.weight, d.state.stable.as_deref()), (0, Some("a")));
            assert_eq!(d.waiting.as_deref(), Some("not compliant: never promoted"));
            held = d.state;
        }
        // Compliant again: the weight the steps set comes back, then the promotion.
        let d = decide(&strategy, &held, &seen(2, "b"));
        assert_eq!(d.state.stable.as_deref(), Some("b"));
        let mut o = seen(1, "c");
        o.artifact_ready = false;
        let d = decide(&strategy, &s, &o);
        assert_eq!(d.waiting.as_deref(), Some("building the artifact"));
        assert_eq!(d.state.weight, 0);
    }

    #[test]
    fn rolling_and_blue_green() {
        let rolling = Strategy {
            kind: Kind::Rolling,
            failure_limit: 0,
        };
        let d = decide(&rolling, &stable("a"), &seen(10, "b"));
        assert_eq!(
            (d.phase, d.state.stable.as_deref()),
            (Phase::Healthy, Some("b"))
        );
        assert_eq!(d.state.scale_down_at, Some(10));

        let bg = |auto, analysis| Strategy {
            kind: Kind::BlueGreen {
                auto_promote: auto,
                scale_down_delay: 30,
                pre_promotion_analysis: analysis,
            },
            failure_limit: 0,
        };
        let d = decide(&bg(true, false), &stable("a"), &seen(10, "b"));
        assert_eq!(d.state.stable.as_deref(), Some("b"));
        assert_eq!(
            (d.state.previous.as_deref(), d.state.scale_down_at),
            (Some("a"), Some(41)),
            "never before the whole delay, whatever fraction of second 10 it started in"
        );
        let during = decide(&bg(true, false), &d.state, &seen(40, "b"));
        assert_eq!(during.state.previous.as_deref(), Some("a"));
        // The old revision is released after the delay.
        let later = decide(&bg(true, false), &d.state, &seen(41, "b"));
        assert_eq!(
            (later.state.previous, later.state.scale_down_at),
            (None, None)
        );

        let d = decide(&bg(false, false), &stable("a"), &seen(10, "b"));
        assert_eq!(
            (d.phase, d.state.stable.as_deref()),
            (Phase::Paused, Some("a"))
        );
        let mut o = seen(11, "b");
        o.command = Some(Command::Promote);
        assert_eq!(
            decide(&bg(false, false), &d.state, &o)
                .state
                .stable
                .as_deref(),
            Some("b")
        );

        let d = decide(&bg(true, true), &stable("a"), &seen(10, "b"));
        assert_eq!(d.waiting.as_deref(), Some("pre-promotion analysis"));
        let mut o = seen(25, "b");
        o.measurement = Some(Measurement::Pass);
        assert_eq!(decide(&bg(true, true), &d.state, &o).phase, Phase::Healthy);
        let mut o = seen(25, "b");
        o.measurement = Some(Measurement::Fail("p99 900 > 200".into()));
        let failed = decide(&bg(true, true), &d.state, &o);
        assert_eq!(
            (failed.phase, failed.state.stable.as_deref()),
            (Phase::RolledBack, Some("a"))
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::{
            Strategy as Gen, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest,
        };

        fn step() -> impl Gen<Value = Step> {
            prop_oneof![
                (0u8..=100).prop_map(Step::SetWeight),
                prop::option::of(0i64..120).prop_map(Step::Pause),
                (1u32..4).prop_map(Step::Analysis),
            ]
        }

        fn observed() -> impl Gen<Value = (i64, u8, bool, bool, Option<u8>, Option<u8>)> {
            (
                0i64..60,
                0u8..3,
                any::<bool>(),
                any::<bool>(),
                prop::option::of(0u8..3),
                prop::option::of(0u8..5),
            )
        }

        proptest! {
            #[test]
            fn invariants_hold_for_any_event_sequence(
                steps in prop::collection::vec(step(), 1..6),
                limit in 0u32..3,
                events in prop::collection::vec(observed(), 1..60),
            ) {
                let strategy = Strategy {
                    kind: Kind::Canary { steps: steps.clone() },
                    failure_limit: limit,
                };
                let mut s = stable("r0");
                let mut now = 0;
                for (dt, target, ready, compliant, m, c) in events {
                    now += dt;
                    let o = Observed {
                        now,
                        target: format!("r{target}"),
                        artifact_ready: true,
                        candidate_ready: ready,
                        compliant,
                        refused: None,
                        spec_paused: false,
                        measurement: m.map(|m| match m {
                            0 => Measurement::Pass,
                            1 => Measurement::Fail("bad".into()),
                            _ => Measurement::Inconclusive,
                        }),
                        command: c.map(|c| [Command::Promote, Command::Abort, Command::Retry, Command::Pause, Command::Resume][c as usize]),
                    };
                    let d = decide(&strategy, &s, &o);
                    let (a, b) = d.state.split();
                    prop_assert_eq!(u32::from(a) + u32::from(b), 100);
                    if d.state.failed > limit {
                        prop_assert_eq!(d.state.weight, 0, "traffic stayed on a failed candidate");
                    }
                    if d.phase == Phase::RolledBack {
                        prop_assert_eq!(d.state.weight, 0);
                    }
                    if d.state.candidate.is_some() && d.state.candidate == s.candidate {
                        prop_assert!(d.state.step <= s.step + 1, "a step was skipped");
                    }
                    if let Some(e) = &d.ended && e.outcome == Outcome::Promoted && s.stable.is_some() {
                        // A canary is promoted only from past its last step.
                        prop_assert_eq!(s.step as usize, steps.len());
                    }
                    prop_assert!(d.state.weight == 0 || d.state.candidate.is_some());
                    s = d.state;
                }
            }
        }
    }
}
