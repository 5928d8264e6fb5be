//! Which recovery points are kept (docs/CONFIG.md, `[retention]`): the policy the target
//! applies to its replica stores and the shipper to the volumes it writes into a bucket.

use std::collections::BTreeMap;
use std::path::Path;

use redun_tracker::config::{ConfigError, parse_duration};
use redun_tracker::journal::format::PointKind;
use serde::Deserialize;

use crate::segment::Point;

/// Retention: every point younger than `keep_all_ms`, then one point per `every_ms` for
/// each tier's span; the newest point is always kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub keep_all_ms: u64,
    pub tiers: Vec<Tier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub every_ms: u64,
    /// Points up to this age fall in the tier.
    pub for_ms: u64,
}

impl Default for Retention {
    /// Every point for 2 h, then one per 10 min for 24 h, then one per day for 7 days.
    fn default() -> Retention {
        const MIN: u64 = 60 * 1000;
        Retention {
            keep_all_ms: 120 * MIN,
            tiers: vec![
                Tier {
                    every_ms: 10 * MIN,
                    for_ms: 24 * 60 * MIN,
                },
                Tier {
                    every_ms: 24 * 60 * MIN,
                    for_ms: 7 * 24 * 60 * MIN,
                },
            ],
        }
    }
}

impl Retention {
    /// The points to keep, oldest first. Within a tier the first point of each `every`
    /// interval (by wall clock) stays; an app-consistent point is preferred to a crash one
    /// in the same interval.
    pub fn keep(&self, points: &[Point], now_ms: u64) -> Vec<Point> {
        let mut keep = Vec::new();
        let mut buckets: BTreeMap<(usize, u64), Point> = BTreeMap::new();
        for (i, p) in points.iter().enumerate() {
            let age = now_ms.saturating_sub(p.unix_ms);
            if age <= self.keep_all_ms || i + 1 == points.len() {
                keep.push(*p);
                continue;
            }
            let Some(t) = self.tiers.iter().position(|t| age <= t.for_ms) else {
                continue;
            };
            let bucket = p.unix_ms / self.tiers[t].every_ms.max(1);
            let e = buckets.entry((t, bucket)).or_insert(*p);
            if e.kind != PointKind::App && p.kind == PointKind::App {
                *e = *p;
            }
        }
        keep.extend(buckets.into_values());
        keep.sort_by_key(|p| p.id);
        keep.dedup_by_key(|p| p.id);
        keep
    }
}

/// `[retention]`: which recovery points are kept.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Every point younger than this stays [default: 2h].
    pub keep_all: Option<String>,
    /// Then one point per `every` for points up to `for` old, e.g.
    /// `tiers = [{ every = "10m", for = "24h" }, { every = "1d", for = "7d" }]`.
    /// Absent: the default tiers; `[]`: none.
    pub tiers: Option<Vec<TierEntry>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierEntry {
    pub every: String,
    #[serde(rename = "for")]
    pub span: String,
}

impl RetentionSection {
    /// The policy, or an error naming the key and the value.
    pub fn policy(&self, path: &Path) -> Result<Retention, ConfigError> {
        let bad = |key: String, v: &str, e: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message: format!("{key} = {v:?}: {e}"),
        };
        let mut r = Retention::default();
        if let Some(k) = &self.keep_all {
            r.keep_all_ms =
                parse_duration(k).map_err(|e| bad("retention.keep_all".into(), k, e))?;
        }
        let Some(tiers) = &self.tiers else {
            return Ok(r);
        };
        r.tiers.clear();
        for (i, t) in tiers.iter().enumerate() {
            let every = parse_duration(&t.every)
                .map_err(|e| bad(format!("retention.tiers[{i}].every"), &t.every, e))?;
            let for_ms = parse_duration(&t.span)
                .map_err(|e| bad(format!("retention.tiers[{i}].for"), &t.span, e))?;
            if every == 0 {
                return Err(bad(
                    format!("retention.tiers[{i}].every"),
                    &t.every,
                    "must be longer than 0".into(),
                ));
            }
            r.tiers.push(Tier {
                every_ms: every,
                for_ms,
            });
        }
        Ok(r)
    }
}
