//! Pure restart policy: how long to wait before the next attempt, and when to give up.

use crate::config::model::{Recovery, Strategy};

/// What to do about one failure of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the unit again after this many milliseconds (0: at once).
    RestartIn(u64),
    /// A restart strategy ran out of attempts.
    Exhausted,
    /// `fallback_to_safe_mode`: switch the system to safe mode.
    SafeMode,
    /// `notify_admin` (or recovery disabled): alert and leave the unit failed.
    NotifyAdmin,
}

/// Delay before restart number `attempt` (1-based) of a restart strategy.
///
/// `restart_with_backoff` waits `backoff_initial_ms * backoff_factor^(attempt-1)`, capped at
/// `backoff_max_ms`.
pub fn restart_delay(r: &Recovery, attempt: u32) -> u64 {
    match r.strategy {
        Strategy::Restart => 0,
        Strategy::RestartWithDelay => r.delay_ms,
        Strategy::RestartWithBackoff => {
            let exp = attempt.saturating_sub(1).min(64) as i32;
            let d = r.backoff_initial_ms as f64 * r.backoff_factor.max(1.0).powi(exp);
            if !d.is_finite() || d >= r.backoff_max_ms as f64 {
                r.backoff_max_ms
            } else {
                d as u64
            }
        }
        Strategy::FallbackToSafeMode | Strategy::NotifyAdmin => 0,
    }
}

/// Decide after failure number `attempt` (1-based, already counted) of a unit.
///
/// A restart strategy restarts a unit at most `max_attempts` times; the failure after that is
/// [`Decision::Exhausted`]. With `auto_recovery` off every failure notifies the admin.
pub fn decide(r: &Recovery, attempt: u32, auto_recovery: bool) -> Decision {
    if !auto_recovery {
        return Decision::NotifyAdmin;
    }
    match r.strategy {
        Strategy::FallbackToSafeMode => Decision::SafeMode,
        Strategy::NotifyAdmin => Decision::NotifyAdmin,
        Strategy::Restart | Strategy::RestartWithDelay | Strategy::RestartWithBackoff => {
            if attempt > r.max_attempts {
                Decision::Exhausted
            } else {
                Decision::RestartIn(restart_delay(r, attempt))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(strategy: Strategy) -> Recovery {
        Recovery {
            strategy,
            delay_ms: 1500,
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            backoff_factor: 2.0,
            max_attempts: 3,
            reset_after_ms: 10_000,
        }
    }

    #[test]
    fn backoff_doubles_and_caps_at_max() {
        let r = rec(Strategy::RestartWithBackoff);
        let seq: Vec<u64> = (1..=7).map(|a| restart_delay(&r, a)).collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1000, 1000, 1000]);
        // Absurd attempt numbers stay capped, never overflow.
        assert_eq!(restart_delay(&r, u32::MAX), 1000);
    }

    #[test]
    fn backoff_factor_below_one_is_treated_as_one() {
        let mut r = rec(Strategy::RestartWithBackoff);
        r.backoff_factor = 0.5;
        assert_eq!(restart_delay(&r, 5), 100);
    }

    #[test]
    fn restart_is_immediate_and_delay_is_fixed() {
        assert_eq!(restart_delay(&rec(Strategy::Restart), 2), 0);
        assert_eq!(restart_delay(&rec(Strategy::RestartWithDelay), 1), 1500);
        assert_eq!(restart_delay(&rec(Strategy::RestartWithDelay), 3), 1500);
    }

    #[test]
    fn restart_strategies_exhaust_after_max_attempts() {
        for s in [
            Strategy::Restart,
            Strategy::RestartWithDelay,
            Strategy::RestartWithBackoff,
        ] {
            let r = rec(s);
            for a in 1..=3 {
                assert!(
                    matches!(decide(&r, a, true), Decision::RestartIn(_)),
                    "{s:?} {a}"
                );
            }
            assert_eq!(decide(&r, 4, true), Decision::Exhausted);
        }
    }

    #[test]
    fn safe_mode_and_notify_act_on_first_failure() {
        assert_eq!(
            decide(&rec(Strategy::FallbackToSafeMode), 1, true),
            Decision::SafeMode
        );
        assert_eq!(
            decide(&rec(Strategy::NotifyAdmin), 1, true),
            Decision::NotifyAdmin
        );
        assert_eq!(
            decide(&rec(Strategy::Restart), 1, false),
            Decision::NotifyAdmin
        );
    }
}
