//! What `readings` prints: rows of named columns read from result documents, and the
//! three forms they print in (an aligned table, JSON, CSV).

use std::io::Write;

use bson::{Bson, Document};
use chrono::{DateTime, Utc};
use serde_json::Value;

use iot_core::payload::format_time;

use crate::OutputFormat;

/// Rows of named columns, printable in every [`OutputFormat`].
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Value>>,
    /// What an empty result says in a table.
    pub empty: String,
    /// Whether the answer is bad news (`gaps` found missing or duplicate readings).
    pub trouble: bool,
}

/// How a column is read from a result document.
#[derive(Debug, Clone, Copy)]
pub enum Field {
    /// The field as it is.
    Plain(&'static str),
    /// A number rounded to the two decimals of the readings.
    Rounded(&'static str),
    /// The raw payload of a flagged document (`raw` or `raw_base64`).
    Raw,
}

impl Rows {
    /// One row per document, one column per `(name, field)`.
    pub fn from_documents(
        columns: &[(&'static str, Field)],
        documents: &[Document],
        empty: String,
    ) -> Rows {
        let value = |document: &Document, field: &Field| match field {
            Field::Plain(name) => json(document.get(name)),
            Field::Rounded(name) => match document.get(name) {
                Some(Bson::Double(number)) => {
                    json(Some(&Bson::Double((number * 100.0).round() / 100.0)))
                }
                other => json(other),
            },
            Field::Raw => json(document.get("raw").or_else(|| document.get("raw_base64"))),
        };
        Rows {
            columns: columns.iter().map(|(name, _)| *name).collect(),
            rows: documents
                .iter()
                .map(|document| {
                    columns
                        .iter()
                        .map(|(_, field)| value(document, field))
                        .collect()
                })
                .collect(),
            empty,
            trouble: false,
        }
    }
}

/// A stored value as JSON: dates as RFC 3339 text, numbers as numbers, absent as null.
pub fn json(value: Option<&Bson>) -> Value {
    match value {
        None | Some(Bson::Null) => Value::Null,
        Some(Bson::DateTime(time)) => Value::String(format_time(time.to_chrono())),
        Some(Bson::Double(number)) => {
            serde_json::Number::from_f64(*number).map_or(Value::Null, Value::Number)
        }
        Some(Bson::Int32(number)) => Value::from(*number),
        Some(Bson::Int64(number)) => Value::from(*number),
        Some(Bson::String(text)) => date_text(text).unwrap_or_else(|| Value::String(text.clone())),
        Some(other) => Value::String(other.to_string()),
    }
}

/// Some MongoDB-compatible servers return dates as extended-JSON text
/// (`{"$date":"…"}`); read it as the date it names.
fn date_text(text: &str) -> Option<Value> {
    let inner = text.strip_prefix("{\"$date\":\"")?.strip_suffix("\"}")?;
    let time = DateTime::parse_from_rfc3339(inner).ok()?;
    Some(Value::String(format_time(time.with_timezone(&Utc))))
}

/// The widest cell of a table, in characters; longer text is cut and ends with `…`.
/// JSON and CSV carry every value whole.
pub const CELL_WIDTH: usize = 60;

/// Prints `rows` in `format`.
pub fn print(rows: &Rows, format: OutputFormat, out: &mut impl Write) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => {
            let objects: Vec<serde_json::Map<String, Value>> = rows
                .rows
                .iter()
                .map(|row| {
                    rows.columns
                        .iter()
                        .map(|c| c.to_string())
                        .zip(row.iter().cloned())
                        .collect()
                })
                .collect();
            serde_json::to_writer_pretty(&mut *out, &objects)?;
            writeln!(out)?;
        }
        OutputFormat::Csv => {
            let mut writer = csv::Writer::from_writer(&mut *out);
            writer.write_record(&rows.columns)?;
            for row in &rows.rows {
                writer.write_record(row.iter().map(cell))?;
            }
            writer.flush()?;
        }
        OutputFormat::Table if rows.rows.is_empty() => writeln!(out, "{}", rows.empty)?,
        OutputFormat::Table => writeln!(out, "{}", table(rows))?,
    }
    Ok(())
}

/// The aligned table: numbers to the right, cells cut at [`CELL_WIDTH`], no trailing
/// blanks.
fn table(rows: &Rows) -> String {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(&rows.columns);
    for row in &rows.rows {
        table.add_row(row.iter().map(|value| cut(cell(value))));
    }
    for (index, column) in table.column_iter_mut().enumerate() {
        if rows
            .rows
            .iter()
            .all(|row| row[index].is_number() || row[index].is_null())
        {
            column.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    table
        .to_string()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A value as a table or CSV cell: text without quotes, null as empty.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `text` on one line of at most [`CELL_WIDTH`] characters: control characters (a
/// stored raw payload may hold newlines) shown as spaces, the rest cut with `…`.
fn cut(text: String) -> String {
    let fits = text.chars().count() <= CELL_WIDTH;
    if fits && !text.contains(char::is_control) {
        return text;
    }
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(if fits { CELL_WIDTH } else { CELL_WIDTH - 1 })
        .collect();
    if !fits {
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Rows {
        Rows {
            columns: vec!["topic", "value"],
            rows: vec![
                vec![Value::from("/sensor/pressure"), Value::from(1001.5)],
                vec![Value::from("/sensor/temperature"), Value::Null],
            ],
            empty: "nothing".into(),
            trouble: false,
        }
    }

    fn printed(rows: &Rows, format: OutputFormat) -> String {
        let mut out = Vec::new();
        print(rows, format, &mut out).expect("prints");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn the_three_formats() {
        let table = printed(&sample(), OutputFormat::Table);
        assert!(
            table
                .lines()
                .next()
                .is_some_and(|header| header.contains("topic") && header.contains("value")),
            "{table}"
        );
        assert!(
            table.contains("/sensor/pressure") && table.contains("1001.5"),
            "{table}"
        );
        assert_eq!(
            printed(&sample(), OutputFormat::Csv),
            "topic,value\n/sensor/pressure,1001.5\n/sensor/temperature,\n"
        );
        let json: Value =
            serde_json::from_str(&printed(&sample(), OutputFormat::Json)).expect("json");
        assert_eq!(json[0]["value"], 1001.5);
        assert_eq!(json[1]["value"], Value::Null);
    }

    #[test]
    fn an_empty_result_says_so() {
        let empty = Rows {
            rows: vec![],
            ..sample()
        };
        assert_eq!(printed(&empty, OutputFormat::Table), "nothing\n");
        assert_eq!(printed(&empty, OutputFormat::Json).trim(), "[]");
        assert_eq!(printed(&empty, OutputFormat::Csv), "topic,value\n");
    }

    #[test]
    fn a_long_cell_is_cut_in_a_table_and_whole_elsewhere() {
        let long = "é".repeat(60_000);
        let rows = Rows {
            columns: vec!["device", "raw"],
            rows: vec![vec![Value::from(long.clone()), Value::from("a\nb")]],
            empty: String::new(),
            trouble: false,
        };
        let table = printed(&rows, OutputFormat::Table);
        assert_eq!(table.lines().count(), 2, "{table}");
        let widest = table.lines().map(|l| l.chars().count()).max();
        assert!(widest < Some(CELL_WIDTH + 10), "{widest:?}");
        assert!(table.contains(&format!("{}…", "é".repeat(CELL_WIDTH - 1))));
        assert!(table.contains("a b"), "{table}");
        let json: Value = serde_json::from_str(&printed(&rows, OutputFormat::Json)).expect("json");
        assert_eq!(json[0]["device"], Value::from(long.clone()));
        assert!(printed(&rows, OutputFormat::Csv).contains(&long));
    }

    #[test]
    fn extended_json_dates_are_read_as_dates() {
        assert_eq!(
            json(Some(&Bson::String(
                r#"{"$date":"2026-11-25T03:50:00Z"}"#.into()
            ))),
            Value::from("2026-11-25T03:50:00.000Z")
        );
    }
}
