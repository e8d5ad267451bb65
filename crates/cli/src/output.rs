//! Tables for people, JSON for scripts.

use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints a table in the style of `az … --output table`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Unix seconds as RFC 3339 (UTC), or empty.
pub fn date(ts: Option<i64>) -> String {
    ts.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Key Vault-style booleans in tables ("True"/"False").
pub fn boolean(b: Option<bool>) -> String {
    match b {
        Some(true) => "True".into(),
        Some(false) => "False".into(),
        None => String::new(),
    }
}

/// Parses a time given as Unix seconds or RFC 3339.
pub fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(n) = text.parse::<i64>() {
        return Ok(n);
    }
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| {
            anyhow::anyhow!(
                "'{text}' is neither Unix seconds nor an RFC 3339 time such as 2030-01-01T00:00:00Z"
            )
        })
}
