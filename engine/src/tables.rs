//! Reference tables: read-only data a pipeline declares for its scripts'
//! lookups (product catalogue, region codes, partner tiers, …).
//!
//! A table is declared under `tables:` in the pipeline file, either inline
//! (`rows:` a mapping key → value) or as a file under `PIPELINES_DIR`: a CSV
//! file with a header row (the key column is `key:` or the first column; cells
//! are strings unless `columns:` gives a type), or a YAML/JSON file holding a
//! mapping key → value. Tables are parsed and converted to Rhai values once,
//! when the pipeline loads (the loader reads the files and hands their text
//! over as [`TableFile`]); their files are part of the pipeline's version, so
//! editing one is a reload like any other. Scripts call `lookup(table, key)`,
//! `lookup(table, key, default)` and `has_row(table, key)` (see
//! [`crate::script`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rhai::{Dynamic, Map};
use serde_json::Value;

use crate::model::{ColumnType, TableSpec};
use crate::script::convert::json_to_dynamic;

/// Largest table file read, in bytes.
pub const MAX_TABLE_BYTES: u64 = 64 * 1024 * 1024;
/// Most rows in one table.
pub const MAX_TABLE_ROWS: usize = 1_000_000;

/// One loaded table: rows by key, already in Rhai form.
#[derive(Debug, Default)]
pub struct Table {
    rows: HashMap<String, Dynamic>,
}

impl Table {
    pub fn get(&self, key: &str) -> Option<&Dynamic> {
        self.rows.get(key)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A pipeline's tables, by name.
#[derive(Debug, Default)]
pub struct Tables {
    tables: BTreeMap<String, Table>,
}

impl Tables {
    pub fn get(&self, name: &str) -> Option<&Table> {
        self.tables.get(name)
    }

    /// Names and row counts, sorted by name.
    pub fn summary(&self) -> impl Iterator<Item = (&str, usize)> {
        self.tables.iter().map(|(n, t)| (n.as_str(), t.len()))
    }

    pub fn names(&self) -> Vec<&str> {
        self.tables.keys().map(String::as_str).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub(crate) fn insert(&mut self, name: String, table: Table) {
        self.tables.insert(name, table);
    }
}

/// A table that failed to load. `file`/`line` point into the table's own file
/// when the fault is there; otherwise the loader reports the pipeline file.
#[derive(Debug)]
pub struct TableError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub message: String,
}

impl TableError {
    fn spec(message: impl Into<String>) -> Self {
        Self {
            file: None,
            line: None,
            message: message.into(),
        }
    }

    fn at(file: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            file: Some(file.to_path_buf()),
            line,
            message: message.into(),
        }
    }
}

/// A loaded table and, for a file table, the file's path relative to
/// `PIPELINES_DIR` and its text (for the version hash and the stored sources).
pub struct LoadedTable {
    pub table: Table,
    pub source: Option<(String, String)>,
}

/// A table file as the loader found it (the loader reads files, not this
/// module, so that a set can be built from files held in memory).
pub enum TableFile<'a> {
    /// The relative path would leave `PIPELINES_DIR`.
    Outside,
    /// The file could not be read; `error` is the I/O error's text.
    Unreadable { path: PathBuf, error: String },
    /// The file is larger than [`MAX_TABLE_BYTES`] and was not read.
    TooLarge { path: PathBuf, bytes: u64 },
    /// The file's text; `path` names it in errors.
    Text { path: PathBuf, text: &'a str },
}

/// Loads one declared table. `fetch` gives the file for a relative file name.
pub fn load_table<'a>(
    spec: &TableSpec,
    fetch: &dyn Fn(&str) -> TableFile<'a>,
) -> Result<LoadedTable, TableError> {
    match (&spec.file, &spec.rows) {
        (Some(_), Some(_)) => Err(TableError::spec("give either `file` or `rows`, not both")),
        (None, None) => Err(TableError::spec("a table needs `file` or `rows`")),
        (None, Some(rows)) => {
            if spec.key.is_some() || !spec.columns.is_empty() {
                return Err(TableError::spec("`key` and `columns` apply to CSV files only"));
            }
            let table = mapping_table(rows).map_err(TableError::spec)?;
            Ok(LoadedTable { table, source: None })
        }
        (Some(rel), None) => {
            let (path, text) = match fetch(rel) {
                TableFile::Outside => {
                    return Err(TableError::spec(format!(
                        "table file {rel:?} must be a relative path inside the pipelines directory"
                    )));
                }
                TableFile::Unreadable { path, error } => {
                    return Err(TableError::spec(format!(
                        "cannot read {}: {error}",
                        path.display()
                    )));
                }
                TableFile::TooLarge { path, bytes } => return Err(too_large(&path, bytes)),
                TableFile::Text { path, text } if text.len() as u64 > MAX_TABLE_BYTES => {
                    return Err(too_large(&path, text.len() as u64));
                }
                TableFile::Text { path, text } => (path, text),
            };
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            let table = match ext.as_str() {
                "csv" => csv_table(text, spec, &path)?,
                "yaml" | "yml" | "json" => {
                    if spec.key.is_some() || !spec.columns.is_empty() {
                        return Err(TableError::spec("`key` and `columns` apply to CSV files only"));
                    }
                    let rows: serde_yaml::Value = serde_yaml::from_str(text)
                        .map_err(|e| TableError::at(&path, e.location().map(|l| l.line()), e.to_string()))?;
                    mapping_table(&rows).map_err(|m| TableError::at(&path, None, m))?
                }
                _ => {
                    return Err(TableError::spec(format!(
                        "table file {rel:?} must end in .csv, .yaml, .yml or .json"
                    )));
                }
            };
            Ok(LoadedTable {
                table,
                source: Some((rel.clone(), text.to_owned())),
            })
        }
    }
}

fn too_large(path: &Path, bytes: u64) -> TableError {
    TableError::at(
        path,
        None,
        format!("table file is {bytes} bytes; the limit is {MAX_TABLE_BYTES}"),
    )
}

/// A YAML mapping key → value. Keys are strings or integers (integers are
/// looked up by their decimal form).
pub(crate) fn mapping_table(rows: &serde_yaml::Value) -> Result<Table, String> {
    let serde_yaml::Value::Mapping(mapping) = rows else {
        return Err("table rows must be a mapping of key → value".into());
    };
    if mapping.len() > MAX_TABLE_ROWS {
        return Err(format!("a table holds at most {MAX_TABLE_ROWS} rows"));
    }
    let mut table = Table::default();
    for (key, value) in mapping {
        let key = match key {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            other => return Err(format!("table keys must be strings or integers, got {other:?}")),
        };
        let json: Value =
            serde_json::to_value(value).map_err(|e| format!("row {key:?} has no JSON form: {e}"))?;
        let row = json_to_dynamic(&json, 0).map_err(|e| format!("row {key:?}: {e}"))?;
        table.rows.insert(key, row);
    }
    Ok(table)
}

fn csv_table(text: &str, spec: &TableSpec, path: &Path) -> Result<Table, TableError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| TableError::at(path, csv_line(&e), format!("bad header row: {e}")))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    if headers.is_empty() || headers.iter().all(String::is_empty) {
        return Err(TableError::at(
            path,
            Some(1),
            "the first row must name the columns",
        ));
    }
    for (i, h) in headers.iter().enumerate() {
        if h.is_empty() {
            return Err(TableError::at(
                path,
                Some(1),
                format!("column {} has no name", i + 1),
            ));
        }
        if headers[..i].contains(h) {
            return Err(TableError::at(
                path,
                Some(1),
                format!("column {h:?} appears twice"),
            ));
        }
    }
    let key_index = match &spec.key {
        None => 0,
        Some(k) => headers.iter().position(|h| h == k).ok_or_else(|| {
            TableError::at(
                path,
                Some(1),
                format!("key column {k:?} is not in the header row"),
            )
        })?,
    };
    for name in spec.columns.keys() {
        if !headers.contains(name) {
            return Err(TableError::at(
                path,
                Some(1),
                format!("typed column {name:?} is not in the header row"),
            ));
        }
    }
    let types: Vec<ColumnType> = headers
        .iter()
        .map(|h| spec.columns.get(h).copied().unwrap_or_default())
        .collect();

    let mut table = Table::default();
    let mut first_seen: HashMap<String, u64> = HashMap::new();
    for record in reader.records() {
        let record = record.map_err(|e| TableError::at(path, csv_line(&e), e.to_string()))?;
        let line = record.position().map_or(0, csv::Position::line);
        if record.len() != headers.len() {
            return Err(TableError::at(
                path,
                Some(line as usize),
                format!("{} fields where the header has {}", record.len(), headers.len()),
            ));
        }
        let key = record.get(key_index).unwrap_or_default().to_owned();
        if key.is_empty() {
            return Err(TableError::at(path, Some(line as usize), "empty key"));
        }
        if let Some(first) = first_seen.insert(key.clone(), line) {
            return Err(TableError::at(
                path,
                Some(line as usize),
                format!("duplicate key {key:?} (first on line {first})"),
            ));
        }
        if table.rows.len() >= MAX_TABLE_ROWS {
            return Err(TableError::at(
                path,
                Some(line as usize),
                format!("a table holds at most {MAX_TABLE_ROWS} rows"),
            ));
        }
        let mut row = Map::new();
        for ((name, ty), cell) in headers.iter().zip(&types).zip(record.iter()) {
            let value = ty
                .parse(cell)
                .map_err(|m| TableError::at(path, Some(line as usize), format!("column {name:?}: {m}")))?;
            row.insert(name.as_str().into(), value);
        }
        table.rows.insert(key, Dynamic::from_map(row));
    }
    Ok(table)
}

fn csv_line(e: &csv::Error) -> Option<usize> {
    e.position().map(|p| p.line() as usize)
}

impl ColumnType {
    /// A CSV cell in this column's type. Empty cells of a typed column are unit
    /// (`()`, JSON null); empty `string` cells are `""`.
    fn parse(self, cell: &str) -> Result<Dynamic, String> {
        let trimmed = cell.trim();
        if trimmed.is_empty() && self != ColumnType::String {
            return Ok(Dynamic::UNIT);
        }
        match self {
            ColumnType::String => Ok(cell.into()),
            ColumnType::Int => trimmed
                .parse::<rhai::INT>()
                .map(Dynamic::from_int)
                .map_err(|_| format!("{cell:?} is not an integer")),
            ColumnType::Float => match trimmed.parse::<rhai::FLOAT>() {
                Ok(f) if f.is_finite() => Ok(Dynamic::from_float(f)),
                _ => Err(format!("{cell:?} is not a finite number")),
            },
            ColumnType::Bool => match trimmed.to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" => Ok(Dynamic::TRUE),
                "false" | "no" | "0" => Ok(Dynamic::FALSE),
                _ => Err(format!("{cell:?} is not a boolean (true/false, yes/no, 1/0)")),
            },
        }
    }
}

/// Table names a script names literally in `lookup("…"` / `has_row("…"`
/// calls, with the 1-based line of each, so the loader can report a table
/// that is not declared before any event runs.
pub fn literal_table_names(source: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (line_no, line) in source.lines().enumerate() {
        // Text after `//` is not looked at (a comment, or rarely a string:
        // then the check is left to run time, never a false error).
        let line = line.split("//").next().unwrap_or_default();
        for func in ["lookup", "has_row"] {
            let mut rest = line;
            while let Some(at) = rest.find(func) {
                let before_ok = rest[..at]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
                rest = &rest[at + func.len()..];
                let Some(args) = rest.trim_start().strip_prefix('(') else {
                    continue;
                };
                let Some(quoted) = args.trim_start().strip_prefix('"') else {
                    continue;
                };
                if !before_ok {
                    continue;
                }
                if let Some(end) = quoted.find('"') {
                    let name = &quoted[..end];
                    if !name.contains('\\') {
                        found.push((name.to_owned(), line_no + 1));
                    }
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_csv(key: Option<&str>, columns: &[(&str, ColumnType)]) -> TableSpec {
        TableSpec {
            file: Some("t.csv".into()),
            key: key.map(str::to_owned),
            columns: columns.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect(),
            rows: None,
        }
    }

    #[test]
    fn csv_rows_are_typed_and_keyed() {
        let spec = spec_csv(
            Some("sku"),
            &[
                ("preco", ColumnType::Float),
                ("estoque", ColumnType::Int),
                ("ativo", ColumnType::Bool),
            ],
        );
        let text = "nome,sku,preco,estoque,ativo,cep\n\
                    Caneta,P-1,2.5,10,yes,01310\n\
                    \"Lápis, HB\",P-2,1,,no,\n";
        let t = csv_table(text, &spec, Path::new("t.csv")).expect("loads");
        assert_eq!(t.len(), 2);
        let row = t.get("P-2").expect("row").clone().cast::<Map>();
        assert_eq!(row["nome"].clone().cast::<rhai::ImmutableString>(), "Lápis, HB");
        assert_eq!(row["preco"].as_float(), Ok(1.0));
        assert!(row["estoque"].is_unit());
        assert_eq!(row["ativo"].as_bool(), Ok(false));
        let row = t.get("P-1").expect("row").clone().cast::<Map>();
        // Untyped columns stay strings: leading zeros survive.
        assert_eq!(row["cep"].clone().cast::<rhai::ImmutableString>(), "01310");
        assert_eq!(row["estoque"].as_int(), Ok(10));
    }

    #[test]
    fn csv_faults_name_their_line() {
        let spec = spec_csv(None, &[("n", ColumnType::Int)]);
        let cases = [
            ("k,n\na,1\nb,x\n", 3, "not an integer"),
            ("k,n\na,1\na,2\n", 3, "duplicate key \"a\" (first on line 2)"),
            ("k,n\na,1\n,2\n", 3, "empty key"),
            ("k,n\na,1,3\n", 2, "fields"),
            ("k,k\na,1\n", 1, "appears twice"),
        ];
        for (text, line, message) in cases {
            let e = csv_table(text, &spec, Path::new("t.csv")).expect_err(text);
            assert_eq!(e.line, Some(line), "{text}: {e:?}");
            assert!(e.message.contains(message), "{text}: {e:?}");
        }
        let e = csv_table("a,b\n", &spec_csv(Some("c"), &[]), Path::new("t.csv")).expect_err("key");
        assert!(e.message.contains("key column \"c\""), "{e:?}");
    }

    #[test]
    fn mapping_keys_may_be_integers() {
        let rows: serde_yaml::Value = serde_yaml::from_str("10: {nome: dez}\nSP: São Paulo\n").expect("yaml");
        let t = mapping_table(&rows).expect("loads");
        assert!(t.get("10").is_some());
        assert_eq!(
            t.get("SP").expect("row").clone().cast::<rhai::ImmutableString>(),
            "São Paulo"
        );
        let bad: serde_yaml::Value = serde_yaml::from_str("[1, 2]").expect("yaml");
        assert!(mapping_table(&bad).is_err());
    }

    #[test]
    fn literal_names_are_found() {
        let src = "let p = lookup(\"produtos\", id);\nif has_row( \"regioes\" , x) {}\nmy_lookup(\"no\")\nlookup(name, 1)\n// lookup(\"old\", 1)\nx = 1; // has_row(\"old\", 2)";
        assert_eq!(
            literal_table_names(src),
            vec![("produtos".to_owned(), 1), ("regioes".to_owned(), 2)]
        );
    }
}
