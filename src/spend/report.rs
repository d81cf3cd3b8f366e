//! Totals from the spend log: the question ([`Query`]: since, until, an
//! optional client, grouped by client, team, model, upstream, endpoint
//! and/or day), the
//! answer ([`UsageReport`], serializable for `GET /admin/usage`), and its
//! renderings for `iris usage --since` (table, CSV, JSON).

use std::fmt::Write as _;
use std::str::FromStr;

use jiff::civil::{Date, Time};
use jiff::tz::Offset;
use jiff::{Span, Timestamp};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::{SpendError, SpendLog};
use crate::budget::money::Money;

/// What the totals can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    Client,
    /// The client's team (none: a client without one).
    Team,
    Model,
    Upstream,
    /// `chat` (see [`super::Record::endpoint`]).
    Endpoint,
    /// The UTC calendar day, `YYYY-MM-DD`.
    Day,
}

impl Dimension {
    pub const ALL: [Dimension; 6] = [
        Self::Client,
        Self::Team,
        Self::Model,
        Self::Upstream,
        Self::Endpoint,
        Self::Day,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Team => "team",
            Self::Model => "model",
            Self::Upstream => "upstream",
            Self::Endpoint => "endpoint",
            Self::Day => "day",
        }
    }
}

impl FromStr for Dimension {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s.trim())
            .ok_or_else(|| {
                format!("{s:?} is not one of client, team, model, upstream, endpoint, day")
            })
    }
}

/// Which records to total, and how to group them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Records at or after this Unix millisecond...
    pub since_ms: i64,
    /// ...and before this one (none: up to now).
    pub until_ms: Option<i64>,
    /// Only this client's records.
    pub client: Option<String>,
    pub by: Vec<Dimension>,
}

/// A query parameter that is not understood: `param` names it, for an
/// OpenAI-shaped 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct QueryError {
    pub param: &'static str,
    pub message: String,
}

impl Query {
    /// A query from its text form, as `iris usage` and `GET /admin/usage`
    /// take it: `since` (inclusive) and `until` (exclusive) are `YYYY-MM-DD`
    /// (the start of that UTC day), `YYYY-MM-DDTHH:MM:SSZ`, or `Nd` (the
    /// start of the UTC day N days ago): June is `since=2025-06-01&until=2025-07-01`.
    /// `by` is a comma-separated list of `client`, `team`, `model`,
    /// `upstream`, `endpoint`, `day`.
    pub fn parse(
        since: &str,
        until: Option<&str>,
        by: Option<&str>,
        now_ms: i64,
    ) -> Result<Self, QueryError> {
        let since_ms = parse_time(since, now_ms).map_err(|message| QueryError {
            param: "since",
            message,
        })?;
        let until_ms = until
            .filter(|u| !u.trim().is_empty())
            .map(|u| parse_time(u, now_ms))
            .transpose()
            .map_err(|message| QueryError {
                param: "until",
                message,
            })?;
        if let Some(until_ms) = until_ms
            && until_ms <= since_ms
        {
            return Err(QueryError {
                param: "until",
                message: "must be after since".into(),
            });
        }
        let mut dimensions = Vec::new();
        for part in by.unwrap_or("").split(',').filter(|p| !p.trim().is_empty()) {
            let dimension: Dimension = part.parse().map_err(|message| QueryError {
                param: "by",
                message,
            })?;
            if !dimensions.contains(&dimension) {
                dimensions.push(dimension);
            }
        }
        Ok(Self {
            since_ms,
            until_ms,
            client: None,
            by: dimensions,
        })
    }
}

/// Unix ms of a time as `Query::parse` takes it.
fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    let problem = || {
        format!(
            "{text:?} is not a date (YYYY-MM-DD), a UTC time (YYYY-MM-DDTHH:MM:SSZ) or a number of days ago (30d)"
        )
    };
    if let Some(days) = text.strip_suffix('d')
        && let Ok(days) = days.parse::<i64>()
    {
        // Out of the calendar's range (years -9999 to 9999): not a date.
        return days_ago(days, now_ms).ok_or_else(problem);
    }
    let (date, time) = match text.split_once(['T', ' ']) {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let day = parse_date(date)
        .and_then(start_of_day_ms)
        .ok_or_else(problem)?;
    let Some(time) = time else {
        return Ok(day);
    };
    let time = time.strip_suffix('Z').ok_or_else(problem)?;
    let mut parts = time.split(':').map(|p| p.parse::<i64>().ok());
    let (Some(Some(h)), Some(Some(m)), Some(Some(s)), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(problem());
    };
    if !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..61).contains(&s) {
        return Err(problem());
    }
    // Seconds past midnight, not a calendar step: a UTC day is 86 400 Unix
    // seconds, and a leap second written :60 is the next minute's :00.
    Ok(day + ((h * 60 + m) * 60 + s) * 1000)
}

/// `YYYY-MM-DD` (exactly that shape) as a date of the calendar.
fn parse_date(text: &str) -> Option<Date> {
    let mut parts = text.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    // Rejects 2025-02-30 and friends.
    Date::new(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?).ok()
}

/// Unix ms of 00:00 UTC on `date`.
fn start_of_day_ms(date: Date) -> Option<i64> {
    let start = Offset::UTC.to_timestamp(date.to_datetime(Time::midnight()));
    Some(start.ok()?.as_millisecond())
}

/// Unix ms of the start of the UTC day `days` days before the one of `now_ms`.
fn days_ago(days: i64, now_ms: i64) -> Option<i64> {
    let today = Offset::UTC
        .to_datetime(Timestamp::from_millisecond(now_ms).ok()?)
        .date();
    start_of_day_ms(today.checked_sub(Span::new().try_days(days).ok()?).ok()?)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix ms (the second it falls in).
pub fn format_time(ms: i64) -> String {
    Timestamp::from_millisecond(ms).map_or_else(
        // Only a record written with a wild clock is outside years -9999 to
        // 9999: say what it is rather than invent a date.
        |_| format!("{ms} ms after 1970-01-01T00:00:00Z"),
        |at| at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// The counts of one group of records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub requests: u64,
    /// Records with an error status or an error code (see [`super::Record::is_error`]).
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// The sum of the records' costs, summed in micro-units by the sink
    /// (serialized in currency units).
    pub cost: Money,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
        self.cost = self.cost.saturating_add(other.cost);
    }
}

/// One group as a sink answers it: its keys, in the query's `by` order
/// (`None`: the records had none, such as the model of a request refused
/// before it named a configured one), and its counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totals {
    pub keys: Vec<Option<String>>,
    pub counts: Counts,
}

/// The answer to a [`Query`], as `GET /admin/usage` serializes it:
///
/// ```json
/// {"since": "2025-06-01T00:00:00Z", "until": null, "by": ["client", "model"],
///  "currency": "USD",
///  "data": [{"client": "a", "model": "m", "requests": 3, "errors": 0,
///            "prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39,
///            "cost": 0.000126}],
///  "total": {"requests": 3, …}}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageReport {
    pub since: String,
    pub until: Option<String>,
    pub by: Vec<&'static str>,
    /// The unit of every `cost` (`[pricing] currency`).
    pub currency: String,
    /// One row per group, in key order (`data`, like every list the
    /// admin API answers).
    pub data: Vec<Row>,
    pub total: Counts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// (dimension, key) in the query's `by` order.
    pub keys: Vec<(&'static str, Option<String>)>,
    pub counts: Counts,
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.keys.len() + 6))?;
        for (name, key) in &self.keys {
            map.serialize_entry(name, key)?;
        }
        let c = &self.counts;
        map.serialize_entry("requests", &c.requests)?;
        map.serialize_entry("errors", &c.errors)?;
        map.serialize_entry("prompt_tokens", &c.prompt_tokens)?;
        map.serialize_entry("completion_tokens", &c.completion_tokens)?;
        map.serialize_entry("total_tokens", &c.total_tokens)?;
        map.serialize_entry("cost", &c.cost)?;
        map.end()
    }
}

impl UsageReport {
    /// The report of `totals`, its costs in `currency`.
    pub fn new(query: &Query, totals: Vec<Totals>, currency: &str) -> Self {
        let by: Vec<&'static str> = query.by.iter().map(|d| d.name()).collect();
        let mut total = Counts::default();
        let data = totals
            .into_iter()
            .filter(|t| t.counts.requests > 0)
            .map(|t| {
                total.add(&t.counts);
                Row {
                    keys: by.iter().copied().zip(t.keys).collect(),
                    counts: t.counts,
                }
            })
            .collect();
        Self {
            since: format_time(query.since_ms),
            until: query.until_ms.map(format_time),
            by,
            currency: currency.to_owned(),
            data,
            total,
        }
    }
}

/// The report for `query` from a running server's spend log: what the
/// admin API answers (`GET /admin/usage?since=&until=&by=`).
pub async fn usage(
    log: &SpendLog,
    query: &Query,
    currency: &str,
) -> Result<UsageReport, SpendError> {
    let totals = log.totals(query).await?;
    Ok(UsageReport::new(query, totals, currency))
}

/// How `iris usage --since` prints a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Csv,
    Json,
}

pub fn render(report: &UsageReport, format: Format) -> String {
    match format {
        Format::Json => {
            let mut out = serde_json::to_string_pretty(report).unwrap_or_default();
            out.push('\n');
            out
        }
        Format::Csv => {
            let mut out = String::new();
            for row in cells(report, false) {
                let line: Vec<String> = row.iter().map(|c| csv_field(c)).collect();
                out.push_str(&line.join(","));
                out.push('\n');
            }
            out
        }
        Format::Table => table(&cells(report, true)),
    }
}

/// The numbers of each line: the counts, then the cost.
const NUMBERS: usize = 6;

/// The header and one line per row (and, for a table, the total); costs
/// to the millionth, at least to the cent, the currency in the header.
fn cells(report: &UsageReport, with_total: bool) -> Vec<Vec<String>> {
    let mut header: Vec<String> = report.by.iter().map(|d| d.to_uppercase()).collect();
    header.extend(
        [
            "REQUESTS",
            "ERRORS",
            "PROMPT_TOKENS",
            "COMPLETION_TOKENS",
            "TOTAL_TOKENS",
        ]
        .map(String::from),
    );
    header.push(format!("COST ({})", report.currency));
    let numbers = |c: &Counts| {
        let mut line = [
            c.requests,
            c.errors,
            c.prompt_tokens,
            c.completion_tokens,
            c.total_tokens,
        ]
        .map(|n| n.to_string())
        .to_vec();
        line.push(c.cost.to_string());
        line
    };
    let mut lines = vec![header];
    if report.by.is_empty() {
        // Ungrouped: the one line is the total (zeros when nothing matched).
        lines.push(numbers(&report.total));
        return lines;
    }
    for row in &report.data {
        let mut line: Vec<String> = row
            .keys
            .iter()
            .map(|(_, key)| key.clone().unwrap_or_else(|| "-".into()))
            .collect();
        line.extend(numbers(&row.counts));
        lines.push(line);
    }
    if with_total {
        let mut line = vec![String::new(); report.by.len()];
        line[0] = "TOTAL".into();
        line.extend(numbers(&report.total));
        lines.push(line);
    }
    lines
}

fn table(lines: &[Vec<String>]) -> String {
    let columns = lines.first().map_or(0, Vec::len);
    let mut widths = vec![0; columns];
    for line in lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (i, (cell, width)) in line.iter().zip(&widths).enumerate() {
            // Keys left-aligned, numbers right-aligned.
            let number = i + NUMBERS >= columns;
            if number {
                let _ = write!(text, "{cell:>width$}  ");
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

fn csv_field(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000; // 2025-06-15T15:06:40Z

    #[test]
    fn times_parse_as_utc_days_instants_and_days_ago() {
        let day = |s| parse_time(s, NOW).unwrap();
        assert_eq!(format_time(day("2025-06-01")), "2025-06-01T00:00:00Z");
        assert_eq!(
            format_time(day("2025-06-01T12:30:05Z")),
            "2025-06-01T12:30:05Z"
        );
        assert_eq!(format_time(day("0d")), "2025-06-15T00:00:00Z");
        assert_eq!(format_time(day("7d")), "2025-06-08T00:00:00Z");
        for bad in [
            "2025-02-30",
            "2025-6-1",
            "yesterday",
            "2025-06-01T12:00",
            "-",
        ] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }
    }

    /// Report dates at the calendar's edges, against Unix times worked out
    /// apart from this code (GNU `date -u -d DATE +%s`).
    #[test]
    fn dates_at_month_ends_leap_days_and_year_ends() {
        const S: i64 = 1000;
        for (text, ms) in [
            ("2028-02-29", 1_835_395_200 * S),
            ("2028-02-29T23:59:59Z", 1_835_481_599 * S),
            ("2028-03-01", 1_835_481_600 * S),
            ("2027-12-31", 1_830_211_200 * S),
            ("2027-12-31 23:59:59Z", 1_830_297_599 * S),
            // A leap second as written is the next day's first second.
            ("2027-12-31T23:59:60Z", 1_830_297_600 * S),
            ("2028-01-01", 1_830_297_600 * S),
            ("0001-01-01", -62_135_596_800 * S),
            ("9999-12-30", 253_402_128_000 * S),
        ] {
            assert_eq!(parse_time(text, NOW), Ok(ms), "{text}");
        }
        for bad in [
            "2027-02-29",
            "2100-02-29",
            "2028-02-30",
            "2028-04-31",
            "2028-13-01",
            "2028-00-10",
            "2028-01-00",
        ] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }

        // N days ago counts whole UTC days back, across month and year ends.
        let march_1 = 1_835_481_600 * S;
        let ago = |text, now| format_time(parse_time(text, now).unwrap());
        assert_eq!(ago("1d", march_1), "2028-02-29T00:00:00Z");
        assert_eq!(ago("1d", march_1 + 86_400 * S - 1), "2028-02-29T00:00:00Z");
        assert_eq!(ago("0d", march_1 - 1), "2028-02-29T00:00:00Z");
        assert_eq!(ago("60d", march_1), "2028-01-01T00:00:00Z");
        assert_eq!(ago("61d", march_1), "2027-12-31T00:00:00Z");
        assert_eq!(ago("-1d", march_1), "2028-03-02T00:00:00Z");
        // Out of the calendar (years -9999 to 9999): refused, not overflowed.
        for bad in ["9223372036854775807d", "-9223372036854775808d", "5000000d"] {
            assert!(parse_time(bad, NOW).is_err(), "{bad}");
        }

        // Rendered as the second each instant falls in, before 1970 too.
        for (ms, text) in [
            (1_835_481_599_999, "2028-02-29T23:59:59Z"),
            (1_830_297_600_000, "2028-01-01T00:00:00Z"),
            (0, "1970-01-01T00:00:00Z"),
            (-1, "1969-12-31T23:59:59Z"),
            (-62_135_596_800_000, "0001-01-01T00:00:00Z"),
        ] {
            assert_eq!(format_time(ms), text, "{ms}");
        }
    }

    #[test]
    fn queries_name_the_parameter_they_refuse() {
        let q = Query::parse(
            "2025-06-01",
            Some("2025-07-01"),
            Some("client,day,client"),
            NOW,
        )
        .unwrap();
        assert_eq!(q.by, vec![Dimension::Client, Dimension::Day]);
        assert_eq!(q.until_ms.map(format_time).unwrap(), "2025-07-01T00:00:00Z");
        let error = |since, until, by| Query::parse(since, until, by, NOW).unwrap_err().param;
        assert_eq!(error("june", None, None), "since");
        assert_eq!(error("2025-06-01", Some("x"), None), "until");
        assert_eq!(error("2025-06-02", Some("2025-06-01"), None), "until");
        assert_eq!(error("2025-06-01", Some("2025-06-01"), None), "until");
        assert_eq!(error("2025-06-01", None, Some("client,tenant")), "by");
        let q = Query::parse("2025-06-01", None, Some("team,endpoint"), NOW).unwrap();
        assert_eq!(q.by, vec![Dimension::Team, Dimension::Endpoint]);
    }

    fn report() -> UsageReport {
        let query = Query::parse("2025-06-01", None, Some("client,model"), NOW).unwrap();
        let counts = |n: u64| Counts {
            requests: n,
            errors: 1,
            prompt_tokens: 10 * n,
            completion_tokens: n,
            total_tokens: 11 * n,
            cost: Money::from_micros(1_500_001 * n),
        };
        UsageReport::new(
            &query,
            vec![
                Totals {
                    keys: vec![Some("a".into()), Some("m, \"big\"".into())],
                    counts: counts(2),
                },
                Totals {
                    keys: vec![Some("b".into()), None],
                    counts: counts(1),
                },
            ],
            "USD",
        )
    }

    #[test]
    fn reports_render_as_table_csv_and_json() {
        let report = report();
        assert_eq!(report.total.requests, 3);
        assert_eq!(report.total.total_tokens, 33);
        let table = render(&report, Format::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("CLIENT  MODEL"), "{table}");
        assert!(lines[2].starts_with("b       -"), "{table}");
        assert!(lines[0].ends_with("TOTAL_TOKENS  COST (USD)"), "{table}");
        assert!(
            lines[3].starts_with("TOTAL") && lines[3].ends_with("33    4.500003"),
            "{table}"
        );

        let csv = render(&report, Format::Csv);
        assert_eq!(
            csv,
            "CLIENT,MODEL,REQUESTS,ERRORS,PROMPT_TOKENS,COMPLETION_TOKENS,TOTAL_TOKENS,COST (USD)\n\
             a,\"m, \"\"big\"\"\",2,1,20,2,22,3.000002\n\
             b,-,1,1,10,1,11,1.500001\n"
        );

        let json: serde_json::Value = serde_json::from_str(&render(&report, Format::Json)).unwrap();
        assert_eq!(json["since"], "2025-06-01T00:00:00Z");
        assert_eq!(json["by"], serde_json::json!(["client", "model"]));
        assert_eq!(json["data"][1]["model"], serde_json::Value::Null);
        assert_eq!(json["data"][0]["prompt_tokens"], 20);
        assert_eq!(json["total"]["requests"], 3);
        assert_eq!(json["currency"], "USD");
        assert_eq!(json["data"][0]["cost"], 3.000002);
        assert_eq!(json["total"]["cost"], 4.500003);
    }
}
