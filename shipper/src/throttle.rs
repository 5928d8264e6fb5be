//! The shipper's bandwidth limit: one pace for every volume of the process, in bytes on the
//! wire per second, from `--bandwidth-limit` or from a time-of-day schedule in the config
//! file (`[[shipper.bandwidth_schedule]]`, local time, first matching window wins).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{NaiveTime, Timelike};

/// Parses a rate such as `50MiB/s`, `10M` or `unlimited` (`None`). Units are binary:
/// `K`, `M`, `G` (with or without `iB`, `B` and `/s`).
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") || t == "0" {
        return Ok(None);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    let n = redun_tracker::track::parse_size(t)
        .map_err(|_| format!("rate {s:?}: expected e.g. 50MiB/s, 800K/s or unlimited"))?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(n))
}

/// A daily window `HH:MM-HH:MM` (it may wrap past midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    from: u32,
    to: u32,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        let err = || format!("window {s:?}: expected HH:MM-HH:MM, e.g. 08:00-18:00");
        let (a, b) = s.split_once('-').ok_or_else(err)?;
        let t = |x: &str| {
            NaiveTime::parse_from_str(x.trim(), "%H:%M")
                .map(|t| t.num_seconds_from_midnight())
                .map_err(|_| err())
        };
        Ok(Window {
            from: t(a)?,
            to: t(b)?,
        })
    }

    /// True when `secs` (seconds since local midnight) falls in the window.
    pub fn contains(&self, secs: u32) -> bool {
        if self.from <= self.to {
            (self.from..self.to).contains(&secs)
        } else {
            secs >= self.from || secs < self.to
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |s: u32| format!("{:02}:{:02}", s / 3600, s % 3600 / 60);
        write!(f, "{}-{}", hm(self.from), hm(self.to))
    }
}

/// The limit by time of day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Outside every window (`None`: unlimited).
    pub default: Option<u64>,
    pub windows: Vec<(Window, Option<u64>)>,
}

impl Schedule {
    pub fn limit_at(&self, secs: u32) -> Option<u64> {
        self.windows
            .iter()
            .find(|(w, _)| w.contains(secs))
            .map_or(self.default, |&(_, l)| l)
    }

    pub fn limit_now(&self) -> Option<u64> {
        self.limit_at(chrono::Local::now().num_seconds_from_midnight())
    }
}

/// Paces sends so that, over time, at most the current limit goes out per second.
#[derive(Debug)]
pub struct Throttle {
    schedule: Schedule,
    /// When the next send may start.
    next: Mutex<Option<Instant>>,
}

/// At most this much sending may be saved up while idle.
const BURST: Duration = Duration::from_millis(200);

impl Throttle {
    pub fn new(schedule: Schedule) -> Throttle {
        Throttle {
            schedule,
            next: Mutex::new(None),
        }
    }

    /// The limit in force now, in bytes per second.
    pub fn limit(&self) -> Option<u64> {
        self.schedule.limit_now()
    }

    /// Waits until `bytes` may be sent (or `stop`). Returns false when stopped.
    pub fn take(&self, bytes: u64, stop: &AtomicBool) -> bool {
        let Some(rate) = self.limit() else {
            *self.next.lock().unwrap() = None;
            return true;
        };
        let start = {
            let mut next = self.next.lock().unwrap();
            let now = Instant::now();
            let earliest = now.checked_sub(BURST).unwrap_or(now);
            let start = next.map_or(now, |n| n.max(earliest));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
            start
        };
        while let Some(left) = start.checked_duration_since(Instant::now()) {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_windows_parse() {
        assert_eq!(parse_rate("50MiB/s"), Ok(Some(50 << 20)));
        assert_eq!(parse_rate("800K/s"), Ok(Some(800 << 10)));
        assert_eq!(parse_rate("2M"), Ok(Some(2 << 20)));
        assert_eq!(parse_rate("unlimited"), Ok(None));
        assert!(parse_rate("fast").is_err());
        let w = Window::parse("22:00-06:00").unwrap();
        assert!(w.contains(23 * 3600) && w.contains(3600) && !w.contains(12 * 3600));
        let d = Window::parse("08:00-18:00").unwrap();
        assert!(d.contains(8 * 3600) && !d.contains(18 * 3600));
        assert!(Window::parse("8-18").is_err());
        let s = Schedule {
            default: Some(100),
            windows: vec![(d, Some(10)), (w, None)],
        };
        assert_eq!(s.limit_at(9 * 3600), Some(10));
        assert_eq!(s.limit_at(23 * 3600), None);
        assert_eq!(s.limit_at(20 * 3600), Some(100));
    }

    #[test]
    fn the_pace_holds_the_rate() {
        let t = Throttle::new(Schedule {
            default: Some(10 << 20),
            windows: vec![],
        });
        let stop = AtomicBool::new(false);
        let t0 = Instant::now();
        for _ in 0..6 {
            assert!(t.take(1 << 20, &stop));
        }
        // 6 MiB at 10 MiB/s: the last send may start after 0.5 s (less the burst allowance).
        assert!(
            t0.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t0.elapsed()
        );
    }
}
