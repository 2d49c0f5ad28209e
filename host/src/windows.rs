//! Where an aggregate's window starts: rolling windows count back from now, calendar windows
//! (hour, day, month, UTC) start at their period's beginning. Shared by the engine (SQL over
//! ingested rows) and the live snapshots (the ledger's unrefreshed spend), so both cut the same
//! window.

use llmscope_sdk::types::Window;

/// Start of `window` ending at `now_ms`, in µs, and the calendar period start when calendar.
pub fn window_start_us(window: Window, now_ms: u64) -> (i64, Option<i64>) {
    let now_us = i64::try_from(now_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    match window {
        Window::RollingSeconds(s) => (
            now_us.saturating_sub(
                i64::try_from(s)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1_000_000),
            ),
            None,
        ),
        cal => {
            let start = calendar_start_us(cal, now_ms);
            (start, Some(start))
        }
    }
}

/// The calendar period (hour, day, month, UTC) of `window` holding `at_ms`, as `[start, end)`
/// in ms; `None` for a rolling window.
pub fn calendar_period_ms(window: Window, at_ms: u64) -> Option<(u64, u64)> {
    let start_of = |t: u64| u64::try_from(calendar_start_us(window, t) / 1000).unwrap_or(0);
    let start = start_of(at_ms);
    let end = match window {
        Window::RollingSeconds(_) => return None,
        Window::CalendarHour => start + 3_600_000,
        Window::CalendarDay => start + 86_400_000,
        // 32 days on is always in the next month; its first day ends this one.
        Window::CalendarMonth => start_of(start + 32 * 86_400_000),
    };
    Some((start, end))
}

/// Start of the calendar period of `window` holding `now_ms`, in µs (UTC).
pub fn calendar_start_us(window: Window, now_ms: u64) -> i64 {
    let now = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let date = now.date();
    let start = match window {
        Window::CalendarHour => date.with_hms(now.hour(), 0, 0),
        Window::CalendarDay => date.with_hms(0, 0, 0),
        Window::CalendarMonth => date.replace_day(1).and_then(|d| d.with_hms(0, 0, 0)),
        Window::RollingSeconds(_) => date.with_hms(0, 0, 0),
    };
    start.map_or(0, |s| (s.assume_utc().unix_timestamp_nanos() / 1000) as i64)
}
