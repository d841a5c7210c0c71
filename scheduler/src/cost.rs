//! Cost summaries: the cost stream's entries summed by tenant, model, day (or
//! task). `GET /v1/cost` computes them (`api::cost`), `shoal cost` prints
//! them; both use the types here. Money is summed in integer micro-dollars;
//! `cost_usd` is the same amount as a decimal string with 6 places.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use shoal_shared::store::CostRecord;

/// The grouping used when a request names none.
pub const DEFAULT_BY: &str = "tenant,model,day";

/// What a summary can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKey {
    Tenant,
    Model,
    /// The UTC day the entry was recorded, `YYYY-MM-DD`.
    Day,
    Task,
}

impl GroupKey {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Model => "model",
            Self::Day => "day",
            Self::Task => "task",
        }
    }
}

/// `tenant,model,day`: the keys in order, each at most once; empty = no
/// grouping (only the total).
pub fn parse_by(text: &str) -> Result<Vec<GroupKey>, String> {
    let mut keys = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let key = match part {
            "tenant" => GroupKey::Tenant,
            "model" => GroupKey::Model,
            "day" => GroupKey::Day,
            "task" => GroupKey::Task,
            other => {
                return Err(format!(
                    "unknown grouping {other:?}: use tenant, model, day or task, comma-separated"
                ))
            }
        };
        if keys.contains(&key) {
            return Err(format!("{part:?} is named twice"));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// A point in time given as an RFC 3339 time, or as a duration before `now`:
/// a whole number followed by `s`, `m`, `h`, `d` or `w` (`90m`, `24h`, `7d`).
pub fn parse_time(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let delta = parse_duration(text).map_err(|_| {
        format!("{text:?} is neither a duration (a number and s, m, h, d or w: 24h, 7d) nor an RFC 3339 time")
    })?;
    now.checked_sub_signed(delta)
        .filter(|time| time.timestamp() >= 0)
        .ok_or_else(|| format!("{text:?} reaches back before 1970"))
}

/// A duration: a whole number followed by `s`, `m`, `h`, `d` or `w`
/// (`90s`, `5m`, `2h`, `7d`).
pub fn parse_duration(text: &str) -> Result<chrono::TimeDelta, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a duration (a number and s, m, h, d or w: 90s, 5m, 2h)");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0)
        .ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| bad())?;
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    number
        .checked_mul(seconds_per)
        .and_then(chrono::TimeDelta::try_seconds)
        .ok_or_else(|| format!("{text:?} is too long a duration"))
}

/// A time as the API prints it.
pub fn format_time(time: DateTime<Utc>) -> String {
    shoal_shared::task::format_time(time)
}

/// Micro-dollars as US dollars with 6 decimals (`1234567` -> `"1.234567"`).
pub fn usd(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// Sums over a set of cost entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Totals {
    /// LLM calls (cost entries).
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_microdollars: u64,
    /// `cost_microdollars` in US dollars, 6 decimals, as a string.
    pub cost_usd: String,
}

impl Totals {
    fn add(&mut self, record: &CostRecord) {
        let usage = &record.entry.usage;
        self.calls = self.calls.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(usage.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(usage.completion_tokens);
        self.cache_read_tokens = self
            .cache_read_tokens
            .saturating_add(usage.cache_read_tokens);
        self.cache_write_tokens = self
            .cache_write_tokens
            .saturating_add(usage.cache_write_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(usage.reasoning_tokens);
        self.cost_microdollars = self
            .cost_microdollars
            .saturating_add(record.entry.cost_micros);
    }

    fn finish(mut self) -> Self {
        self.cost_usd = usd(self.cost_microdollars);
        self
    }
}

/// One group's key (the fields it is grouped by) and sums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(flatten)]
    pub totals: Totals,
}

impl CostGroup {
    fn key(&self, key: GroupKey) -> &str {
        let value = match key {
            GroupKey::Tenant => &self.tenant,
            GroupKey::Model => &self.model,
            GroupKey::Day => &self.day,
            GroupKey::Task => &self.task,
        };
        value.as_deref().unwrap_or("")
    }
}

/// What `GET /v1/cost` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CostSummary {
    /// The range summed: entries recorded at or after `since` (absent: the
    /// oldest entry kept) and before `until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    pub until: String,
    /// The grouping keys, in order.
    pub by: Vec<String>,
    /// Filters applied (a token's tenant is always applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// When the oldest entry still on the cost stream was recorded: the
    /// stream is capped, so nothing before this can be summed. Absent when
    /// the stream is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_since: Option<String>,
    /// Sorted by the grouping keys in order.
    pub groups: Vec<CostGroup>,
    pub total: Totals,
    /// The tenant's spend budgets (ADR 0038), when the summary is of one
    /// tenant that has any: a tenant token's, or the one an admin named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetLeft>,
}

/// One spend budget of a tenant: its UTC day's or month's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BudgetLeft {
    /// `day` or `month` (UTC).
    pub period: String,
    pub limit_microdollars: u64,
    pub spent_microdollars: u64,
    /// The limit less the spend, clipped at zero.
    pub left_microdollars: u64,
    /// The same three as decimal strings with 6 places.
    pub limit_usd: String,
    pub spent_usd: String,
    pub left_usd: String,
    /// When the period ends and the spend counts from zero again.
    pub resets_at: String,
}

impl BudgetLeft {
    pub fn of(line: &shoal_shared::store::spend::BudgetLine) -> Self {
        let left = line.left().0;
        Self {
            period: match line.period {
                shoal_shared::store::spend::Period::Day => "day",
                shoal_shared::store::spend::Period::Month => "month",
            }
            .to_owned(),
            limit_microdollars: line.limit.0,
            spent_microdollars: line.spent.0,
            left_microdollars: left,
            limit_usd: usd(line.limit.0),
            spent_usd: usd(line.spent.0),
            left_usd: usd(left),
            resets_at: format_time(line.resets_at),
        }
    }
}

/// Filters a summary applies to each entry.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub tenant: Option<String>,
    pub model: Option<String>,
    pub task: Option<String>,
}

impl Filter {
    fn admits(&self, record: &CostRecord) -> bool {
        let entry = &record.entry;
        self.tenant.as_ref().is_none_or(|t| *t == entry.tenant)
            && self.model.as_ref().is_none_or(|m| *m == entry.model)
            && self
                .task
                .as_ref()
                .is_none_or(|t| *t == entry.task_id.to_string())
    }
}

/// Sums entries into groups as they are read.
pub struct Summer {
    by: Vec<GroupKey>,
    filter: Filter,
    groups: BTreeMap<Vec<String>, Totals>,
    total: Totals,
}

impl Summer {
    pub fn new(by: Vec<GroupKey>, filter: Filter) -> Self {
        Self {
            by,
            filter,
            groups: BTreeMap::new(),
            total: Totals::default(),
        }
    }

    /// Adds `record` if the filter admits it.
    pub fn add(&mut self, record: &CostRecord) {
        if !self.filter.admits(record) {
            return;
        }
        self.total.add(record);
        if self.by.is_empty() {
            return;
        }
        let key = self
            .by
            .iter()
            .map(|key| match key {
                GroupKey::Tenant => record.entry.tenant.clone(),
                GroupKey::Model => record.entry.model.clone(),
                GroupKey::Day => day_of(record.recorded_ms),
                GroupKey::Task => record.entry.task_id.to_string(),
            })
            .collect();
        self.groups.entry(key).or_default().add(record);
    }

    pub fn finish(
        self,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
        retained_since: Option<DateTime<Utc>>,
    ) -> CostSummary {
        let by = self.by;
        let groups = self
            .groups
            .into_iter()
            .map(|(values, totals)| {
                let mut group = CostGroup {
                    tenant: None,
                    model: None,
                    day: None,
                    task: None,
                    totals: totals.finish(),
                };
                for (key, value) in by.iter().zip(values) {
                    let slot = match key {
                        GroupKey::Tenant => &mut group.tenant,
                        GroupKey::Model => &mut group.model,
                        GroupKey::Day => &mut group.day,
                        GroupKey::Task => &mut group.task,
                    };
                    *slot = Some(value);
                }
                group
            })
            .collect();
        CostSummary {
            since: since.map(format_time),
            until: format_time(until),
            by: by.iter().map(|k| k.as_str().to_owned()).collect(),
            tenant: self.filter.tenant,
            model: self.filter.model,
            task: self.filter.task,
            retained_since: retained_since.map(format_time),
            groups,
            total: self.total.finish(),
            budgets: Vec::new(),
        }
    }
}

/// The UTC day of a millisecond timestamp, `YYYY-MM-DD`.
fn day_of(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    Utc.timestamp_millis_opt(ms).single().map_or_else(
        || "invalid".to_owned(),
        |t| t.format("%Y-%m-%d").to_string(),
    )
}

/// The summary as an aligned text table with a total line.
pub fn render_table(summary: &CostSummary) -> String {
    let keys: Vec<GroupKey> = summary
        .by
        .iter()
        .filter_map(|k| parse_by(k).ok().and_then(|v| v.first().copied()))
        .collect();
    let mut header: Vec<String> = keys.iter().map(|k| k.as_str().to_uppercase()).collect();
    header.extend(
        [
            "CALLS",
            "PROMPT",
            "COMPLETION",
            "CACHE_READ",
            "CACHE_WRITE",
            "COST_USD",
        ]
        .map(str::to_owned),
    );
    let numbers = |t: &Totals| {
        vec![
            t.calls.to_string(),
            t.prompt_tokens.to_string(),
            t.completion_tokens.to_string(),
            t.cache_read_tokens.to_string(),
            t.cache_write_tokens.to_string(),
            t.cost_usd.clone(),
        ]
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    for group in &summary.groups {
        let mut row: Vec<String> = keys.iter().map(|&k| group.key(k).to_owned()).collect();
        row.extend(numbers(&group.totals));
        rows.push(row);
    }
    let mut total: Vec<String> = keys.iter().map(|_| String::new()).collect();
    if let Some(first) = total.first_mut() {
        *first = "TOTAL".to_owned();
    }
    total.extend(numbers(&summary.total));
    if !keys.is_empty() {
        rows.push(total.clone());
    }
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in rows.iter().chain(std::iter::once(&total)) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, row: &[String]| {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, &width))| {
                if i < keys.len() {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cost from {} until {}{}",
        summary.since.as_deref().unwrap_or("the oldest entry kept"),
        summary.until,
        summary
            .retained_since
            .as_deref()
            .map(|t| format!(" (entries kept since {t})"))
            .unwrap_or_default()
    );
    if let (Some(since), Some(kept)) = (&summary.since, &summary.retained_since) {
        // Both are `format_time` output: the text order is the time order.
        if since < kept {
            let _ = writeln!(
                out,
                "note: the cost stream keeps entries since {kept} (it is capped at redis.firehose_maxlen); any recorded before are not counted"
            );
        }
    }
    line(&mut out, &header);
    if keys.is_empty() {
        line(&mut out, &numbers(&summary.total));
    } else {
        for row in &rows {
            line(&mut out, row);
        }
    }
    for budget in &summary.budgets {
        let _ = writeln!(
            out,
            "budget {}: {} of {} USD spent, {} left (resets {})",
            budget.period, budget.spent_usd, budget.limit_usd, budget.left_usd, budget.resets_at
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_has_six_decimals() {
        assert_eq!(usd(0), "0.000000");
        assert_eq!(usd(1), "0.000001");
        assert_eq!(usd(1_234_567), "1.234567");
        assert_eq!(usd(42_000_000), "42.000000");
    }

    #[test]
    fn times_are_durations_or_rfc3339() {
        let now = DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |text: &str| parse_time(text, now).map(format_time);
        assert_eq!(at("24h").unwrap(), "2026-12-02T12:00:00.000Z");
        assert_eq!(at("7d").unwrap(), "2026-11-26T12:00:00.000Z");
        assert_eq!(at("90m").unwrap(), "2026-12-03T10:30:00.000Z");
        assert_eq!(at("1w").unwrap(), "2026-11-26T12:00:00.000Z");
        assert_eq!(
            at("2026-12-01T00:00:00+01:00").unwrap(),
            "2026-11-30T23:00:00.000Z"
        );
        for bad in ["", "h", "24", "24y", "-1h", "+1h", "1.5h", "yesterday"] {
            assert!(at(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(at("99999999999w").is_err());
    }

    #[test]
    fn the_table_aligns_groups_and_ends_with_the_total() {
        let totals = |calls, micros| Totals {
            calls,
            prompt_tokens: 10 * calls,
            cost_microdollars: micros,
            cost_usd: usd(micros),
            ..Totals::default()
        };
        let group = |tenant: &str, micros| CostGroup {
            tenant: Some(tenant.to_owned()),
            model: None,
            day: None,
            task: None,
            totals: totals(1, micros),
        };
        let summary = CostSummary {
            since: Some("2026-12-01T00:00:00.000Z".into()),
            until: "2026-12-03T00:00:00.000Z".into(),
            by: vec!["tenant".into()],
            tenant: None,
            model: None,
            task: None,
            retained_since: Some("2026-12-02T00:00:00.000Z".into()),
            groups: vec![group("acme", 1_500_000), group("a-longer-name", 7)],
            total: totals(2, 1_500_007),
            budgets: Vec::new(),
        };
        let table = render_table(&summary);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("note: the cost stream keeps entries since 2026-12-02"));
        assert_eq!(
            &lines[2..],
            [
                "TENANT         CALLS  PROMPT  COMPLETION  CACHE_READ  CACHE_WRITE  COST_USD",
                "acme               1      10           0           0            0  1.500000",
                "a-longer-name      1      10           0           0            0  0.000007",
                "TOTAL              2      20           0           0            0  1.500007",
            ]
        );
    }

    #[test]
    fn groupings_parse_in_order_once_each() {
        assert_eq!(
            parse_by("day, tenant").unwrap(),
            [GroupKey::Day, GroupKey::Tenant]
        );
        assert!(parse_by("").unwrap().is_empty());
        assert!(parse_by("tenant,tenant").is_err());
        assert!(parse_by("region").unwrap_err().contains("region"));
    }
}
