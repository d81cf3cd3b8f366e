//! The user reference in `docs/` checked against the code, so that neither
//! can change without the other:
//!
//! - every key of the config schema is in docs/configuration.md, with its
//!   type and (where the page gives one as a TOML value) its default, and
//!   every key the page documents exists;
//! - every metric the code records is in docs/metrics.md with its type and
//!   labels, and every metric named in the docs or the README exists;
//! - every error code the code answers with is in docs/errors.md (with its
//!   status, where the code names the two together), and every code listed
//!   there exists;
//! - every relative link in the repository's Markdown leads to a file (and a
//!   heading) in the repository.
//!
//! The config keys come from the schema itself, through a probing serde
//! deserializer; metrics and error codes from the source text of `src/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};

use super::schema::File as Config;

// ---------------------------------------------------------------------------
// The config schema, enumerated from the code.

/// Every key of `T`'s serde schema in the docs' notation (`server.listen`,
/// `upstreams[].name`), in schema order.
fn keys_of<T: DeserializeOwned>() -> Vec<String> {
    schema_of::<T>().into_iter().map(|(key, _)| key).collect()
}

/// Every key of `T`'s serde schema with the kind of its value: `string`,
/// `integer`, `boolean`, `number`, `array of strings`, …
///
/// `T` is deserialized from a [`Probe`], which answers every question serde's
/// derive asks: a struct gets each of its `fields` in turn (recursing into
/// nested structs), an option `Some`, a sequence one element (so arrays of
/// tables become `upstreams[].name`), a map one entry named `*`, an enum its
/// first variant, a scalar a plausible value.
fn schema_of<T: DeserializeOwned>() -> Vec<(String, String)> {
    let mut keys = Vec::new();
    if let Err(e) = T::deserialize(Probe {
        path: String::new(),
        keys: &mut keys,
    }) {
        panic!("the config schema could not be enumerated: {e}");
    }
    let mut seen = BTreeSet::new();
    keys.retain(|(key, _)| seen.insert(key.clone()));
    keys
}

struct Probe<'k> {
    /// Where this value sits; ends in `[]` for an element of a sequence.
    path: String,
    keys: &'k mut Vec<(String, String)>,
}

#[derive(Debug)]
struct ProbeError(String);

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

impl Probe<'_> {
    /// Records a key whose value is not a table, then lets `visit` answer.
    fn leaf<V>(
        self,
        kind: &str,
        visit: impl FnOnce() -> Result<V, ProbeError>,
    ) -> Result<V, ProbeError> {
        let (key, kind) = match self.path.strip_suffix("[]") {
            Some(array) => (array.to_owned(), format!("array of {kind}s")),
            None => (self.path.clone(), kind.to_owned()),
        };
        self.keys.push((key.clone(), kind));
        visit().map_err(|e| ProbeError(format!("{key}: {e}")))
    }
}

macro_rules! leaves {
    ($($method:ident => $kind:literal, $visit:ident($($value:expr)?);)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
            self.leaf($kind, || visitor.$visit($($value)?))
        })*
    };
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = ProbeError;

    // Scalars: recorded as leaves of their kind, answered with a plausible value.
    leaves! {
        deserialize_any => "value", visit_str("x");
        deserialize_bool => "boolean", visit_bool(false);
        deserialize_i8 => "integer", visit_i64(1);
        deserialize_i16 => "integer", visit_i64(1);
        deserialize_i32 => "integer", visit_i64(1);
        deserialize_i64 => "integer", visit_i64(1);
        deserialize_i128 => "integer", visit_i128(1);
        deserialize_u8 => "integer", visit_u64(1);
        deserialize_u16 => "integer", visit_u64(1);
        deserialize_u32 => "integer", visit_u64(1);
        deserialize_u64 => "integer", visit_u64(1);
        deserialize_u128 => "integer", visit_u128(1);
        deserialize_f32 => "number", visit_f64(1.0);
        deserialize_f64 => "number", visit_f64(1.0);
        deserialize_char => "string", visit_char('x');
        deserialize_str => "string", visit_str("x");
        deserialize_string => "string", visit_str("x");
        deserialize_bytes => "byte", visit_bytes(b"x");
        deserialize_byte_buf => "byte", visit_bytes(b"x");
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_some(self)
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.leaf("unit", || visitor.visit_unit())
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.leaf("unit", || visitor.visit_unit())
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        self.deserialize_tuple(1, visitor)
    }
    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        visitor.visit_seq(Elements {
            path: format!("{}[]", self.path),
            keys: self.keys,
            left: len,
        })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.deserialize_tuple(len, visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_map(Fields {
            path: self.path,
            keys: self.keys,
            names: &["*"],
            next: 0,
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        visitor.visit_map(Fields {
            path: self.path,
            keys: self.keys,
            names: fields,
            next: 0,
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        let first: &'static str = variants.first().copied().unwrap_or_default();
        self.leaf("string", || {
            visitor
                .visit_enum(<&str as IntoDeserializer<'de, ProbeError>>::into_deserializer(first))
        })
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_str("x")
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_unit()
    }
}

/// A struct's fields (or a map's one `*` entry), each probed under its name.
struct Fields<'k> {
    path: String,
    keys: &'k mut Vec<(String, String)>,
    names: &'static [&'static str],
    next: usize,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        match self.names.get(self.next) {
            Some(&name) => seed
                .deserialize(<&str as IntoDeserializer<'de, ProbeError>>::into_deserializer(name))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, ProbeError> {
        let name = self.names.get(self.next).copied().unwrap_or_default();
        self.next += 1;
        seed.deserialize(Probe {
            path: join(&self.path, name),
            keys: &mut *self.keys,
        })
    }
}

/// A sequence's elements, all probed under `path[]`.
struct Elements<'k> {
    path: String,
    keys: &'k mut Vec<(String, String)>,
    left: usize,
}

impl<'de> SeqAccess<'de> for Elements<'_> {
    type Error = ProbeError;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, ProbeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(Probe {
            path: self.path.clone(),
            keys: &mut *self.keys,
        })
        .map(Some)
    }
}

// ---------------------------------------------------------------------------
// Reading the repository's files.

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `markdown` with the lines of fenced code blocks blanked, so examples are
/// not read as tables, headings or links.
fn outside_code_blocks(markdown: &str) -> String {
    let mut fenced = false;
    let mut out = String::with_capacity(markdown.len());
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// A Markdown table: its header's cells and each row's cells, trimmed.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn column(&self, name: &str, doc: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| {
                panic!(
                    "{doc}: the table headed {:?} has no {name:?} column",
                    self.header
                )
            })
    }

    fn cell<'t>(&'t self, row: &'t [String], column: usize) -> &'t str {
        row.get(column).map_or("", String::as_str)
    }
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let line = line.strip_prefix('|').unwrap_or(line);
    let line = line.strip_suffix('|').unwrap_or(line);
    line.split('|').map(|cell| cell.trim().to_owned()).collect()
}

/// Every table of `markdown` whose header starts with the cell `first`.
fn tables(markdown: &str, first: &str) -> Vec<Table> {
    let text = outside_code_blocks(markdown);
    let mut found = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let is_separator = |l: &&str| {
            l.trim().starts_with('|')
                && l.trim().chars().all(|c| matches!(c, '|' | '-' | ':' | ' '))
        };
        if !line.trim_start().starts_with('|') || lines.next_if(is_separator).is_none() {
            continue;
        }
        let header = cells(line);
        let mut rows = Vec::new();
        while let Some(row) = lines.next_if(|l| l.trim_start().starts_with('|')) {
            rows.push(cells(row));
        }
        if header.first().is_some_and(|h| h == first) {
            found.push(Table { header, rows });
        }
    }
    found
}

/// The text of each `code span` in `text`.
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The cell's content if the cell is exactly one code span.
fn only_code_span(cell: &str) -> Option<&str> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.contains('`')).then_some(inner)
}

// ---------------------------------------------------------------------------
// docs/configuration.md

const CONFIGURATION: &str = "docs/configuration.md";

/// The rows of the page's `| key | … |` tables, by key.
fn documented_keys() -> BTreeMap<String, BTreeMap<String, String>> {
    let doc = read(CONFIGURATION);
    let mut keys = BTreeMap::new();
    for table in tables(&doc, "key") {
        for row in &table.rows {
            let Some(key) = only_code_span(table.cell(row, 0)) else {
                panic!("{CONFIGURATION}: a key table's row does not start with one `key`: {row:?}");
            };
            let cells = table
                .header
                .iter()
                .cloned()
                .zip(row.iter().cloned())
                .collect();
            if keys.insert(key.to_owned(), cells).is_some() {
                panic!("{CONFIGURATION} documents {key} twice");
            }
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented_and_every_documented_key_exists() {
    let schema = keys_of::<Config>();
    assert!(
        schema.len() > 30,
        "the probe found too few config keys: {schema:?}"
    );
    let documented = documented_keys();
    let mut problems = Vec::new();
    for key in &schema {
        if !documented.contains_key(key) {
            problems.push(format!(
                "{CONFIGURATION} does not document the config key {key}"
            ));
        }
    }
    for key in documented.keys() {
        if !schema.contains(key) {
            problems.push(format!(
                "{CONFIGURATION} documents {key}, which is not a config key"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn documented_config_types_are_the_schema_types() {
    let documented = documented_keys();
    let mut problems = Vec::new();
    for (key, kind) in schema_of::<Config>() {
        let Some(cells) = documented.get(&key) else {
            continue; // reported by the test above
        };
        let written = cells.get("type").map_or("", String::as_str);
        if written != kind {
            problems.push(format!(
                "{CONFIGURATION} gives {key} the type {written:?}; the schema's is {kind:?}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A config table with nothing but the tables leading to `key` (one entry
/// in each array of tables) and, if given, `value` at `key`.
fn config_with(key: &str, value: Option<toml::Value>) -> toml::Table {
    let mut table = toml::Table::new();
    match key.split_once('.') {
        None => {
            if let Some(value) = value {
                table.insert(key.to_owned(), value);
            }
        }
        Some((head, rest)) => {
            let inner = toml::Value::Table(config_with(rest, value));
            match head.strip_suffix("[]") {
                Some(array) => table.insert(array.to_owned(), toml::Value::Array(vec![inner])),
                None => table.insert(head.to_owned(), inner),
            };
        }
    }
    table
}

fn debug_of<T: DeserializeOwned + fmt::Debug>(table: toml::Table) -> Result<String, String> {
    toml::Value::Table(table)
        .try_into::<T>()
        .map(|value| format!("{value:?}"))
        .map_err(|e| e.to_string())
}

/// A default written as one code span is a TOML value, and setting a key to
/// it must change nothing: it is what the code does when the key is absent.
#[test]
fn documented_defaults_are_the_code_defaults() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (key, cells) in documented_keys() {
        let Some(literal) = cells.get("default").and_then(|c| only_code_span(c)) else {
            continue; // prose: "required", "none", "the model's `name`"
        };
        let value = match format!("v = {literal}").parse::<toml::Table>() {
            Ok(mut parsed) => parsed.remove("v"),
            Err(_) => None,
        };
        let Some(value) = value else {
            problems.push(format!(
                "{CONFIGURATION} gives the default of {key} as `{literal}`, which is not a TOML value"
            ));
            continue;
        };
        let absent = debug_of::<Config>(config_with(&key, None));
        let set = debug_of::<Config>(config_with(&key, Some(value)));
        match (absent, set) {
            (Ok(absent), Ok(set)) if absent == set => checked += 1,
            (Ok(_), Ok(_)) => problems.push(format!(
                "{CONFIGURATION} says {key} defaults to {literal}, but the code's default is another value"
            )),
            (_, Err(e)) | (Err(e), _) => problems.push(format!(
                "{CONFIGURATION}: {key} = {literal} does not deserialize: {e}"
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 20, "only {checked} defaults were checked");
}

// ---------------------------------------------------------------------------
// docs/metrics.md

const METRICS: &str = "docs/metrics.md";

#[derive(Debug)]
struct Metric {
    kind: &'static str,
    labels: BTreeSet<String>,
}

/// Every metric Iris records, from its one table ([`crate::metrics::ALL`]).
fn metrics_in_code() -> BTreeMap<String, Metric> {
    crate::metrics::ALL
        .iter()
        .map(|m| {
            let labels = m.labels.iter().map(|l| (*l).to_owned()).collect();
            (
                m.name.to_owned(),
                Metric {
                    kind: m.kind.as_str(),
                    labels,
                },
            )
        })
        .collect()
}

/// `iris_*` metric names mentioned in `text`; a name followed by `*` is a
/// prefix (`iris_image_*`).
fn metric_names_in(text: &str) -> Vec<(String, bool)> {
    let mut names = Vec::new();
    for (start, _) in text.match_indices("iris_") {
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let prefix = text[start + name.len()..].starts_with('*');
        names.push((name, prefix));
    }
    names
}

#[test]
fn every_metric_is_documented_with_its_type_and_labels() {
    let code = metrics_in_code();
    assert!(code.len() >= 10, "too few metrics found in src/: {code:?}");
    let doc = read(METRICS);
    let mut documented = BTreeMap::new();
    let mut problems = Vec::new();
    for table in tables(&doc, "metric") {
        let (kind, labels) = (
            table.column("type", METRICS),
            table.column("labels", METRICS),
        );
        for row in &table.rows {
            let Some(name) = only_code_span(table.cell(row, 0)) else {
                panic!("{METRICS}: a metric row does not start with one `name`: {row:?}");
            };
            let written: BTreeSet<String> = code_spans(table.cell(row, labels))
                .into_iter()
                .map(str::to_owned)
                .collect();
            documented.insert(name.to_owned(), (table.cell(row, kind).to_owned(), written));
        }
    }
    for (name, metric) in &code {
        let Some((kind, labels)) = documented.get(name) else {
            problems.push(format!("{METRICS} does not mention {name}"));
            continue;
        };
        if kind != metric.kind {
            problems.push(format!(
                "{METRICS} says {name} is a {kind}; the code records a {}",
                metric.kind
            ));
        }
        if *labels != metric.labels {
            problems.push(format!(
                "{METRICS} gives {name} the labels {labels:?}; the code sets {:?}",
                metric.labels
            ));
        }
    }
    for name in documented.keys() {
        if !code.contains_key(name) {
            problems.push(format!(
                "{METRICS} lists {name}, which is not in crate::metrics::ALL"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_metric_named_in_the_docs_exists() {
    let code = metrics_in_code();
    let mut pages = vec!["README.md".to_owned()];
    pages.extend(
        markdown_files()
            .into_iter()
            .filter(|p| p.starts_with("docs/")),
    );
    let mut problems = Vec::new();
    for page in pages {
        for (name, prefix) in metric_names_in(&read(&page)) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| code.contains_key(*base))
                })
                .unwrap_or(&name);
            let exists = if prefix {
                code.keys().any(|m| m.starts_with(base))
            } else {
                code.contains_key(base)
            };
            if !exists {
                problems.push(format!(
                    "{page} names the metric {name}{}, which no code in src/ records",
                    if prefix { "*" } else { "" }
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// docs/errors.md

const ERRORS: &str = "docs/errors.md";

/// `docs/errors.md`'s table lists exactly [`ErrorCode::ALL`], each with
/// its status (`–` for a code that is never an HTTP answer) and type.
#[test]
fn every_error_code_is_documented_with_its_status_and_type() {
    use crate::error_code::ErrorCode;
    let doc = read(ERRORS);
    let mut documented = BTreeMap::new();
    for table in tables(&doc, "code") {
        let (status, kind) = (table.column("status", ERRORS), table.column("type", ERRORS));
        for row in &table.rows {
            let Some(name) = only_code_span(table.cell(row, 0)) else {
                panic!("{ERRORS}: a code row does not start with one `code`: {row:?}");
            };
            let kind = only_code_span(table.cell(row, kind)).unwrap_or("");
            documented.insert(
                name.to_owned(),
                (table.cell(row, status).to_owned(), kind.to_owned()),
            );
        }
    }
    let mut problems = Vec::new();
    for code in ErrorCode::ALL {
        let status = code
            .status()
            .map_or("–".to_owned(), |s| s.as_u16().to_string());
        match documented.get(code.as_str()) {
            None => problems.push(format!("{ERRORS} does not list the error code {code}")),
            Some((written, _)) if *written != status => problems.push(format!(
                "{ERRORS} gives {code} the status {written}; its status is {status}"
            )),
            Some((_, kind)) if kind != code.error_type() => problems.push(format!(
                "{ERRORS} gives {code} the type {kind}; its type is {}",
                code.error_type()
            )),
            _ => {}
        }
    }
    for name in documented.keys() {
        if !ErrorCode::ALL.iter().any(|c| c.as_str() == name) {
            problems.push(format!(
                "{ERRORS} lists {name}, which is not in ErrorCode::ALL"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// Links

/// Every Markdown file of the repository (outside build output, dependencies
/// and hidden directories), as paths from the repository root.
fn markdown_files() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    walk(root, &path, out);
                }
            } else if name.ends_with(".md")
                && let Ok(relative) = path.strip_prefix(root)
            {
                out.push(relative.display().to_string());
            }
        }
    }
    let root = repo();
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    files.sort();
    files
}

/// GitHub's anchors for the headings of `markdown`.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for line in outside_code_blocks(markdown).lines() {
        let Some(heading) = line
            .strip_prefix('#')
            .map(|h| h.trim_start_matches('#'))
            .filter(|h| h.starts_with(' '))
        else {
            continue;
        };
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let count = seen.entry(slug.clone()).or_default();
        anchors.insert(if *count == 0 {
            slug.clone()
        } else {
            format!("{slug}-{count}")
        });
        *count += 1;
    }
    anchors
}

/// The targets of the inline links and images of `markdown`.
fn link_targets(markdown: &str) -> Vec<String> {
    let text = outside_code_blocks(markdown);
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            rest.find(')').map(|end| rest[..end].trim().to_owned())
        })
        .collect()
}

#[test]
fn every_relative_link_leads_to_a_file_in_the_repository() {
    let root = repo()
        .canonicalize()
        .unwrap_or_else(|e| panic!("cannot resolve the repository root: {e}"));
    let pages = markdown_files();
    assert!(
        pages.iter().any(|p| p == "docs/README.md"),
        "no docs/README.md among {pages:?}"
    );
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = read(page);
        for target in link_targets(&text) {
            if ["http://", "https://", "mailto:"]
                .iter()
                .any(|scheme| target.starts_with(scheme))
            {
                continue;
            }
            checked += 1;
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            if path.starts_with('/') {
                problems.push(format!(
                    "{page}: the link {target} is absolute; make it relative"
                ));
                continue;
            }
            let file = if path.is_empty() {
                root.join(page)
            } else {
                root.join(page)
                    .parent()
                    .map_or_else(|| root.clone(), Path::to_path_buf)
                    .join(path)
            };
            let Some(file) = file.canonicalize().ok().filter(|f| f.starts_with(&root)) else {
                problems.push(format!(
                    "{page}: the link {target} leads to no file in the repository"
                ));
                continue;
            };
            if !fragment.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&text).contains(fragment) {
                    problems.push(format!(
                        "{page}: the link {target} names no heading of {path}"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 20, "only {checked} relative links were found");
}

// ---------------------------------------------------------------------------
// The checkers checked: each finds what it must on a small known input.

#[test]
fn the_probe_enumerates_nested_structs_arrays_options_maps_and_enums() {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Root {
        name: String,
        section: Section,
        entries: Vec<Entry>,
        tags: Vec<String>,
        limit: Option<u64>,
        by_name: std::collections::HashMap<String, bool>,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Section {
        kind: Kind,
        on: bool,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Entry {
        inner: Option<Section>,
        secret: crate::secret::Secret,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Kind {
        First,
        Second,
    }
    assert_eq!(
        schema_of::<Root>(),
        [
            ("name", "string"),
            ("section.kind", "string"),
            ("section.on", "boolean"),
            ("entries[].inner.kind", "string"),
            ("entries[].inner.on", "boolean"),
            ("entries[].secret", "string"),
            ("tags", "array of strings"),
            ("limit", "integer"),
            ("by_name.*", "boolean"),
        ]
        .map(|(k, t)| (k.to_owned(), t.to_owned()))
    );
}

#[test]
fn the_markdown_readers_find_names_anchors_and_tables() {
    assert_eq!(
        metric_names_in("`iris_a_total{x}`, iris_b_seconds_bucket and `iris_image_*`"),
        [
            ("iris_a_total".to_owned(), false),
            ("iris_b_seconds_bucket".to_owned(), false),
            ("iris_image_".to_owned(), true),
        ]
    );
    assert_eq!(
        anchors("# `POST /v1/chat/completions`\n## `[clients.budget]`: the limits\n## A\n## A\n"),
        [
            "a",
            "a-1",
            "clientsbudget-the-limits",
            "post-v1chatcompletions"
        ]
        .map(str::to_owned)
        .into_iter()
        .collect()
    );
    let found = tables(
        "| key | type |\n|---|---|\n| `a.b` | string |\n\n| other |\n|---|\n| x |\n",
        "key",
    );
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].rows,
        [vec!["`a.b`".to_owned(), "string".to_owned()]]
    );
}
