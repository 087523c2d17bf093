//! When a threshold level is crossed, and whether that is worth an email: a pure state machine,
//! one per subject (an org's usage against its limit, or an integration's against its quota).
//!
//! - A level *fires* when usage reaches it while it is armed; the email names the highest level
//!   that fired. A level that fired stays quiet until it is *re-armed*: usage fell below it by
//!   more than the hysteresis ([`HYSTERESIS_PERCENT`] of the limit or quota), or a whole window
//!   has passed since the last level fired (every call of those crossings has aged out: staying
//!   above is news again, once per window). The window re-arms every fired level at once, so
//!   that a day above 80 % and 90 % is told once, naming 90 %, rather than once per level.
//! - `min_interval` is the shortest time between two emails of a subject, except that an email
//!   about a higher level than the last one is never held back: "now 90 %" must not wait hours
//!   behind "80 %". A crossing held back is not sent later; it is logged.
//! - A lower usage figure is believed for re-arming only if it is as good as the one the levels
//!   fired on: after a restart the org's estimate is the proxy's own count until Salesforce
//!   reports again, and that must not re-arm (then repeat) an email about reported usage.
//!
//! The state is saved in the store before an email is sent, so a restart never sends one twice.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Usage must fall this many percent of the limit (or quota) below a level to re-arm it.
pub const HYSTERESIS_PERCENT: u64 = 5;

/// One threshold level of a subject, resolved to calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// As the admin wrote it (`80%`, `95000`): the key of its state, so that a level keeps its
    /// state when the limit (and so its value in calls) changes.
    pub key: String,
    pub calls: u64,
}

/// What the watcher read for a subject.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub used: u64,
    /// The org's limit or the integration's quota, when known.
    pub budget: Option<u64>,
    /// The figure includes what Salesforce reported (org usage after a report), rather than only
    /// the proxy's own count.
    pub reported: bool,
    pub now_ms: u64,
    /// The rolling window's length.
    pub window: Duration,
}

/// The state of one subject, saved in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectState {
    /// Levels that fired and are not re-armed, with when they fired (Unix ms).
    #[serde(default)]
    pub fired: BTreeMap<String, u64>,
    /// The levels fired on a figure Salesforce reported.
    #[serde(default)]
    pub fired_on_report: bool,
    /// When the last email was sent (or would have been, without recipients), and for which
    /// level, in calls.
    #[serde(default)]
    pub last_email_ms: Option<u64>,
    #[serde(default)]
    pub last_email_calls: Option<u64>,
}

/// What to do about a reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Email about this level (the highest that fired).
    Email(Level),
    /// A level fired, but an email went out less than `min_interval` ago about this level or a
    /// higher one.
    HeldBack(Level),
}

impl SubjectState {
    pub fn is_empty(&self) -> bool {
        self.fired.is_empty() && self.last_email_ms.is_none()
    }

    /// Applies a reading: re-arms levels, fires crossed ones and decides about an email.
    pub fn evaluate(
        &mut self,
        levels: &[Level],
        reading: &Reading,
        min_interval: Duration,
    ) -> Decision {
        // Levels the admin removed have no state.
        self.fired
            .retain(|key, _| levels.iter().any(|l| &l.key == key));

        let trusted = reading.reported || !self.fired_on_report;
        let window_ms = reading.window.as_millis() as u64;
        let last_fired = self.fired.values().max().copied();
        if last_fired.is_some_and(|at| reading.now_ms.saturating_sub(at) >= window_ms) {
            self.fired.clear();
        }
        for level in levels {
            if !self.fired.contains_key(&level.key) {
                continue;
            }
            let hysteresis = reading.budget.unwrap_or(level.calls) * HYSTERESIS_PERCENT / 100;
            if trusted && reading.used + hysteresis < level.calls {
                self.fired.remove(&level.key);
            }
        }
        if self.fired.is_empty() {
            self.fired_on_report = false;
        }

        let crossed: Vec<&Level> = levels
            .iter()
            .filter(|l| reading.used >= l.calls && !self.fired.contains_key(&l.key))
            .collect();
        let Some(highest) = crossed.iter().max_by_key(|l| l.calls).map(|l| (*l).clone()) else {
            return Decision::Nothing;
        };
        for level in &crossed {
            self.fired.insert(level.key.clone(), reading.now_ms);
        }
        self.fired_on_report |= reading.reported;

        let recent = self
            .last_email_ms
            .is_some_and(|t| reading.now_ms.saturating_sub(t) < min_interval.as_millis() as u64);
        let escalation = self.last_email_calls.is_none_or(|c| highest.calls > c);
        if recent && !escalation {
            return Decision::HeldBack(highest);
        }
        self.last_email_ms = Some(reading.now_ms);
        self.last_email_calls = Some(highest.calls);
        Decision::Email(highest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const HOUR_MS: u64 = 3_600_000;

    fn levels(pcts: &[u64], limit: u64) -> Vec<Level> {
        pcts.iter()
            .map(|p| Level {
                key: format!("{p}%"),
                calls: limit * p / 100,
            })
            .collect()
    }

    fn at(used: u64, now_ms: u64) -> Reading {
        Reading {
            used,
            budget: Some(1_000),
            reported: true,
            now_ms,
            window: DAY,
        }
    }

    fn email(key: &str) -> Decision {
        Decision::Email(Level {
            key: key.to_owned(),
            calls: key.trim_end_matches('%').parse::<u64>().unwrap() * 10,
        })
    }

    #[test]
    fn one_email_per_crossing_and_the_highest_level_wins() {
        let l = levels(&[80, 90, 100], 1_000);
        let mut s = SubjectState::default();
        let i = Duration::from_secs(4 * 3600);
        assert_eq!(s.evaluate(&l, &at(500, 1), i), Decision::Nothing);
        assert_eq!(s.evaluate(&l, &at(820, 2), i), email("80%"));
        assert_eq!(s.evaluate(&l, &at(850, 3), i), Decision::Nothing);
        // An escalation is not held back by min_interval.
        assert_eq!(s.evaluate(&l, &at(905, 4), i), email("90%"));
        // Jumping over two levels at once: one email, about the higher.
        let mut s = SubjectState::default();
        assert_eq!(s.evaluate(&l, &at(1_000, 1), i), email("100%"));
        assert_eq!(s.evaluate(&l, &at(1_001, 2), i), Decision::Nothing);
    }

    #[test]
    fn re_armed_only_below_the_hysteresis() {
        let l = levels(&[80], 1_000);
        let mut s = SubjectState::default();
        let i = Duration::ZERO;
        assert_eq!(s.evaluate(&l, &at(800, 1), i), email("80%"));
        // Hovering around the level: 5 % of 1000 = 50 calls below it is needed.
        for (n, used) in [790, 760, 801, 751, 799].into_iter().enumerate() {
            assert_eq!(
                s.evaluate(&l, &at(used, 2 + n as u64), i),
                Decision::Nothing
            );
        }
        assert_eq!(s.evaluate(&l, &at(749, 10), i), Decision::Nothing); // re-armed
        assert_eq!(s.evaluate(&l, &at(800, 11), i), email("80%"));
    }

    #[test]
    fn min_interval_holds_back_a_repeat_but_not_an_escalation() {
        let l = levels(&[80, 90], 1_000);
        let mut s = SubjectState::default();
        let i = Duration::from_secs(4 * 3600);
        assert_eq!(s.evaluate(&l, &at(950, 0), i), email("90%"));
        assert_eq!(s.evaluate(&l, &at(100, HOUR_MS), i), Decision::Nothing); // re-armed
        let held = s.evaluate(&l, &at(950, 2 * HOUR_MS), i);
        assert!(
            matches!(held, Decision::HeldBack(ref l) if l.key == "90%"),
            "{held:?}"
        );
        // After the interval, the next crossing is told again.
        assert_eq!(s.evaluate(&l, &at(100, 5 * HOUR_MS), i), Decision::Nothing);
        assert_eq!(s.evaluate(&l, &at(850, 6 * HOUR_MS), i), email("80%"));
    }

    #[test]
    fn staying_above_for_a_whole_window_is_told_again() {
        let l = levels(&[80], 1_000);
        let mut s = SubjectState::default();
        let i = Duration::from_secs(3600);
        assert_eq!(s.evaluate(&l, &at(900, 0), i), email("80%"));
        assert_eq!(s.evaluate(&l, &at(900, 23 * HOUR_MS), i), Decision::Nothing);
        assert_eq!(s.evaluate(&l, &at(900, 24 * HOUR_MS), i), email("80%"));
    }

    /// Usage above 90 % all along: 80 % fired at 0 h, 90 % at 1 h. Re-armed level by level, 80 %
    /// came back alone at 24 h (an email naming 80 % though 90 % is crossed) and 90 % at 25 h
    /// (an "escalation", past min_interval): two emails an hour apart about nothing new.
    #[test]
    fn a_day_above_two_levels_is_told_once_and_names_the_highest() {
        let l = levels(&[80, 90], 1_000);
        let mut s = SubjectState::default();
        let i = Duration::from_secs(4 * 3600);
        assert_eq!(s.evaluate(&l, &at(850, 0), i), email("80%"));
        assert_eq!(s.evaluate(&l, &at(950, HOUR_MS), i), email("90%"));
        let mut emails = Vec::new();
        for now in [24 * HOUR_MS, 24 * HOUR_MS + 1, 25 * HOUR_MS, 26 * HOUR_MS] {
            if let Decision::Email(level) = s.evaluate(&l, &at(950, now), i) {
                emails.push((now / HOUR_MS, level.key));
            }
        }
        assert!(
            emails.len() <= 1 && emails.iter().all(|(_, key)| key == "90%"),
            "emails (hour, level) while usage stayed at 95 %: {emails:?}"
        );
    }

    #[test]
    fn the_proxys_own_count_does_not_re_arm_a_reported_crossing() {
        let l = levels(&[80], 1_000);
        let mut s = SubjectState::default();
        let i = Duration::ZERO;
        assert_eq!(s.evaluate(&l, &at(850, 1), i), email("80%"));
        // Restart: no report yet, the estimate is the proxy's own 40 calls.
        let own = Reading {
            reported: false,
            ..at(40, 2)
        };
        assert_eq!(s.evaluate(&l, &own, i), Decision::Nothing);
        // Salesforce reports again: still above, no second email.
        assert_eq!(s.evaluate(&l, &at(860, 3), i), Decision::Nothing);
        assert!(s.fired.contains_key("80%"));
    }

    #[test]
    fn removed_levels_forget_their_state_and_new_ones_fire() {
        let mut s = SubjectState::default();
        let i = Duration::ZERO;
        assert_eq!(
            s.evaluate(&levels(&[80], 1_000), &at(850, 1), i),
            email("80%")
        );
        // The admin lowers the threshold to 50 %: usage is above it, so that is news.
        assert_eq!(
            s.evaluate(&levels(&[50], 1_000), &at(850, 2), i),
            Decision::Email(Level {
                key: "50%".into(),
                calls: 500
            })
        );
        assert_eq!(s.fired.keys().collect::<Vec<_>>(), ["50%"]);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = SubjectState::default();
        s.evaluate(&levels(&[80], 1_000), &at(850, 7), Duration::ZERO);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<SubjectState>(&json).unwrap(), s);
        assert_eq!(
            serde_json::from_str::<SubjectState>("{}").unwrap(),
            SubjectState::default()
        );
    }
}
